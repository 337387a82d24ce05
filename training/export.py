"""ONNX export that checks itself against the torch model before anything is written."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from classifier import load as load_artifact
from classifier.artifact import (
    MODEL_INPUT_NAMES,
    MODEL_OUTPUT_NAME,
    UNFAMILIARITY_OUTPUT_NAME,
    ArtifactManifest,
    Rule,
    save_manifest,
    with_file_digests,
)
from classifier.artifact_layout import MODEL_FILE, TOKENIZER_FILE, member, staged_artifact
from classifier.errors import PromptierError
from classifier.policy import choose_tiers
from training.calibration import apply_temperatures

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

# The bars an export must clear on the parity set, or nothing is written.
MIN_TIER_AGREEMENT = 0.995
MAX_PROBABILITY_DIFF = 0.02
MIN_PARITY_PROMPTS = 500
# A routing decision this close to its threshold is a tie at float precision (see `tier_agreement`).
TIE_TOLERANCE = 1e-6
# The unquantized export, in the directory being written only: removed before the artifact is complete.
FP32_SCRATCH_FILE = "model.fp32.onnx"


def library_versions() -> dict[str, str]:
    """The versions of the libraries that write an artifact: torch exports the ONNX file, ONNX Runtime
    quantizes it and checks its parity, transformers and tokenizers make the tokenizer it reads."""
    import platform

    import onnxruntime
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
            "tokenizers": tokenizers.__version__}


class ExportParityError(PromptierError):
    """The exported model disagrees with the torch model beyond the named tolerances."""


@dataclass(frozen=True)
class ParityReport:
    prompts: int
    tier_agreement: float
    max_probability_diff: float
    quantization: str

    @property
    def passed(self) -> bool:
        return self.tier_agreement >= MIN_TIER_AGREEMENT and self.max_probability_diff <= MAX_PROBABILITY_DIFF


class _Exported(nn.Module):
    """The model as exported: positional inputs, its outputs unchanged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.model(input_ids, attention_mask)


def export_onnx(model: nn.Module, path: Path, max_tokens: int) -> None:
    """fp32 ONNX with dynamic batch and sequence axes; a model that returns (logits, unfamiliarity)
    gets both outputs."""
    model.eval()
    dummy_ids = torch.ones((2, max_tokens), dtype=torch.long)
    dummy_mask = torch.ones((2, max_tokens), dtype=torch.long)
    with torch.no_grad():
        outputs = [MODEL_OUTPUT_NAME] + ([UNFAMILIARITY_OUTPUT_NAME]
                                         if isinstance(model(dummy_ids, dummy_mask), tuple) else [])
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            **{name: {0: "batch"} for name in outputs}}
    torch.onnx.export(
        _Exported(model).eval(), (dummy_ids, dummy_mask), str(path),
        input_names=list(MODEL_INPUT_NAMES), output_names=outputs,
        dynamic_axes=axes, opset_version=17, dynamo=False,
    )


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8, per-channel: fastest here, and per-tensor lost more accuracy."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)


def store_embedding_tables(source: Path, target: Path, storage: Literal["fp16", "int8"],
                           min_elements: int = 1_000_000) -> int:
    """Copy `source` with every large Gather table stored compactly and turned back into fp32 after
    the lookup: as float16 (`fp16`), or as int8 rows with one fp32 scale per row (`int8`: each row
    divided by its largest magnitude over 127, so no row loses more than half a step of its own range).

    A token-embedding table is most of a small model's file and memory, and a lookup reads only a
    few rows, so shrinking the table costs nothing at run time. The lookups are a Cast (and, for int8,
    a Mul by the row scales), exact on every CPU: no integer matrix kernels whose rounding differs
    between instruction sets, and the rest of the graph stays fp32. Returns how many tables were
    converted.
    """
    import onnx
    from onnx import TensorProto

    graph_model = onnx.load(str(source))
    graph = graph_model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    converted = 0
    for node in reversed(list(graph.node)):
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != TensorProto.FLOAT or np.prod(table.dims) < min_elements:
            continue
        (_store_fp16_table if storage == "fp16" else _store_int8_rows)(graph, node, table)
        converted += 1
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(target))
    return converted


