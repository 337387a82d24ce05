"""Where training runs: the device, the precision of its arithmetic, and the processes of a
data-parallel run.

`promptier train` runs on the CPU, on one GPU, or as several processes started by `torchrun` (one
per GPU, or several on a CPU), which PyTorch's DistributedDataParallel keeps in step. The training
config names what it wants (`device: auto|cpu|cuda`, `precision: auto|fp32|bf16|fp16`); this module
resolves that against the machine and the `torchrun` environment, once, into a `Placement`.

Mixed precision is for GPUs only: on a CPU every precision resolves to fp32, so a recipe with
`precision: bf16` still trains, bit for bit as before, on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import torch

from classifier.errors import PromptierError
from training.config import DeviceName, PrecisionName

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

log = logging.getLogger(__name__)

# The other processes wait this long for the main one to prepare the training set: reading millions
# of rows (and embedding them for a teacher) takes far longer than a collective's usual 30 minutes.
PREPARATION_TIMEOUT = timedelta(hours=24)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(PromptierError):
    """The requested device or precision is not available here."""


@dataclass(frozen=True)
class Placement:
    """Resolved device, precision and process rank; one per training process."""

    device: torch.device
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _waiting_group: ProcessGroup | None = field(default=None, compare=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process reads logs, writes checkpoints, artifacts and reports."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast region (nothing in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def wait_for_main(self) -> None:
        """Every process waits here until the main one has prepared the training set (long timeout)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._waiting_group)

    def describe(self) -> dict[str, object]:
        """What the artifact records about where it was trained."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": self.device.type, "device_name": name, "precision": self.precision,
                "processes": self.world_size}


def torchrun_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables `torchrun` sets; (0, 1, 0) without it."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as exc:
        raise DeviceError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from exc


def resolve_device(requested: DeviceName, local_rank: int = 0) -> torch.device:
    """cpu, or the GPU this process owns (`cuda:LOCAL_RANK`).

    Raises:
        DeviceError: `cuda` was asked for and torch sees none, or fewer GPUs than local processes.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise DeviceError(f"device 'cuda' was asked for, but torch {torch.__version__} sees no CUDA device "
                              f"(built for CUDA: {torch.version.cuda or 'no'}); use --device cpu or auto")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"process {local_rank} of this machine has no GPU of its own ({count} visible): "
                          f"start at most {count} processes per machine, or use --device cpu")
    return torch.device("cuda", local_rank)


def resolve_precision(requested: PrecisionName, device: torch.device) -> Literal["fp32", "bf16", "fp16"]:
    """fp32 on a CPU whatever was asked; on a GPU `auto` is bf16 where supported, else fp16.

    Raises:
        DeviceError: bf16 was asked for on a GPU without it.
    """
    if device.type != "cuda":
        if requested in ("bf16", "fp16"):
            log.warning("precision %s is for GPUs; training on the CPU in fp32", requested)
        return "fp32"
    bf16 = torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if bf16 else "fp16"
    if requested == "bf16" and not bf16:
        raise DeviceError(f"{torch.cuda.get_device_name(device)} does not support bf16; use --precision fp16")
    return requested


@contextlib.contextmanager
def placed(device: DeviceName, precision: PrecisionName) -> Iterator[Placement]:
    """The placement of this process; under `torchrun`, with the process group joined for its duration.

    Backends: NCCL between GPUs, gloo between CPU processes. A second, gloo group with a long timeout
    is what processes wait on while the main one prepares the data.
    """
    rank, world_size, local_rank = torchrun_environment()
    resolved = resolve_device(device, local_rank if world_size > 1 else 0)
    chosen = resolve_precision(precision, resolved)
    if world_size <= 1:
        yield Placement(resolved, chosen)
        return
    import torch.distributed as dist

    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    try:
        waiting = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
        log.info("process %d of %d on %s (%s, %s)", rank, world_size, resolved, backend, chosen)
        yield Placement(resolved, chosen, rank, world_size, local_rank, waiting)
    finally:
        dist.destroy_process_group()
