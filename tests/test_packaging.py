"""The wheel, as `pip install promptier` would get it: every file the code opens at run time is in it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import classifier
import serving.dispatch
from training.bench import SHIPPED_RECIPE
from training.probes import PROBES_FILE

ROOT = Path(__file__).resolve().parents[1]
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
    names = set(zipfile.ZipFile(wheel).namelist())
    read_at_run_time = [PROBES_FILE, SHIPPED_RECIPE, *classifier.DEFAULT_MODEL_DIR.iterdir(),
                        Path(serving.dispatch.__file__).parent / "savings.html",
                        Path(serving.dispatch.__file__).parent / "dispatcher.example.yaml",
                        ROOT / "serving" / "promptier-litellm.example.yaml"]
    missing = [str(path.relative_to(ROOT)) for path in read_at_run_time
               if path.relative_to(ROOT).as_posix() not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "serving/_proto/promptier/v1/router_pb2.py" in names  # generated while building
