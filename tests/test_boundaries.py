"""The packages' boundaries: `classifier/` (the runtime) imports neither of the others; `training/` and
`serving/` import `classifier/`, never each other; and the runtime's and serving's commands load no
training code and no torch when they run, the services none of the load tools, and none of them LiteLLM
(only serving/litellm_router.py imports it). Within `serving/`, the gRPC service and the dispatcher
import nothing of each other (what both run is in serving/common/), and `serve` and `dispatch` load none of
each other's modules. Within the packages, no modules import each other in a cycle; and no test module
imports another (shared helpers live in helper modules or conftest.py)."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"classifier": {"training", "serving"}, "training": {"serving"}, "serving": {"training"}}
TRAINING_ONLY = ("training", "torch", "transformers", "sklearn")
BENCH_ONLY = ("httpx", "fastapi")
# serving/'s products, each its own package: a change to one is read there (and in serving/common/, which
# both the service and the dispatcher run), never in another product's code. serving.client, the gRPC
# client gateways import, is how the dispatcher reaches the service.
SERVING_PRODUCTS = ("serving.service", "serving.dispatch", "serving.bench", "serving.litellm_router", "serving.cli")
SERVING_FORBIDDEN = {
    "serving.common": set(SERVING_PRODUCTS),
    "serving.client": set(SERVING_PRODUCTS) | {"serving.common"},
    "serving.service": set(SERVING_PRODUCTS) - {"serving.service"},
    "serving.dispatch": set(SERVING_PRODUCTS) - {"serving.dispatch"},
}


def _imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_its_product_may(package: str) -> None:
    crossings = {str(path.relative_to(ROOT)): sorted(_imported_packages(path) & FORBIDDEN[package])
                 for path in sorted((ROOT / package).rglob("*.py")) if "_proto" not in path.parts}
    assert {path: names for path, names in crossings.items() if names} == {}


def _imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that a module imports anywhere in it (`from a.b import c` may import a.b.c)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    return found & known


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def test_serving_products_import_nothing_of_each_other() -> None:
    paths = {_module_name(path): path for path in sorted((ROOT / "serving").rglob("*.py"))
             if "_proto" not in path.parts}
    imported = {name: _imported_modules(path, set(paths) | set(SERVING_PRODUCTS)) for name, path in paths.items()}
    # The check sees what a module imports: the dispatcher's classifier reaches the service through the client.
    assert {"serving.client", "serving.common.batcher"} <= imported["serving.dispatch.route_classifier"]
    crossings = {name: sorted(module for module in modules for forbidden in SERVING_FORBIDDEN[package]
                              if _within(module, forbidden))
                 for package in SERVING_FORBIDDEN for name, modules in imported.items() if _within(name, package)}
    assert {name: modules for name, modules in crossings.items() if modules} == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`, one per group of modules that import each other (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_modules_import_each_other_in_a_cycle() -> None:
    """Imports inside functions count too: a cycle hidden in one makes the order modules may be read in
    (and the layering) a matter of luck."""
    paths = {_module_name(path): path for package in FORBIDDEN for path in sorted((ROOT / package).rglob("*.py"))
             if "_proto" not in path.parts}
    graph = {name: _imported_modules(path, set(paths)) - {name} for name, path in paths.items()}
    assert "training.evaluate" in graph["training.pipeline"]  # the check sees imports inside functions
    assert _cycles(graph) == []


def test_no_test_module_imports_another() -> None:
    """A test module's helpers reached from another make one module's edits break the other's tests."""
    tests = {_module_name(path) for path in (ROOT / "tests").glob("test_*.py")}
    crossings = {name: sorted(_imported_modules(ROOT / f"{name.replace('.', '/')}.py", tests) - {name})
                 for name in sorted(tests)}
    assert {name: imported for name, imported in crossings.items() if imported} == {}


def _loaded_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def _training_modules(names: set[str]) -> list[str]:
    return sorted(name for name in names if name.split(".")[0] in TRAINING_ONLY)


def _load_tool_modules(names: set[str]) -> list[str]:
    """Modules of the load tools and of the `bench` extra, which the services must run without."""
    return sorted(name for name in names if name.startswith("serving.bench") or name.split(".")[0] in BENCH_ONLY)


def _modules_of(names: set[str], package: str) -> list[str]:
    return sorted(name for name in names if _within(name, package))


