"""Fixtures: a tiny BERT backbone and synthetic routing logs, built locally (no download, no shared data)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from training.synthetic import POOL_YAML, build_tiny_backbone, synthetic_rows, write_jsonl

if TYPE_CHECKING:
    from tests.dispatcher_harness import Dispatcher
    from tests.fake_upstream import Upstream
    from tests.grpc_server import ServerThread
    from tests.redis_server import RedisServer

__all__ = ["POOL_YAML", "build_tiny_backbone", "synthetic_rows", "write_jsonl"]


# The fast lane (`pytest -m "not slow"`) leaves out what trains models beyond the shared fixture, runs
# whole products for a minute (soak, notebooks, reloads of worker processes), or builds native code.
# CI runs everything. Kept in one place, so that a test's speed is judged where the others' are.
SLOW_MODULES = {"test_pipeline", "test_generalization", "test_checkpoints", "test_notebooks", "test_soak",
                "test_default_model", "test_litellm", "test_feedback", "test_devices"}
SLOW_TESTS = {
    "test_sighup_rereads_the_config_without_a_failed_request_and_refuses_a_bad_one",
    "test_dispatcher_workers_spread_connections_add_up_metrics_and_share_the_log",
    "test_native_echo_floor_answers_and_counts_only_what_it_answered",
    "test_client_spreads_its_connections_over_the_server_processes",
    "test_ray_engine_equals_local_engine",
    "test_ray_engine_agrees_with_local_on_malformed_rows",
    "test_the_ray_engine_reads_long_lines_and_ids_as_the_local_engine",
    "test_kill_9_then_resume_equals_uninterrupted",
    "test_streamed_training_end_to_end",
    "test_a_retiring_dispatcher_answers_the_connections_it_had_accepted",
    "test_the_runtime_suite_passes_without_the_training_extra",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS:  # type: ignore[attr-defined]
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="builds a model: needs the training extra (pip install -e '.[train]')")
    return build_tiny_backbone(tmp_path_factory.mktemp("backbone"))


def count_embedded_prompts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every sentence-embedding pass append how many prompts it embeds to the returned list."""
    from training import baselines

    real_batches = baselines.embedded_batches
    counts: list[int] = []

    def counting(prompts, *args, **kwargs):  # type: ignore[no-untyped-def]
        counts.append(len(prompts))
        yield from real_batches(prompts, *args, **kwargs)

    monkeypatch.setattr(baselines, "embedded_batches", counting)
    return counts


@pytest.fixture(scope="session")
def pool_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "pool.yaml"
    path.write_text(POOL_YAML, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def synthetic_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("logs") / "outcomes.jsonl", synthetic_rows())


def tiny_config(backbone: Path, **overrides: object):  # type: ignore[no-untyped-def]
    from training.config import TrainConfig

    # quantize: False chooses the export explicitly: whether int8 clears the parity bars depends on the
    # CPU (AVX-512 VNNI or not), and a fixture must not. The int8 path has a test of its own.
    values = {"backbone": str(backbone), "max_tokens": 32, "epochs": 6, "batch_size": 16,
              "learning_rate": 3e-3, "freeze_embeddings": False, "checkpoint_every": 20, "threads": 1,
              "seed": 7, "quantize": False}
    values.update(overrides)
    return TrainConfig.model_validate(values)


@pytest.fixture(scope="session")
def trained_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path, synthetic_logs: Path,
                     pool_file: Path) -> Path:
    """The tiny model trained end to end through the real pipeline, shared by the session's tests."""
    from training.pipeline import train

    out = tmp_path_factory.mktemp("artifact") / "model"
    train([synthetic_logs], pool_file, out, tiny_config(tiny_backbone), model_version="tiny-test-1")
    return out


@pytest.fixture
def artifact_copy(trained_artifact: Path, tmp_path: Path) -> Path:
    """A private copy a test may damage."""
    return Path(shutil.copytree(trained_artifact, tmp_path / "model"))