def _store_fp16_table(graph: onnx.GraphProto, lookup: onnx.NodeProto, table: onnx.TensorProto) -> None:
    from onnx import TensorProto, helper, numpy_helper

    output = lookup.output[0]
    lookup.output[0] = f"{output}_fp16"
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), table.name))
    cast = helper.make_node("Cast", [lookup.output[0]], [output], to=TensorProto.FLOAT,
                            name=f"{lookup.name or table.name}_to_fp32")
    _insert_nodes(graph, list(graph.node).index(lookup) + 1, [cast])


def _store_int8_rows(graph: onnx.GraphProto, lookup: onnx.NodeProto, table: onnx.TensorProto) -> None:
    """int8 rows and a Gather of their scales. Where the rows only feed a pooling MatMul (weights
    [.., heads, tokens] @ rows [.., tokens, dim]), the scales multiply the weights each row gets instead
    of the rows: the same product, heads x tokens multiplies instead of tokens x dim."""
    from onnx import TensorProto, helper, numpy_helper

    values = numpy_helper.to_array(table)
    scales = np.abs(values).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    table.CopyFrom(numpy_helper.from_array(np.round(values / scales[:, None]).astype(np.int8), table.name))
    name, output = lookup.name or table.name, lookup.output[0]
    rows, row_scales = f"{output}_int8", f"{output}_int8_scales"
    lookup.output[0] = rows
    pooling = _sole_pooling_reader(graph, output)
    scale_table = f"{table.name}_row_scales"
    graph.initializer.append(numpy_helper.from_array(
        (scales if pooling is not None else scales[:, None]).astype(np.float32), scale_table))
    gather_scales = helper.make_node("Gather", [scale_table, lookup.input[1]], [row_scales], axis=0,
                                     name=f"{name}_row_scales")
    if pooling is None:
        _insert_nodes(graph, list(graph.node).index(lookup) + 1, [
            helper.make_node("Cast", [rows], [f"{rows}_fp32"], to=TensorProto.FLOAT, name=f"{name}_to_fp32"),
            gather_scales,
            helper.make_node("Mul", [f"{rows}_fp32", row_scales], [output], name=f"{name}_scaled"),
        ])
        return
    # Scales [.., tokens] -> [.., 1, tokens], multiplied into the pooling weights.
    weights, scaled_weights, axis = pooling.input[0], f"{pooling.name}_weights_row_scaled", f"{row_scales}_axis"
    graph.initializer.append(numpy_helper.from_array(np.array([-2], dtype=np.int64), axis))
    pooling.input[0] = scaled_weights
    _insert_nodes(graph, list(graph.node).index(pooling), [
        helper.make_node("Cast", [rows], [output], to=TensorProto.FLOAT, name=f"{name}_to_fp32"),
        gather_scales,
        helper.make_node("Unsqueeze", [row_scales, axis], [f"{row_scales}_row"], name=f"{name}_row_scales_unsqueeze"),
        helper.make_node("Mul", [weights, f"{row_scales}_row"], [scaled_weights], name=f"{pooling.name}_row_scale"),
    ])


def _sole_pooling_reader(graph: onnx.GraphProto, rows: str) -> onnx.NodeProto | None:
    """The MatMul that weights `rows` (its second input, not its first), where nothing else reads them."""
    readers = [node for node in graph.node if rows in node.input]
    if len(readers) == 1 and readers[0].op_type == "MatMul" and list(readers[0].input) == [readers[0].input[0], rows] \
            and readers[0].input[0] != rows:
        return readers[0]
    return None