def _litellm_modules(names: set[str]) -> list[str]:
    """LiteLLM is for serving/litellm_router.py alone (an extra): no other command may load it."""
    return sorted(name for name in names if name.split(".")[0] == "litellm")


def _promptier(*args: str) -> list[str]:
    return [sys.executable, "-X", "importtime", "-m", "classifier.cli", *args]


def test_classify_and_label_load_no_training_code(tmp_path: Path) -> None:
    result = subprocess.run(_promptier("classify", "What is the capital of France?"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["tier"]
    loaded = _loaded_modules(result.stderr)
    assert "classifier.runtime" in loaded  # the check reads what was really imported
    assert _training_modules(loaded) == [] and _litellm_modules(loaded) == []

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt_id": str(i), "prompt": f"say hi {i}"}) + "\n" for i in range(5)))
    result = subprocess.run(_promptier("label", str(source), "-o", str(tmp_path / "out.jsonl"), "--workers", "1"),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5
    assert _training_modules(_loaded_modules(result.stderr)) == []


def test_serve_and_dispatch_load_no_training_code(tmp_path: Path) -> None:
    from serving.bench.ports import free_port, wait_serving

    port = free_port()
    stderr_path = tmp_path / "serve.err"  # a file, not a pipe: nothing reads it until the server serves
    with stderr_path.open("w") as stderr:
        server = subprocess.Popen(_promptier("serve", "--port", str(port)), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_serving(f"127.0.0.1:{port}")
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    loaded = _loaded_modules(stderr_path.read_text())
    assert "serving.service.server" in loaded and "grpc" in loaded
    assert _training_modules(loaded) == [] and _litellm_modules(loaded) == []
    assert _load_tool_modules(loaded) == [] and _modules_of(loaded, "serving.dispatch") == []

    config = tmp_path / "dispatcher.yaml"
    config.write_text(json.dumps({
        "classifier": {"embedded": True},
        "tiers": {name: {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": name}
                  for name in ("small", "medium", "large")},
        "fallback_tier": "large", "decision_log": {"path": str(tmp_path / "d.jsonl")}}))
    result = subprocess.run(_promptier("dispatch", "--config", str(config), "--check"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = _loaded_modules(result.stderr)
    assert "serving.dispatch.config_check" in loaded and "serving.common.batcher" in loaded
    assert _training_modules(loaded) == [] and _litellm_modules(loaded) == []
    assert _load_tool_modules(loaded) == [] and _modules_of(loaded, "serving.service") == []

    # The request path: what each `dispatch` worker process builds and serves with.
    from serving.dispatch.dispatch_supervisor import CONFIG_ENV

    result = subprocess.run([sys.executable, "-X", "importtime", "-c",
                             "from serving.dispatch.worker import app_from_environment; app_from_environment()"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, CONFIG_ENV: str(config)})
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = _loaded_modules(result.stderr)
    assert {"serving.dispatch.chat", "serving.dispatch.app", "aiohttp", "starlette"} <= loaded
    assert _training_modules(loaded) == [] and _litellm_modules(loaded) == []
    assert _load_tool_modules(loaded) == [] and _modules_of(loaded, "serving.service") == []


# The runtime's own suites: what an install without the training extra must pass.
RUNTIME_SUITE = ("tests/test_runtime.py", "tests/test_policy.py", "tests/test_labeling.py")


def test_the_runtime_suite_passes_without_the_training_extra() -> None:
    """The runtime's tests, run with torch and the rest of the training extra unimportable: the ones on
    the shipped model pass, the ones that must train a model skip (and say why)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}  # this run's own options
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.without_training", "-p", "no:cacheprovider",
                             "-q", "-rs", *RUNTIME_SUITE], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 20 and " skipped" in summary, summary
    assert "needs the training extra" in result.stdout, result.stdout[-3000:]


def test_the_blocked_modules_are_the_training_extra() -> None:
    """tests.without_training hides exactly the packages pyproject's `train` extra installs."""
    import importlib.metadata
    import re

    from tests.without_training import TRAINING_EXTRA

    extra = {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
             for requirement in importlib.metadata.requires("promptier") or []
             if re.search(r"""extra\s*==\s*["']train["']""", requirement)}
    providers = importlib.metadata.packages_distributions()
    blocked = {distribution.lower().replace("_", "-") for name in TRAINING_EXTRA for distribution in providers[name]}
    assert blocked == extra
