"""A SIGTERM (or Ctrl-C) that reaches a bench or soak while it starts a process still stops that process.

`subprocess.Popen` waits for its child's exec before it returns; a signal acted on then, or before the
process is recorded where a `finally` stops it, would leave the process running after the tool exited
(a server in a session of its own, which no signal to the tool's group reaches). The tests send the
signal from inside `Popen`'s constructor, once the child runs: that moment, made certain."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from classifier.signals import exit_deferred, sigterm_as_exit


def test_a_sigterm_inside_a_deferred_block_exits_at_its_end() -> None:
    reached: list[str] = []
    with pytest.raises(SystemExit) as stopped, sigterm_as_exit():
        with exit_deferred():
            with exit_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("after the signal")
            reached.append("after the inner block")  # only the outermost block's end acts on it
        reached.append("after the outer block")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert reached == ["after the signal", "after the inner block"]


def test_ctrl_c_inside_a_deferred_block_interrupts_at_its_end() -> None:
    reached: list[str] = []
    with pytest.raises(KeyboardInterrupt), sigterm_as_exit(), exit_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the signal")
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_block_that_fails_still_acts_on_the_signal_it_deferred() -> None:
    with pytest.raises(SystemExit), sigterm_as_exit(), exit_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("the start failed")
    with sigterm_as_exit(), exit_deferred():
        pass  # nothing left pending from the block above


def test_a_repeated_signal_does_not_cut_short_the_stops_the_first_set_off() -> None:
    stopped: list[str] = []
    with pytest.raises(SystemExit) as exited, sigterm_as_exit():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:  # stopping what the tool started, while an impatient supervisor signals again
            os.kill(os.getpid(), signal.SIGTERM)
            stopped.append("the last process")
    assert exited.value.code == 128 + signal.SIGTERM and stopped == ["the last process"]


def test_a_sigterm_deferred_after_a_ctrl_c_is_the_one_acted_on() -> None:
    with pytest.raises(SystemExit) as exited, sigterm_as_exit(), exit_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert exited.value.code == 128 + signal.SIGTERM


def test_sigterm_unwinds_leaves_a_handler_the_program_set_alone() -> None:
    from classifier.signals import sigterm_unwinds

    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        with sigterm_unwinds():
            os.kill(os.getpid(), signal.SIGTERM)
            received.append(0)  # reached: no exit
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM, 0]


@contextlib.contextmanager
def _sigterm_at_start(monkeypatch: pytest.MonkeyPatch, number: int) -> Iterator[list[subprocess.Popen]]:
    """Every `subprocess.Popen` made in the block, recorded; the `number`-th sends this process a
    SIGTERM from inside its constructor, once its child runs. Whatever is still running at the end is
    killed, after the test has looked."""
    started: list[subprocess.Popen] = []
    real = subprocess.Popen

    class SignalledPopen(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)
            if len(started) == number:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(subprocess, "Popen", SignalledPopen)
    try:
        yield started
    finally:
        monkeypatch.setattr(subprocess, "Popen", real)
        for process in started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL) if _own_group(process) else process.kill()
                process.wait(30)


def _own_group(process: subprocess.Popen) -> bool:
    try:
        return os.getpgid(process.pid) == process.pid
    except ProcessLookupError:
        return False


def _still_running(started: list[subprocess.Popen]) -> list[list[str]]:
    """The commands of the started processes that have not ended (after up to 30 s each: the
    tool has asked them to stop, and they may take a moment to do it)."""
    running = []
    for process in started:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            running.append([str(part)[:60] for part in process.args])  # type: ignore[union-attr]
    return running


def _loadtest(tmp_path: Path) -> None:
    from serving.bench.loadgen import run_loadtest

    run_loadtest(None, ["hello"], [(1, 1, 1)], 1.0, generator="python")


def _train_bench_child(tmp_path: Path) -> None:
    from training.bench import run_child

    run_child([sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "run.log", timeout=600)


def _dispatch_bench(tmp_path: Path) -> None:
    from serving.bench.dispatch_bench import _run

    _run(None, tmp_path, 1, 1.0, {}, False)


def _soak(tmp_path: Path) -> None:
    from serving.bench.soak import SoakOptions, run_soak

    run_soak(SoakOptions(minutes=0.1, label_rows=10, slow_connections=0), tmp_path)


@pytest.mark.parametrize(("tool", "signalled_start"), [
    (_loadtest, 1),  # the server
    (_train_bench_child, 1),  # the training run
    (_dispatch_bench, 2),  # the classifier service, after the upstream
    (_soak, 2),  # the dispatcher, after the classifier service
], ids=["loadtest", "train-bench", "dispatch-bench", "soak"])
def test_a_sigterm_while_a_tool_starts_a_process_stops_every_process_it_started(
        tool: Callable[[Path], None], signalled_start: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _sigterm_at_start(monkeypatch, signalled_start) as started:
        with pytest.raises(SystemExit) as stopped, sigterm_as_exit():
            tool(tmp_path)
        assert stopped.value.code == 128 + signal.SIGTERM
        assert len(started) == signalled_start
        assert not _still_running(started), "left running after the tool exited"


def test_a_sigterm_while_the_litellm_bench_starts_its_proxy_stops_the_proxy(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of LiteLLM's price list on import
    pytest.importorskip("litellm")
    from serving.bench import litellm_bench

    # An orphaned proxy may end by itself once its config is deleted with the bench's scratch folder:
    # what must happen is that the bench stops it.
    stopped: list[litellm_bench.LiteLLMProxy] = []
    stop = litellm_bench.LiteLLMProxy.stop

    def recorded_stop(proxy: litellm_bench.LiteLLMProxy) -> None:
        stopped.append(proxy)
        stop(proxy)

    monkeypatch.setattr(litellm_bench.LiteLLMProxy, "stop", recorded_stop)
    with _sigterm_at_start(monkeypatch, 2) as started:  # the proxy, after the upstream
        with pytest.raises(SystemExit), sigterm_as_exit():
            litellm_bench.main(None, tmp_path / "bench.json", 1)
        assert len(started) == 2 and len(stopped) == 1 and stopped[0].process is started[1]
        assert not _still_running(started)
