"""The artifact directory's layout: the name of every file it may hold, and how writers put files there.

Layout::

    DIR/
      manifest.json          # required: tiers, policy, calibration, truncation, provenance, and the
                             #   sha256 of model.onnx and tokenizer.json (classifier.artifact)
      model.onnx             # required: inputs input_ids/attention_mask (int64, [batch, seq]);
                             #   output logits [batch, n_tiers]
      tokenizer.json         # required: a `tokenizers` fast tokenizer
      MODEL_CARD.md          # for people
      eval.json, eval.md, eval.png            # the held-out evaluation
      generalization.json, generalization.md, generalization.png  # leave-one-source-out and seed
                                                                  #   figures, when measured
      seen_prompts.txt       # hashes of the prompts trained or calibrated on, which evaluation leaves out
      eval/                  # where `promptier eval` writes its eval files when not told to record them

Every reader (the runtime, the labeler, training's evaluation) and every writer (training's pipeline,
export and evaluation) takes these names from here, so that each file is named once. Writers go
through `member` (which refuses a name the layout does not declare), `write_member_text` and
`writing_member` (a file appears whole or not at all), and `staged_artifact` (a whole artifact
appears at once, or the previous one stays).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from classifier.errors import ArtifactError
from classifier.scratch_dirs import made_by_mkdtemp
from classifier.signals import exit_deferred, sigterm_unwinds

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
EVAL_JSON_FILE = "eval.json"
EVAL_MD_FILE = "eval.md"
EVAL_PNG_FILE = "eval.png"
GENERALIZATION_JSON_FILE = "generalization.json"
GENERALIZATION_MD_FILE = "generalization.md"
GENERALIZATION_PNG_FILE = "generalization.png"
SEEN_PROMPTS_FILE = "seen_prompts.txt"

REQUIRED_FILES = (MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE)
EVAL_FILES = (EVAL_JSON_FILE, EVAL_MD_FILE, EVAL_PNG_FILE)
GENERALIZATION_FILES = (GENERALIZATION_JSON_FILE, GENERALIZATION_MD_FILE, GENERALIZATION_PNG_FILE)
# What describes the trained weights rather than one export of them: a re-export carries these over,
# and writes the model, manifest and card anew.
WEIGHTS_RECORDS = (SEEN_PROMPTS_FILE, *EVAL_FILES, *GENERALIZATION_FILES)
MEMBER_FILES = frozenset({*REQUIRED_FILES, MODEL_CARD_FILE, *WEIGHTS_RECORDS})
# A report directory, not a file of the artifact: no artifact is written with one, and a re-export
# leaves it behind.
EVAL_REPORT_DIR = "eval"


def _process_umask() -> int:
    """The umask, read where Linux shows it; elsewhere set and restored (a moment's change)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# tempfile makes its files and directories private (0600, 0700). An artifact is written by one user
# (a training job) and read by others (the server, the labeler), so its members get the modes that
# open() and mkdir() would give them: the process's umask decides, as for any other file it writes.
# The umask is read once, at import.
_UMASK = _process_umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIRECTORY_MODE = 0o777 & ~_UMASK
# The suffix of the directory a writer moves the previous artifact to while its own takes its place.
_ASIDE_SUFFIX = ".replaced"


def member(directory: Path, name: str) -> Path:
    """The path of the artifact file `name` in `directory`.

    Raises:
        ValueError: the layout declares no file of that name (a writer inventing one would ship a file
            no reader knows of).
    """
    if name not in MEMBER_FILES:
        raise ValueError(f"{name!r} is not a file of the artifact layout (classifier/artifact_layout.py)")
    return directory / name


def _artifacts_own(name: str) -> bool:
    """Whether `name`, in an artifact directory, is the artifact's: a member, its report directory, or a
    member's temporary file that a killed `writing_member` left."""
    return name in MEMBER_FILES or name == EVAL_REPORT_DIR or name.startswith(_MEMBER_TEMPORARY_PREFIXES)


_MEMBER_TEMPORARY_PREFIXES = tuple(f".{name}." for name in sorted(MEMBER_FILES))


@contextlib.contextmanager
def writing_member(directory: Path, name: str) -> Iterator[Path]:
    """A temporary path beside member `name` to write it to; renamed over it when the block succeeds.

    A server may reload the artifact while `promptier eval --record` rewrites its files in place: it
    must read the old file or the new one, never half of one. The temporary file keeps the member's
    suffix, for writers that choose a format by it (matplotlib).
    """
    target = member(directory, name)
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=target.suffix, dir=directory)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def write_member_text(directory: Path, name: str, text: str) -> Path:
    """Write member `name` of `directory` whole (see `writing_member`). Returns its path."""
    with writing_member(directory, name) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return directory / name


