"""Token ids of many prompts in one file on disk, read back a batch at a time.

A million 128-token prompts are 256 MB of uint16 token ids: too much to hold beside everything else
when the logs are larger than memory, and cheap to read back with one `pread` per prompt of a batch.
The store is also how the main process of a distributed run hands the training set to the others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TOKENS_FILE = "tokens.bin"
INDEX_FILE = "index.npz"
EXAMPLES_FILE = "examples.npz"


class Growable:
    """A numpy array that doubles its capacity as rows are appended (amortised O(1) per row)."""

    def __init__(self, dtype: np.dtype | type, width: int | None = None, fill: float | int = 0) -> None:
        self._shape = () if width is None else (width,)
        self._fill = fill
        self._data = np.full((1024, *self._shape), fill, dtype=dtype)
        self.size = 0

    def reserve(self, size: int) -> None:
        """Make rows [0, size) addressable (new rows hold `fill`)."""
        if size > len(self._data):
            grown = np.full((max(size, 2 * len(self._data)), *self._shape), self._fill, dtype=self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self.size = max(self.size, size)

    def extend(self, values: np.ndarray) -> None:
        start = self.size
        self.reserve(start + len(values))
        self._data[start : self.size] = values

    @property
    def array(self) -> np.ndarray:
        """The rows in use (a view: valid until the next append)."""
        return self._data[: self.size]

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)


class TokenStoreWriter:
    """Appends prompts' token ids to a new store; `close` makes it readable."""

    def __init__(self, directory: Path, vocab_size: int) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._dtype = np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)
        self._handle = (directory / TOKENS_FILE).open("wb")
        self._offsets = Growable(np.int64)
        self._lengths = Growable(np.int32)
        self._written = 0

    def __len__(self) -> int:
        return self._lengths.size

    @property
    def bytes_written(self) -> int:
        return self._written * self._dtype.itemsize

    def append(self, token_ids: Sequence[np.ndarray]) -> np.ndarray:
        """Store each prompt's ids; returns their slots."""
        first = len(self)
        if not token_ids:
            return np.zeros(0, dtype=np.int64)
        lengths = np.array([len(ids) for ids in token_ids], dtype=np.int32)
        offsets = self._written + np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)])
        self._handle.write(np.concatenate(token_ids).astype(self._dtype).tobytes())
        self._written += int(lengths.sum())
        self._offsets.extend(offsets)
        self._lengths.extend(lengths)
        return np.arange(first, len(self), dtype=np.int64)

    def close(self) -> TokenStore:
        self._handle.close()
        temporary = self.directory / (INDEX_FILE + ".tmp.npz")
        np.savez(temporary, offsets=self._offsets.array, lengths=self._lengths.array,
                 dtype=np.array(self._dtype.str))
        os.replace(temporary, self.directory / INDEX_FILE)
        return TokenStore(self.directory)


class TokenStore:
    """Read side of a token store: `get(slots)` reads those prompts' ids from disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with np.load(directory / INDEX_FILE) as index:
            self._offsets = index["offsets"]
            self.lengths: np.ndarray = index["lengths"]
            self._dtype = np.dtype(str(index["dtype"]))
        # Read with pread, not a memory map: mapped pages would count in the process's resident memory.
        self._fd = os.open(directory / TOKENS_FILE, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.lengths)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    @property
    def disk_bytes(self) -> int:
        return (self.directory / TOKENS_FILE).stat().st_size

    def get(self, slots: np.ndarray) -> list[np.ndarray]:
        """Token ids (int64) of each slot, in the order given."""
        size = self._dtype.itemsize
        return [np.frombuffer(os.pread(self._fd, int(self.lengths[s]) * size, int(self._offsets[s]) * size),
                              dtype=self._dtype).astype(np.int64) for s in slots]


class Examples:
    """Training examples as slots of a token store (a prompt repeated for weight costs no copy);
    a `trainer.TokenSource`."""

    def __init__(self, store: TokenStore, slots: np.ndarray) -> None:
        self.store = store
        self.slots = slots
        self._lengths = store.lengths[slots]

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def __len__(self) -> int:
        return len(self.slots)

    def batch(self, indices: np.ndarray) -> list[np.ndarray]:
        return self.store.get(self.slots[indices])


def save_examples(directory: Path, slots: np.ndarray, targets: np.ndarray) -> None:
    """Write which slots are trained on and their targets beside the store (atomically)."""
    temporary = directory / (EXAMPLES_FILE + ".tmp.npz")
    np.savez(temporary, slots=slots, targets=targets)
    os.replace(temporary, directory / EXAMPLES_FILE)


def load_examples(directory: Path) -> tuple[Examples, np.ndarray]:
    """The training set a store directory holds: (examples, targets)."""
    with np.load(directory / EXAMPLES_FILE) as saved:
        slots, targets = saved["slots"], saved["targets"]
    return Examples(TokenStore(directory), slots), targets


def write_training_set(directory: Path, token_ids: Sequence[np.ndarray], targets: np.ndarray,
                       vocab_size: int) -> None:
    """Store in-memory token ids and targets as a training set other processes can open."""
    writer = TokenStoreWriter(directory, vocab_size)
    slots = writer.append(token_ids)
    writer.close()
    save_examples(directory, slots, targets)
