"""The report path of a load tool, checked before minutes of measuring rather than when the report is
written at the end (and the run lost)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def check_report_path(out: Path) -> None:
    """Refuse a path the JSON report cannot be written to.

    Raises:
        RuntimeError: `out`'s folder does not exist, `out` is a folder, or a file cannot be created in
            its folder (read-only, no permission) or `out` itself cannot be opened for writing.
    """
    folder = out.absolute().parent
    if not folder.is_dir():
        raise RuntimeError(f"--out {out}: folder {folder} does not exist")
    if out.is_dir():
        raise RuntimeError(f"--out {out} is a folder: give the path of the JSON report to write")
    try:
        # A trial file rather than os.access: access() says yes to root on a read-only file system.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{out.name}.", suffix=".check"):
            pass
        if out.exists():
            with out.open("r+b"):  # opened for writing, left as it is
                pass
    except OSError as error:
        raise RuntimeError(f"--out {out}: cannot write there: {error.strerror or error}") from None
