"""The sentence-embedding cache survives an interrupted run: finished batches are not embedded again."""

from pathlib import Path

import numpy as np
import pytest

from classifier.artifact import TruncationConfig
from tests.conftest import count_embedded_prompts

TRUNCATION = TruncationConfig(max_tokens=32, head_chars=256, tail_chars=128, head_fraction=0.5)


class Interrupted(Exception):
    """Stands for Ctrl-C part way through embedding."""


def test_an_interrupted_run_keeps_the_batches_it_finished(tiny_backbone: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from training import baselines

    prompts = [f"prompt number {i} " + "word " * (i % 7) for i in range(40)]
    real_batches = baselines.embedded_batches

    def interrupted_after_three(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        for count, (positions, vectors) in enumerate(real_batches(*args, **kwargs)):  # type: ignore[arg-type]
            if count == 3:
                raise Interrupted
            yield positions, vectors

    monkeypatch.setattr(baselines, "embedded_batches", interrupted_after_three)
    with pytest.raises(Interrupted):
        baselines.sentence_embeddings(prompts, tiny_backbone, TRUNCATION, tmp_path, batch_size=4, save_every=2)

    monkeypatch.undo()  # the real embedding pass again, now counted
    embedded = count_embedded_prompts(monkeypatch)
    resumed = baselines.sentence_embeddings(prompts, tiny_backbone, TRUNCATION, tmp_path, batch_size=4)
    # Two batches of four were saved before the interruption (the third was not yet due to be saved).
    assert embedded == [len(prompts) - 8]

    fresh = baselines.sentence_embeddings(prompts, tiny_backbone, TRUNCATION, tmp_path / "fresh", batch_size=4)
    np.testing.assert_allclose(resumed, fresh, atol=1e-6)
    assert embedded == [len(prompts) - 8, len(prompts)]


def test_a_damaged_cache_is_embedded_again_not_fatal(tiny_backbone: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache only saves time: one cut short (a full disk) is read as empty, embedded again and rewritten."""
    from training import baselines

    prompts = [f"prompt number {i}" for i in range(12)]
    first = baselines.sentence_embeddings(prompts, tiny_backbone, TRUNCATION, tmp_path, batch_size=4)
    (cache,) = tmp_path.glob("embeddings-*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    embedded = count_embedded_prompts(monkeypatch)
    again = baselines.sentence_embeddings(prompts, tiny_backbone, TRUNCATION, tmp_path, batch_size=4)
    np.testing.assert_allclose(again, first, atol=1e-6)
    assert embedded == [len(prompts)]
    assert [path.name for path in tmp_path.iterdir()] == [cache.name]  # rewritten whole, no temporary left
    baselines.sentence_embeddings(prompts, tiny_backbone, TRUNCATION, tmp_path, batch_size=4)
    assert embedded == [len(prompts)]  # and read back