def _insert_nodes(graph: onnx.GraphProto, position: int, added: list[onnx.NodeProto]) -> None:
    """Insert `added`, in order, at `position` of the graph's (topologically sorted) node list."""
    for offset, extra in enumerate(added):
        graph.node.insert(position + offset, extra)


def check_parity(directory: Path, torch_probabilities: np.ndarray, texts: Sequence[str],
                 threshold: float, quantization: str, rule: Rule = "ratio") -> ParityReport:
    """Load `directory` through the runtime and compare its probabilities and tiers with torch's."""
    runtime = load_artifact(directory, threads=2)
    onnx_probabilities = np.concatenate(
        [runtime.probabilities(texts[i : i + 64])[0] for i in range(0, len(texts), 64)]
    )
    return ParityReport(
        prompts=len(texts),
        tier_agreement=tier_agreement(onnx_probabilities, torch_probabilities, threshold, rule),
        max_probability_diff=float(np.max(np.abs(onnx_probabilities - torch_probabilities))),
        quantization=quantization,
    )


def tier_agreement(onnx_probabilities: np.ndarray, torch_probabilities: np.ndarray, threshold: float,
                   rule: Rule = "ratio") -> float:
    """Share of prompts both engines route alike. A prompt whose tier, in either engine, changes when the
    threshold moves by TIE_TOLERANCE either way sits on the threshold to float precision (a threshold chosen
    among near-saturated scores can be 1e-10, where fp32 rounds a relative score to 0): it counts as
    agreeing whichever tier ONNX picks, as no export could reproduce that digit. Quantization errors
    (1e-3 and up) still count."""
    allowed = np.ones(torch_probabilities.shape[1], dtype=bool)
    same = choose_tiers(onnx_probabilities, threshold, allowed, rule) == choose_tiers(
        torch_probabilities, threshold, allowed, rule)
    tied = np.zeros(len(torch_probabilities), dtype=bool)
    for probabilities in (torch_probabilities, onnx_probabilities):  # on the threshold in either engine
        tied |= choose_tiers(probabilities, threshold - TIE_TOLERANCE, allowed, rule) != choose_tiers(
            probabilities, threshold + TIE_TOLERANCE, allowed, rule)
    return float(np.mean(same | tied))


def check_parity_set(parity_texts: Sequence[str]) -> None:
    """Raises ValueError when there are too few parity prompts to hold an export to the bars."""
    if len(parity_texts) < MIN_PARITY_PROMPTS:
        raise ValueError(f"parity needs at least {MIN_PARITY_PROMPTS} prompts, got {len(parity_texts)}")


