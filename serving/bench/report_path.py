"""The report path of a load tool, checked before minutes of measuring rather than when the report is
written at the end (and the run lost)."""

from __future__ import annotations

from pathlib import Path


def check_report_path(out: Path) -> None:
    """Refuse a path the JSON report cannot be written to.

    Raises:
        RuntimeError: `out`'s folder does not exist, or `out` is a folder.
    """
    if not out.absolute().parent.is_dir():
        raise RuntimeError(f"--out {out}: folder {out.absolute().parent} does not exist")
    if out.is_dir():
        raise RuntimeError(f"--out {out} is a folder: give the path of the JSON report to write")