@pytest.fixture(scope="session")
def shipped_artifact() -> Path:
    """The shipped default model: a real artifact that needs no torch, so the runtime's tests that use
    it also run in an install without the training extra. Read-only: copy it to change it."""
    from classifier.runtime import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR


@pytest.fixture
def shipped_artifact_copy(shipped_artifact: Path, tmp_path: Path) -> Path:
    """A private copy of the shipped model a test may damage."""
    return Path(shutil.copytree(shipped_artifact, tmp_path / "model"))


@contextlib.contextmanager
def dies_after_first_checkpoint() -> Iterator[None]:
    """Training inside this block stops (KeyboardInterrupt) right after writing its first checkpoint, as
    a killed run would; the block expects that interruption."""
    from training import trainer

    save = trainer._save_checkpoint

    def save_then_die(*args, **kwargs):  # type: ignore[no-untyped-def]
        save(*args, **kwargs)
        raise KeyboardInterrupt

    trainer._save_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        trainer._save_checkpoint = save


# The dispatcher tests' fixtures: recording upstreams, the gRPC classifier on the test model, a Redis
# server. Imported inside, so that tests that use none of them load none of their servers' code.
@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    """One recording upstream per tier of the test model, for a module's tests."""
    from tests.fake_upstream import Upstream

    servers = {name: Upstream(name) for name in ("small", "medium", "large")}
    yield servers
    for upstream in servers.values():
        upstream.server.should_exit = True


@pytest.fixture
def fresh(upstreams: dict[str, Upstream]) -> dict[str, Upstream]:
    """The module's upstreams, with what they recorded cleared and their behaviour reset."""
    from tests.fake_upstream import USAGE

    for upstream in upstreams.values():
        upstream.received.clear()
        upstream.behaviour = "ok"
        upstream.cancelled.clear()
        upstream.finish.clear()
        upstream.generation_s, upstream.generations_cancelled = 5.0, 0
        upstream.usage, upstream.delay_s, upstream.huge_mb = USAGE, 1.0, 80
    return upstreams


@pytest.fixture(scope="module")
def grpc_classifier(trained_artifact: Path) -> Iterator[ServerThread]:
    """The gRPC service on the test model, in this process, for a module's tests."""
    from serving.service.limits import ServerLimits
    from tests.grpc_server import ServerThread

    running = ServerThread(model_dir=trained_artifact, limits=ServerLimits())
    yield running
    running.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free port (the test is skipped, saying why, without one)."""
    from tests.redis_server import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    pytest.importorskip("redis", reason="the redis client is not installed: pip install 'promptier[redis]'")
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def dispatcher(fresh: dict[str, Upstream], grpc_classifier: ServerThread, tmp_path: Path) -> Iterator[Dispatcher]:
    """A dispatcher in front of the module's upstreams and gRPC classifier, logging to tmp_path/decisions.jsonl."""
    from tests.dispatcher_harness import Dispatcher, dispatcher_config

    running = Dispatcher(dispatcher_config(fresh, grpc_classifier.target, tmp_path / "decisions.jsonl"))
    yield running
    running.stop()


class TokenizerPanic(BaseException):
    """What `tokenizers` raises on a Rust panic (pyo3's PanicException): not an Exception."""


@pytest.fixture
def tokenizer_panics(monkeypatch: pytest.MonkeyPatch) -> str:
    """A marker: from here on, a batch holding a text with it makes the tokenizer panic, as a bug in
    `tokenizers` can (it has panicked splitting text around added tokens); other batches encode as usual."""
    from classifier.tokenization import PromptEncoder

    marker = "PANIC"
    encode = PromptEncoder.encode_batch

    def panicking(self: PromptEncoder, texts: list[str]):  # type: ignore[no-untyped-def]
        if any(marker in text for text in texts):
            raise TokenizerPanic("AddedVocabulary bad split")
        return encode(self, texts)

    monkeypatch.setattr(PromptEncoder, "encode_batch", panicking)
    return marker