def export_into(
    model: nn.Module,
    manifest: ArtifactManifest,
    tokenizer_file: Path,
    parity_texts: Sequence[str],
    torch_logits: Callable[[Sequence[str]], np.ndarray],
    staging: Path,
    quantize: bool,
    extra_files: dict[str, str] | None = None,
    extra_paths: dict[str, Path] | None = None,
) -> tuple[ArtifactManifest, ParityReport]:
    """Export the model, tokenizer and manifest into `staging`, a directory of `staged_artifact`.

    `extra_files` (name: text) and `extra_paths` (name: file to copy) are written beside the model,
    under names of the artifact layout. Tries int8 first when `quantize` is set; if int8 misses the
    parity bars, fp32 is tried and the manifest records why.

    Raises:
        ExportParityError: fp32 misses the bars too (the caller's staged directory is then discarded).
        ValueError: too few parity prompts, or an extra file the layout does not name.
    """
    check_parity_set(parity_texts)
    torch_probabilities = apply_temperatures(torch_logits(parity_texts), manifest.calibration.temperatures)
    threshold = manifest.policy.thresholds[manifest.policy.default_mode]
    fp32_path = staging / FP32_SCRATCH_FILE
    export_onnx(model, fp32_path, manifest.truncation.max_tokens)
    shutil.copyfile(tokenizer_file, member(staging, TOKENIZER_FILE))
    for name, text in (extra_files or {}).items():
        member(staging, name).write_text(text, encoding="utf-8")
    for name, source in (extra_paths or {}).items():
        shutil.copyfile(source, member(staging, name))
    model_path = member(staging, MODEL_FILE)
    # Smallest first; the first that clears the parity bars ships. int8 matrix kernels only where the
    # config asks for quantization: their rounding differs between CPUs. int8 table rows are exact
    # lookups, so every export tries them.
    attempts = ["int8"] if quantize else []
    attempts += ["fp32 (int8 embeddings)", "fp32 (fp16 embeddings)", "fp32"]
    table_storage: dict[str, Literal["fp16", "int8"]] = {"fp32 (int8 embeddings)": "int8",
                                                         "fp32 (fp16 embeddings)": "fp16"}
    failures: list[str] = []
    for quantization in attempts:
        if quantization == "int8":
            quantize_int8(fp32_path, model_path)
        elif quantization in table_storage:
            if not store_embedding_tables(fp32_path, model_path, table_storage[quantization]):
                continue  # no table large enough to matter
        else:
            shutil.copyfile(fp32_path, model_path)
        note = {"quantization": quantization, "parity_failures": "; ".join(failures)}
        candidate = with_file_digests(manifest.model_copy(update={"architecture": {**manifest.architecture, **note}}),
                                      staging)
        save_manifest(candidate, staging)
        report = check_parity(staging, torch_probabilities, parity_texts, threshold, quantization,
                              manifest.policy.rule)
        if report.passed:
            break
        failures.append(f"{quantization}: agreement {report.tier_agreement:.4f}, "
                        f"max diff {report.max_probability_diff:.4f}")
        log.warning("export parity failed for %s", failures[-1])
    else:
        raise ExportParityError(
            f"exported model disagrees with torch (need agreement >= {MIN_TIER_AGREEMENT}, "
            f"diff <= {MAX_PROBABILITY_DIFF}): {'; '.join(failures)}"
        )
    fp32_path.unlink()
    parity = {"prompts": report.prompts, "tier_agreement": report.tier_agreement,
              "max_probability_diff": report.max_probability_diff}
    candidate = candidate.model_copy(update={"metrics": {**candidate.metrics, "export_parity": parity}})
    save_manifest(candidate, staging)
    return candidate, report


