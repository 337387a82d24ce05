"""The report path of a load tool, checked before minutes of measuring rather than when the report is
written at the end (and the run lost)."""

from __future__ import annotations

from pathlib import Path

from classifier.bench import try_writing


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
        try_writing(out)
    except OSError as error:
        raise RuntimeError(f"--out {out}: cannot write there: {error.strerror or error}") from None
