"""The wheel, as `pip install promptier` would get it: every file the code opens at run time is in it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import classifier
import serving.dispatch
from training.config import SHIPPED_RECIPE
from training.probes import PROBES_FILE

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = Path(classifier.__file__).resolve().parents[1]  # where the packages are read from: ROOT, if editable
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "proto", "classifier", "training", "serving")


def test_the_wheel_holds_the_model_probes_recipes_and_example_configs(tmp_path: Path) -> None:
    """An editable install reads these from the checkout; a wheel only has what the package data names."""
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "_proto"))
        else:
            shutil.copy(path, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("promptier-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    dispatch = Path(serving.dispatch.__file__).resolve().parent
    read_at_run_time = [PROBES_FILE, SHIPPED_RECIPE, dispatch / "savings.html", dispatch / "dispatcher.example.yaml",
                        dispatch.parent / "promptier-litellm.example.yaml",
                        # The service definition, for clients and the native load-test server.
                        dispatch.parent / "_proto" / "promptier" / "v1" / "router.proto",
                        # The artifact's files (a local `promptier eval` may have added a folder beside them).
                        *(path for path in classifier.DEFAULT_MODEL_DIR.iterdir() if path.is_file())]
    missing = [name for name in (path.resolve().relative_to(INSTALLED).as_posix() for path in read_at_run_time)
               if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "serving/_proto/promptier/v1/router_pb2.py" in names  # generated while building


def test_without_a_checkout_the_service_definition_is_read_from_beside_its_stubs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients and the native load-test server need router.proto; an installed package has its copy."""
    import serving.codegen as codegen

    monkeypatch.setattr(codegen, "PROTO_ROOT", tmp_path / "no-checkout")
    root = codegen.proto_root()
    assert root == codegen.OUTPUT
    definition = Path("promptier") / "v1" / "router.proto"
    assert (root / definition).read_text() == (ROOT / "proto" / definition).read_text()