def export_checkpoint(artifact: Path, checkpoint: Path, prompts: Sequence[str], out_dir: Path,
                      quantize: bool) -> tuple[ArtifactManifest, ParityReport]:
    """Re-export a trained model: the weights of a training checkpoint, the rest of an artifact it made.

    `artifact` gives the training config (to rebuild the architecture), the tokenizer, calibration,
    thresholds and metrics; `checkpoint` (a training work dir's `checkpoint.pt`) gives the weights.
    The parity check runs on `prompts` (at least MIN_PARITY_PROMPTS distinct ones) plus one prompt far past
    the token limit, so the new file is held to the same bars as at training time. Use it to try another
    quantization, or to re-export after an ONNX Runtime upgrade, without retraining.

    A model with familiarity gets its unfamiliarity output back from the statistics its run wrote into the
    checkpoint once training finished.

    Raises:
        ExportParityError: no candidate clears the bars (nothing is written).
        ValueError: too few prompts, or a checkpoint that does not fit the artifact's architecture.
        PromptierError: the checkpoint holds more than tensors and plain data (it is not unpickled), is
            another run's (its run key is not the one the manifest records), or lacks the familiarity
            statistics the artifact's model needs.
    """
    from classifier.artifact import load_manifest
    from classifier.artifact_layout import MODEL_CARD_FILE, WEIGHTS_RECORDS, write_member_text
    from classifier.tokenization import PromptEncoder
    from training.config import TrainConfig
    from training.model import (
        BagTierModel,
        FeatureStatistics,
        WithUnfamiliarity,
        backbone_directory,
        build_model,
        load_encoder,
    )
    from training.model_card import render_model_card
    from training.recorded_paths import recorded_path
    from training.trainer import FAMILIARITY_STATISTICS, load_checkpoint, predict_logits, tokenize_all

    manifest = load_manifest(artifact)
    config = TrainConfig.model_validate(manifest.training["config"])
    state = load_checkpoint(checkpoint)
    fit = manifest.training.get("fit")
    expected = fit.get("run_key") if isinstance(fit, dict) else None
    if expected is not None and state.get("run_key", expected) != expected:
        raise PromptierError(f"{checkpoint} is another run's checkpoint, not the one that trained {artifact} "
                             "(trained after it, or on other logs): give that run's checkpoint "
                             f"({manifest.training.get('checkpoint')} where training ran)")
    trained_steps = fit.get("steps") if isinstance(fit, dict) else None
    if isinstance(trained_steps, int) and isinstance(state.get("step"), int) and state["step"] != trained_steps:
        # The run key leaves out how long a run goes on (max_steps): a rerun in the same work dir that
        # trained further writes a checkpoint of the same key and other weights.
        raise PromptierError(f"{checkpoint} holds the weights of step {state['step']}, and {artifact} was "
                             f"trained to step {trained_steps}: it is a later or earlier run's checkpoint")
    statistics = state.get(FAMILIARITY_STATISTICS)
    if manifest.familiarity is not None and not isinstance(statistics, dict):
        raise PromptierError(f"{checkpoint} holds no familiarity statistics, which the model of {artifact} "
                             "outputs: it was written before its run finished, or by a promptier train that did "
                             "not keep them; retrain to re-export this model")
    encoder = PromptEncoder.from_file(artifact / TOKENIZER_FILE, manifest.truncation)
    model, _ = build_model(config, load_encoder(backbone_directory(config.backbone)), len(manifest.tiers),
                           pad_id=encoder.pad_id)
    try:
        model.load_state_dict(state.get("model", state))
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint} does not fit the architecture of {artifact}: {exc}") from exc
    exported: torch.nn.Module = model
    if manifest.familiarity is not None:
        if not isinstance(model, BagTierModel) or not isinstance(statistics, dict):
            raise ValueError(f"{artifact} has familiarity, which only a bag student's export outputs")
        exported = WithUnfamiliarity(model, FeatureStatistics.from_tensors(statistics))
    # A log names each prompt once per model that answered it: counted per row, 200 prompts of three
    # models each would pass for the 500 the parity bars need.
    prompts = list(dict.fromkeys(prompts))
    texts = [*prompts, " ".join(prompts[:40])]

    def torch_logits(batch: Sequence[str]) -> np.ndarray:
        return predict_logits(model, tokenize_all(encoder, batch))

    # `versions` names the libraries that wrote the files, which are this export's (the point of a re-export
    # after an ONNX Runtime upgrade); those the model was trained with stay in `training`.
    manifest = manifest.model_copy(update={
        "architecture": {key: value for key, value in manifest.architecture.items()
                         if key not in ("quantization", "parity_failures")},
        "versions": library_versions(),
        # The checkpoint it was exported from, wherever that is now (an artifact and its work dir moved
        # together elsewhere): what a continuation (--init-from) of the re-exported artifact looks for.
        "training": {**manifest.training, "versions": manifest.training.get("versions", manifest.versions),
                     "checkpoint": recorded_path(checkpoint)}})
    carried = {name: artifact / name for name in WEIGHTS_RECORDS if (artifact / name).is_file()}
    check_parity_set(texts)
    with staged_artifact(out_dir) as staging:
        written, report = export_into(exported, manifest, artifact / TOKENIZER_FILE, texts, torch_logits, staging,
                                      quantize, extra_paths=carried)
        # Rendered anew, not copied: the card states the quantization and parity of this export.
        write_member_text(staging, MODEL_CARD_FILE, render_model_card(written, staging))
    return written, report
