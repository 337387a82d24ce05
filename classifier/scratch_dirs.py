"""Finding the scratch directories `tempfile.mkdtemp` made beside an output, by their whole name."""

from __future__ import annotations

import re
from pathlib import Path

# The random end tempfile.mkdtemp gives a name: 8 of [a-z0-9_].
_MKDTEMP_SUFFIX = "[a-z0-9_]{8}"


def made_by_mkdtemp(folder: Path, prefix: str, suffix: str = "") -> list[Path]:
    """The directories of `folder` named `prefix`, mkdtemp's random end, then `suffix`, in name order.

    Matched whole (no glob): another output whose name starts like this one's, or holds glob
    characters, never has its directories taken for these."""
    pattern = re.compile(re.escape(prefix) + _MKDTEMP_SUFFIX + re.escape(suffix))
    return sorted(path for path in folder.iterdir() if pattern.fullmatch(path.name) and path.is_dir())
