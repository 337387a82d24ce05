"""How much memory this process has used: what a training run records per stage."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