def check_destination(out_dir: Path) -> None:
    """Refuse an artifact destination that cannot become an artifact directory, before any work.

    Raises:
        ArtifactError: `out_dir` or a folder above it is a file, or `out_dir` is a directory holding
            anything an artifact does not (a folder of models, a project's files).
    """
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise ArtifactError(f"{out_dir} cannot be an artifact directory: {path} is a file")
            break
    # The new artifact replaces the whole directory: whatever else it held would be deleted with it.
    if out_dir.is_dir():
        foreign = sorted(path.name for path in out_dir.iterdir() if not _artifacts_own(path.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
            raise ArtifactError(f"{out_dir} is not an artifact directory (it holds {shown}), and an artifact "
                                "written there replaces the whole directory, deleting them: give --out a new "
                                "directory or an artifact's")


@contextlib.contextmanager
def staged_artifact(out_dir: Path) -> Iterator[Path]:
    """A fresh directory beside `out_dir` to write a whole artifact into.

    When the block succeeds, the staged directory replaces `out_dir`; when it raises (a parity check
    that fails, an interrupted run), the staged directory is removed and `out_dir` is as it was. A
    server pointed at `out_dir` therefore never loads an artifact whose evaluation or card is missing.
    A SIGTERM (a scheduler stopping the job) ends the process through the same cleanup, and waits for a
    replacement under way to finish (`sigterm_unwinds`, `exit_deferred`); only SIGKILL leaves the staged
    directory behind.

    Raises:
        ArtifactError: `out_dir` is a file, or the staged directory holds a file the layout does not declare.
    """
    check_destination(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_unwinds(), contextlib.ExitStack() as cleanup:
        with exit_deferred():  # a SIGTERM while the directory is made waits until its removal is arranged
            with _folder_locked(out_dir.parent):  # so that no writer clears a directory another has not locked
                _clear_abandoned_staging(out_dir)
                staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out_dir), dir=out_dir.parent))
                # Held until the block ends: the lock says a live writer owns the directory; the system
                # releases it when the writer dies, however it dies, and the next writer clears what it left.
                owner = os.open(staging, os.O_RDONLY)
                with contextlib.suppress(OSError):  # a filesystem without locks: nothing is ever cleared there
                    fcntl.flock(owner, fcntl.LOCK_EX)
            cleanup.callback(_remove_staging, staging, owner)
        os.chmod(staging, _DIRECTORY_MODE)
        yield staging
        undeclared = sorted(path.name for path in staging.iterdir() if path.name not in MEMBER_FILES)
        if undeclared:
            raise ArtifactError(f"the artifact for {out_dir} would hold files the layout does not declare: "
                                f"{', '.join(undeclared)}")
        # Deferred: stopped between its two renames, `out_dir` would be gone. Locked: a writer clearing
        # abandoned directories meanwhile would find `out_dir` gone too, and put an old artifact there.
        with exit_deferred(), _folder_locked(out_dir.parent):
            _replace_directory(staging, out_dir, _aside_of(staging))


def _remove_staging(staging: Path, owner: int) -> None:
    """What is left of a staging directory (nothing, once it became the artifact), then its lock."""
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
    os.close(owner)


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """`folder`'s exclusive lock, for a short critical section among artifact writers."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: nothing is ever cleared there
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _staging_prefix(out_dir: Path) -> str:
    """The start of the name of every staging directory this host makes for `out_dir`: a lock is only
    known to be free for the writers of one host (NFS may keep flocks local), so only they are cleared."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f".{out_dir.name}.staging-{host}-"


def _staging_directories(out_dir: Path, suffix: str = "") -> list[Path]:
    """This host's staging directories of `out_dir` (with `suffix`: their asides)."""
    return made_by_mkdtemp(out_dir.parent, _staging_prefix(out_dir), suffix)


def _aside_of(staging: Path) -> Path:
    """Where `out_dir`'s previous artifact waits while `staging` takes its place: named after the staging
    directory, so that whoever clears an abandoned one knows which is whose."""
    return staging.with_name(staging.name + _ASIDE_SUFFIX)


def _clear_abandoned_staging(out_dir: Path) -> None:
    """Remove the staging directories of `out_dir` whose writer died (killed, or its machine lost power)
    before it finished or cleaned up; a live writer's are left alone. Called with the folder's lock held.

    A writer killed between moving the previous artifact aside and putting its own in place leaves no
    `out_dir`: the previous artifact is then put back, never deleted."""
    for staging in _staging_directories(out_dir):
        if not _abandoned(staging):
            continue
        aside = _aside_of(staging)
        if aside.is_dir() and not out_dir.exists():
            aside.rename(out_dir)
        shutil.rmtree(staging, ignore_errors=True)
    for aside in _staging_directories(out_dir, _ASIDE_SUFFIX):
        # Its staging directory is gone: it became `out_dir`, and only the previous artifact's removal
        # was cut short (a writer swaps under the folder's lock, so none is between its two renames).
        if not aside.with_name(aside.name.removesuffix(_ASIDE_SUFFIX)).exists():
            if out_dir.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.rename(out_dir)


def _abandoned(staging: Path) -> bool:
    """Whether no live process holds `staging`'s lock (a directory that vanished meanwhile is not)."""
    try:
        fd = os.open(staging, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        return True
    finally:
        os.close(fd)


def _replace_directory(source: Path, target: Path, aside: Path) -> None:
    """Move `source` to `target`; a directory `target` held is moved to `aside` first and removed after,
    so that `target` is never a mix of the two (POSIX has no atomic exchange of two directories)."""
    if not target.exists():
        source.rename(target)
        return
    target.rename(aside)
    try:
        source.rename(target)
    except OSError:
        aside.rename(target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
