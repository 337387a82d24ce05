"""The torch-free runtime: loading, validation, truncation, bad input.

Most tests use the shipped model, so they also run without the training extra
(`pytest -p tests.without_training tests/test_runtime.py`); those that need a freshly trained model
(an fp32 export of known shape, a tokenizer to cut by hand) skip there.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import classifier
from classifier.artifact import TruncationConfig
from classifier.errors import ArtifactError, InvalidInputError
from classifier.tokenization import PromptEncoder


def test_missing_files_are_refused(shipped_artifact_copy: Path) -> None:
    for name in ("model.onnx", "tokenizer.json", "manifest.json"):
        (shipped_artifact_copy / name).rename(shipped_artifact_copy / f"{name}.bak")
        with pytest.raises(ArtifactError, match=f"missing {name}"):
            classifier.load(shipped_artifact_copy)
        (shipped_artifact_copy / f"{name}.bak").rename(shipped_artifact_copy / name)
    with pytest.raises(ArtifactError, match="does not exist"):
        classifier.load(shipped_artifact_copy / "nowhere")


def test_corrupt_files_are_refused(shipped_artifact_copy: Path) -> None:
    model = shipped_artifact_copy / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError, match="not a loadable ONNX model"):
        classifier.load(shipped_artifact_copy)
    model.write_bytes(good)
    (shipped_artifact_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not a valid tokenizer"):
        classifier.load(shipped_artifact_copy)


def test_manifest_inconsistent_with_model_is_refused(shipped_artifact_copy: Path) -> None:
    manifest_path = shipped_artifact_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tiers"].append({"name": "huge", "input_usd_per_mtok": 9, "output_usd_per_mtok": 9})
    manifest["calibration"]["temperatures"].append(1.0)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outputs 3 scores per prompt but the manifest has 4 tiers"):
        classifier.load(shipped_artifact_copy)
    manifest["calibration"]["temperatures"].pop()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="4 tiers"):
        classifier.load(shipped_artifact_copy)
    manifest_path.write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        classifier.load(shipped_artifact_copy)
    # Tiers edited out of price order would serve routing backwards: what it is sure of to the wrong end.
    manifest["tiers"] = manifest["tiers"][:3][::-1]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="tiers are not listed cheapest first") as info:
        classifier.load(shipped_artifact_copy)
    assert "large" not in str(info.value)  # names and prices are not quoted
    manifest["tiers"] = manifest["tiers"][::-1]
    manifest["tiers"][1]["name"] = " medium"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="a tier name is blank or has white space at its start or end"):
        classifier.load(shipped_artifact_copy)


def test_bad_inputs_raise_clear_errors(shipped_artifact: Path) -> None:
    runtime = classifier.load(shipped_artifact)
    for bad, message in (("", "empty"), ("   \n", "empty"), (42, "must be a string"),
                         (b"\xff\xfe", "not valid UTF-8"), ("x" * 2_000_001, "limit")):
        with pytest.raises(InvalidInputError, match=message) as info:
            runtime.classify(bad)  # type: ignore[arg-type]
        assert not str(info.value).startswith("item")  # one prompt: no index into a list it never sent
    with pytest.raises(InvalidInputError, match="item 1: prompt is empty"):
        runtime.classify_batch(["fine", ""])
    with pytest.raises(InvalidInputError, match="not one string"):
        runtime.classify_batch("a string")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="unknown tier"):
        runtime.classify("hi", classifier.RoutingRequest(allowed_tiers=("gigantic",)))
    assert runtime.classify("fine").tier in runtime.tier_names  # still serving after errors


def test_batch_equals_single_and_results_are_typed(shipped_artifact: Path) -> None:
    runtime = classifier.load(shipped_artifact)
    texts = ["hello cat", "prove the lemma about entropy " * 3, "sort a python list", "héllo wörld 你好 🙂"]
    batch = runtime.classify_batch(texts)
    for text, result in zip(texts, batch, strict=True):
        single = runtime.classify(text)
        assert single.tier == result.tier
        # The fixture exports fp32 (chosen explicitly), where padding neighbours change nothing beyond
        # float rounding; int8 would shift scores by up to the export's parity tolerance.
        assert all(abs(single.scores[k] - result.scores[k]) <= 1e-5 for k in single.scores)
        assert set(result.scores) == {"small", "medium", "large"}
        assert 0 <= result.threshold <= 1 and result.tokens >= 3
    assert runtime.classify("hello", classifier.RoutingRequest(allowed_tiers=("medium",))).tier == "medium"


def test_truncation_keeps_head_and_tail(tiny_backbone: Path) -> None:
    config = TruncationConfig(max_tokens=12, head_chars=40, tail_chars=20, head_fraction=0.5)
    encoder = PromptEncoder.from_file(tiny_backbone / "tokenizer.json", config)
    short = encoder.encode_batch(["hello cat"])
    assert short.truncated == [False] and short.token_counts == [4]
    text = "hello " * 3 + "python " * 50 + "prove lemma"
    cut, was_cut = encoder.cut_characters(text)
    assert was_cut and cut.startswith("hello hello hello") and cut.endswith("prove lemma")
    batch = encoder.encode_batch([text])
    assert batch.truncated == [True] and batch.token_counts == [12]
    vocabulary = encoder._tokenizer
    ids = batch.input_ids[0].tolist()
    assert ids[1:4] == [vocabulary.token_to_id("hello")] * 3  # head kept
    assert ids[-3:-1] == [vocabulary.token_to_id("prove"), vocabulary.token_to_id("lemma")]  # tail kept


def test_huge_prompt_is_bounded(shipped_artifact: Path) -> None:
    runtime = classifier.load(shipped_artifact)
    result = runtime.classify("prove the theorem " * 60_000)  # ~1 MB
    assert result.truncated and result.tokens == runtime.manifest.truncation.max_tokens


def test_runtime_imports_and_runs_without_torch(shipped_artifact: Path) -> None:
    code = (
        "import sys, classifier; r = classifier.load(sys.argv[1]); r.classify('hello cat'); "
        "import serving; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'training')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(shipped_artifact)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("where", "value", "field"), [
    ("temperature", float("nan"), r"calibration\.temperatures\[1\]"),
    ("temperature", float("inf"), r"calibration\.temperatures\[1\]"),
    ("threshold", float("nan"), r"policy\.thresholds\[\.\.\.\]"),
    ("threshold", float("-inf"), r"policy\.thresholds\[\.\.\.\]"),
    ("curve", float("nan"), r"policy\.curve\[0\]\.threshold"),
])
def test_non_finite_numbers_in_the_manifest_are_refused_at_load(shipped_artifact_copy: Path, where: str, value: float,
                                                                field: str) -> None:
    """json reads NaN and Infinity; a NaN temperature would load and serve NaN scores."""
    path = shipped_artifact_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    if where == "temperature":
        manifest["calibration"]["temperatures"][1] = value
    elif where == "threshold":
        manifest["policy"]["thresholds"][manifest["policy"]["default_mode"]] = value
    else:
        manifest["policy"]["curve"] = [{"threshold": value, "top_share": 0.5, "quality": 0.5, "cost_usd": 1.0}]
    path.write_text(json.dumps(manifest))  # writes NaN / Infinity, as json.dumps does by default
    with pytest.raises(ArtifactError, match=field + ": Input should be a finite number"):
        classifier.load(shipped_artifact_copy)


@pytest.mark.parametrize(("where", "value", "field"), [
    ("temperature", 1e30, r"calibration\.temperatures: .*between 0\.001 and 1000"),  # every score 0.5
    ("temperature", 1e-37, r"calibration\.temperatures: .*between 0\.001 and 1000"),  # scores 0, 1 or NaN
    ("curve threshold", 5.0, r"policy\.curve\[0\]\.threshold: Input should be less than or equal to 1"),
    ("curve top_share", -3.0, r"policy\.curve\[0\]\.top_share: Input should be greater than or equal to 0"),
])
def test_finite_numbers_the_runtime_cannot_serve_are_refused_at_load(shipped_artifact_copy: Path, where: str,
                                                                     value: float, field: str) -> None:
    """Finite in the manifest, yet broken where they are used: a temperature float32 cannot hold, or a
    curve point a `top_share` request would be served as its threshold (5.0 sends every one to the top)."""
    path = shipped_artifact_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    if where == "temperature":
        manifest["calibration"]["temperatures"] = [value] * len(manifest["tiers"])
    else:
        manifest["policy"]["curve"][0][where.split()[1]] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=field):
        classifier.load(shipped_artifact_copy)


def test_manifest_errors_never_quote_the_file(shipped_artifact_copy: Path) -> None:
    """Admin.Reload passes these messages to its caller, who may name a file they cannot read."""
    path = shipped_artifact_copy / "manifest.json"
    good = json.loads(path.read_text())
    for content in ({"api_key": "SECRET-1"},
                    {**good, "policy": {**good["policy"], "SECRET-2": 1}},
                    {**good, "model_version": ["SECRET-3"]},
                    {**good, "policy": {**good["policy"], "default_mode": "SECRET-4"}},
                    {**good, "tiers": [{**tier, "name": "SECRET-5"} for tier in good["tiers"]]}):
        path.write_text(json.dumps(content))
        with pytest.raises(ArtifactError) as info:
            classifier.load(shipped_artifact_copy)
        assert "SECRET" not in str(info.value) and "manifest.json is invalid" in str(info.value)
    path.write_text('{"model_version": "SECRET-6", oops}')
    with pytest.raises(ArtifactError, match="not valid JSON") as info:
        classifier.load(shipped_artifact_copy)
    assert "SECRET" not in str(info.value)
    for broken, reason in (('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
                           ('{"model_version": "SECRET-8", "schema_version": ' + "9" * 5000 + "}", "digits")):
        path.write_text(broken)
        with pytest.raises(ArtifactError, match=reason) as info:
            classifier.load(shipped_artifact_copy)
        assert "SECRET" not in str(info.value) and "999" not in str(info.value)
    path.write_text(json.dumps(good))
    (shipped_artifact_copy / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "SECRET-7"}}')
    with pytest.raises(ArtifactError, match="not a valid tokenizer") as info:
        classifier.load(shipped_artifact_copy)
    assert "SECRET" not in str(info.value)


def test_a_cheap_floor_in_the_manifest_routes_mode_requests_only(artifact_copy: Path) -> None:
    """A floor of 0 sends every mode request it covers to the cheapest tier; explicit thresholds and
    modes without a floor route as before."""
    from classifier.policy import RoutingRequest

    prompts = [f"question {i}: how many {i} are in {i * 7}?" for i in range(40)]
    before = classifier.load(artifact_copy)
    top = RoutingRequest(threshold=1.0)
    assert {r.tier for r in before.classify_batch(prompts, top)} == {before.tier_names[-1]}
    quality = [r.tier for r in before.classify_batch(prompts, RoutingRequest(mode="quality"))]
    cheapest = before.tier_names[0]
    assert {r.tier for r in before.classify_batch(prompts) if r.decided_by == "model"} != {cheapest}
    path = artifact_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    default = manifest["policy"]["default_mode"]
    manifest["policy"]["cheap_floors"] = {default: 0.0}
    path.write_text(json.dumps(manifest))
    after = classifier.load(artifact_copy)
    decided = after.classify_batch(prompts)
    assert {r.tier for r in decided if r.decided_by == "model"} == {cheapest}
    assert {r.tier for r in after.classify_batch(prompts, top)} == {after.tier_names[-1]}
    if default != "quality":
        assert [r.tier for r in after.classify_batch(prompts, RoutingRequest(mode="quality"))] == quality


def test_each_decision_follows_from_the_scores_it_reports(shipped_artifact: Path) -> None:
    """A caller who applies the vectorised policy to a result's own scores, threshold and cheap floor gets
    the runtime's tier, for every mode, explicit threshold and allowed-tier set, batched or not."""
    import numpy as np

    from classifier.policy import RoutingRequest, allowed_mask, choose_tiers, resolve_floor, resolve_threshold

    runtime = classifier.load(shipped_artifact)
    policy, names = runtime.manifest.policy, runtime.tier_names
    prompts = ["hi", "What is the capital of France?", "Prove that there are infinitely many primes.",
               "Write a lock-free queue in C++ with tests.", "Traduis « bonjour » en anglais.",
               *[f"question {i}: how many {i} are in {i * 7}?" for i in range(30)]]
    requests = [None, *(RoutingRequest(mode=mode) for mode in policy.thresholds),
                *(RoutingRequest(threshold=t) for t in (0.0, 0.3, 0.45, 0.5, 0.55, 1.0)),
                RoutingRequest(allowed_tiers=(names[0], names[-1])), RoutingRequest(allowed_tiers=(names[1],)),
                RoutingRequest(mode=policy.default_mode, allowed_tiers=tuple(names[1:]))]
    checked = 0
    for request in requests:
        allowed = allowed_mask(names, None if request is None else request.allowed_tiers)
        threshold, floor = resolve_threshold(policy, request), resolve_floor(policy, request)
        results = runtime.classify_batch(prompts, request)
        assert [runtime.classify(prompt, request).tier for prompt in prompts[:5]] == [r.tier for r in results[:5]]
        for result in results:
            if result.decided_by != "model":
                continue
            assert (result.threshold, result.cheap_floor) == (threshold, floor)
            scores = np.array([[result.scores[name] for name in names]])
            expected = choose_tiers(scores, result.threshold, allowed, policy.rule, result.cheap_floor)[0]
            assert result.tier == names[expected], (result, request)
            checked += 1
    assert checked > len(prompts) * len(requests) // 2  # the prior did not decide most of them


def test_prompts_with_nothing_the_model_reads_are_refused_not_routed(shipped_artifact: Path) -> None:
    """The tokenizer deletes these characters: the model would score a bare [CLS] [SEP] as an easy prompt."""
    runtime = classifier.load(shipped_artifact)
    for bad in ("\u200b", "\x00\x01", "\ufeff", "\u00a0\u200b\u200b"):
        with pytest.raises(InvalidInputError, match="no text the model reads"):
            runtime.classify(bad)
    alone, refused = runtime.classify_items([("What is 2 + 2?", None), ("\u200b", None)])
    assert isinstance(alone, classifier.ClassificationResult) and isinstance(refused, InvalidInputError)
    assert runtime.classify("\ufeffWhat is 2 + 2?").tier == alone.tier  # a byte-order mark before text is fine


def test_a_prompt_the_vocabulary_cannot_read_at_all_is_routed_by_the_prior(shipped_artifact: Path) -> None:
    runtime = classifier.load(shipped_artifact)
    for unreadable in ("ሰላም ነው እንዴት ነህ", "🐶🐱🐭"):  # [UNK], every token
        result = runtime.classify(unreadable)
        assert result.decided_by == "prior" and result.familiarity == 0.0  # nothing in it is familiar
    for partly in ("I just got a new puppy, look! 🐶", "ሰላም ነው እንዴት ነህ?"):  # a token the model knows
        assert runtime.classify(partly).decided_by == "model"
    # White space the model never reads does not move what the prior decides.
    alone, padded = runtime.classify("🐶🐱🐭"), runtime.classify("🐶🐱🐭" + " " * 3000)
    assert padded.decided_by == "prior" and padded.tier == alone.tier == "small"


def test_malformed_items_get_their_own_errors(shipped_artifact: Path) -> None:
    runtime = classifier.load(shipped_artifact)
    good, bad_policy, not_a_pair = runtime.classify_items(
        [("hi there", None), ("hello", {"mode": "cost"}), "hello"])  # type: ignore[list-item]
    assert isinstance(good, classifier.ClassificationResult)
    assert isinstance(bad_policy, InvalidInputError) and "RoutingRequest or None, got dict" in str(bad_policy)
    assert isinstance(not_a_pair, InvalidInputError) and "pair, got str" in str(not_a_pair)
    with pytest.raises(InvalidInputError, match="got dict"):
        runtime.classify("hello", {"mode": "cost"})  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"^unknown mode 'x'"):  # the shared policy's error is no item's
        runtime.classify_batch(["a", "b"], classifier.RoutingRequest(mode="x"))


def test_batches_take_any_collection_of_prompts_and_refuse_what_is_not_one(shipped_artifact: Path) -> None:
    """A generator is read as the list it yields, as classify_batch always read it; None, one string or
    bytes (whose characters would each be an item) are refused by name, never a TypeError or an error
    per character."""
    runtime = classifier.load(shipped_artifact)
    prompts = ["hello there", "prove the lemma about entropy"]
    expected = [result.tier for result in runtime.classify_batch(prompts)]
    items = runtime.classify_items((prompt, None) for prompt in prompts)
    assert [item.tier for item in items] == expected  # type: ignore[union-attr]
    assert [result.tier for result in runtime.classify_batch(prompt for prompt in prompts)] == expected
    for method, what in ((runtime.classify_batch, "prompts"), (runtime.classify_items, "pairs")):
        for bad, message in ((None, "got NoneType"), ("hello", "not one string"), (b"hello", "not one bytes object"),
                             (42, "got int"), ({"hello": None}, "not a dict"), ({"hello"}, "not a set"),
                             (frozenset({"hello"}), "not a frozenset")):
            with pytest.raises(InvalidInputError, match=f"^{method.__name__} takes a list of .*{what}.*{message}"):
                method(bad)  # type: ignore[operator]


def test_a_tokenizer_panic_fails_only_its_own_prompts(shipped_artifact: Path, tokenizer_panics: str) -> None:
    runtime = classifier.load(shipped_artifact)
    first, failed, last = runtime.classify_items([("hello there", None), (f"{tokenizer_panics} here", None),
                                                  ("Prove that there are infinitely many primes.", None)])
    assert isinstance(failed, classifier.ModelError) and "TokenizerPanic: AddedVocabulary bad split" in str(failed)
    assert isinstance(first, classifier.ClassificationResult) and isinstance(last, classifier.ClassificationResult)
    with pytest.raises(classifier.ModelError):
        runtime.classify(tokenizer_panics)
    with pytest.raises(classifier.ModelError, match=r"^item 1: "):
        runtime.classify_batch(["fine", tokenizer_panics])
    # In a batch of 64, the failing prompt is found by halving, not by running each prompt alone.
    session, runs = runtime._session, []
    run = session.run
    session.run = lambda outputs, feeds: runs.append(1) or run(outputs, feeds)  # type: ignore[method-assign]
    prompts = [f"question {i}: what is {i} + {i}?" for i in range(64)]
    prompts[37] = f"{tokenizer_panics} {prompts[37]}"
    outcomes = runtime.classify_items([(prompt, None) for prompt in prompts])
    assert [i for i, o in enumerate(outcomes) if isinstance(o, classifier.ModelError)] == [37]
    assert len(runs) < 32


def test_non_finite_scores_are_a_model_failure_never_a_decision(shipped_artifact: Path) -> None:
    """A NaN passes or fails every threshold alike: it would route with full confidence."""
    runtime = classifier.load(shipped_artifact)
    session = runtime._session
    run = session.run

    def nan_for_one_word_prompts(outputs, feeds):  # type: ignore[no-untyped-def]
        results = run(outputs, feeds)
        one_word = feeds["attention_mask"].sum(axis=1) == 3  # [CLS] word [SEP]
        results[0][one_word] = float("nan")
        return results

    session.run = nan_for_one_word_prompts  # type: ignore[method-assign]
    nan, scored = runtime.classify_items([("hello", None), ("Prove that there are infinitely many primes.", None)])
    assert isinstance(nan, classifier.ModelError) and "non-finite" in str(nan)
    assert isinstance(scored, classifier.ClassificationResult)


def test_artifacts_whose_parts_do_not_fit_are_refused_at_load(shipped_artifact_copy: Path) -> None:
    manifest_path, tokenizer_path = shipped_artifact_copy / "manifest.json", shipped_artifact_copy / "tokenizer.json"
    manifest, tokenizer = manifest_path.read_text(), tokenizer_path.read_text()
    without = json.loads(manifest)
    without.pop("familiarity")
    manifest_path.write_text(json.dumps(without))
    with pytest.raises(ArtifactError, match="'unfamiliarity' output but the manifest has no familiarity"):
        classifier.load(shipped_artifact_copy)  # the prior would silently never decide
    reversed_reference = json.loads(manifest)
    reversed_reference["familiarity"]["reference"].reverse()
    manifest_path.write_text(json.dumps(reversed_reference))
    with pytest.raises(ArtifactError, match="percentiles must not decrease"):
        classifier.load(shipped_artifact_copy)
    manifest_path.write_text(manifest)
    grown = json.loads(tokenizer)  # a token id past the model's embedding table
    grown["added_tokens"].append({"id": 30522, "content": "[NEW]", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": False})
    tokenizer_path.write_text(json.dumps(grown))
    with pytest.raises(ArtifactError, match="failed on probe prompts"):
        classifier.load(shipped_artifact_copy)
    tokenizer_path.write_text(tokenizer)
    assert classifier.load(shipped_artifact_copy).classify("hello").tier  # the parts as shipped fit


def test_model_and_tokenizer_must_be_the_files_the_manifest_was_exported_with(shipped_artifact_copy: Path) -> None:
    """Valid files that are not the exported ones (a reformatted tokenizer, a model with one more
    protobuf field) would load and route with parts nobody evaluated: their sha256 refuses them."""
    manifest_path = shipped_artifact_copy / "manifest.json"
    tokenizer_path, model_path = shipped_artifact_copy / "tokenizer.json", shipped_artifact_copy / "model.onnx"
    manifest, tokenizer, model = manifest_path.read_text(), tokenizer_path.read_text(), model_path.read_bytes()
    tokenizer_path.write_text(json.dumps(json.loads(tokenizer), indent=1))  # the same tokenizer, other bytes
    with pytest.raises(ArtifactError, match=r"tokenizer\.json is not the file this manifest was exported with"):
        classifier.load(shipped_artifact_copy)
    tokenizer_path.write_text(tokenizer)
    model_path.write_bytes(model + bytes([0xC2, 0x3E, 1]) + b"x")  # field 1000, unknown to ONNX: still loads
    with pytest.raises(ArtifactError, match=r"model\.onnx is not the file this manifest was exported with"):
        classifier.load(shipped_artifact_copy)
    version_1 = json.loads(manifest)
    version_1["schema_version"] = 1
    version_1.pop("files")
    manifest_path.write_text(json.dumps(version_1))
    assert classifier.load(shipped_artifact_copy).classify("hello").tier  # schema 1 had no digests: unchecked
    manifest_path.write_text(json.dumps({**version_1, "schema_version": 2}))
    with pytest.raises(ArtifactError, match=r"files has no sha256 of model\.onnx and tokenizer\.json"):
        classifier.load(shipped_artifact_copy)
    manifest_path.write_text(json.dumps({**json.loads(manifest), "files": {"model.onnx": "SECRET"}}))
    with pytest.raises(ArtifactError, match="files: Value error, must give the sha256") as info:
        classifier.load(shipped_artifact_copy)
    assert "SECRET" not in str(info.value)


def test_special_tokens_written_in_a_prompt_are_read_as_text(shipped_artifact: Path) -> None:
    """Matched as markers, "[CLS]" typed five times turned a hard prompt into an easy one."""
    runtime = classifier.load(shipped_artifact)
    markers = {runtime.encoder._tokenizer.token_to_id(token) for token in ("[CLS]", "[SEP]", "[PAD]", "[MASK]")}
    (ids,) = runtime.encoder.token_ids(["What does [CLS] do? And [SEP], [PAD], [MASK]?"])
    assert not markers & set(ids) and len(ids) > 20
    hard = "Implement a lock-free queue in C++ with hazard pointers and prove that it is linearizable."
    assert runtime.classify(hard + " [CLS]" * 5).tier == runtime.classify(hard).tier == "large"


def test_classify_command_reads_standard_input_and_takes_every_policy(shipped_artifact: Path, tmp_path: Path
                                                                      ) -> None:
    def classify(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "classifier.cli", "classify", "--model", str(shipped_artifact),
                               *args], input=stdin, capture_output=True, text=True, timeout=120)

    pasted = classify("-", stdin="Summarise the following report. " + "The quarter went well. " * 20_000)
    assert pasted.returncode == 0 and json.loads(pasted.stdout)["truncated"]  # too long for an argument list
    steered = classify("--allowed-tier", "medium", "--allowed-tier", "large", "--", "-5 + 3 = ?")
    assert steered.returncode == 0 and json.loads(steered.stdout)["tier"] in ("medium", "large")
    refused = classify("--top-share", "2", "hi")
    assert refused.returncode == 2 and "top_share must be in [0, 1]" in refused.stderr
    undecodable = subprocess.run([sys.executable, "-m", "classifier.cli", "classify", "--model", str(shipped_artifact),
                                  "-"], input=b"hello \xff world", capture_output=True, timeout=120)
    assert undecodable.returncode == 2 and b"not valid UTF-8: invalid start byte at byte 6" in undecodable.stderr


def test_load_names_what_is_wrong_with_its_arguments(shipped_artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="is a file; give the artifact directory"):
        classifier.load(shipped_artifact / "model.onnx")
    for threads in (0, 2**40):  # the second is past the C int ONNX Runtime keeps it in
        with pytest.raises(InvalidInputError, match="threads must be a whole number from 1 to 1024"):
            classifier.load(shipped_artifact, threads=threads)
    # An unset setting ("") is not the working directory, and a number is not a path.
    with pytest.raises(InvalidInputError, match="path is empty: give an artifact directory, or None"):
        classifier.load("")
    for bad in (0, b"models/mine"):
        with pytest.raises(InvalidInputError, match="path must be an artifact directory or None, got"):
            classifier.load(bad)  # type: ignore[arg-type]


def test_a_large_batch_is_tokenized_a_slice_at_a_time_with_the_same_results(shipped_artifact: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each slice holds the tokenizer's lock on its own, so that another thread's single prompt waits for
    one slice, not the whole batch; the batch's results are those of tokenizing it in one piece."""
    import classifier.runtime as runtime_module

    router = classifier.load(shipped_artifact)
    count = 3 * runtime_module.ENCODE_SLICE + 5
    prompts = [f"Question {i}: " + "why " * (i % 97) + "is the sky blue?" for i in range(count)]
    calls: list[int] = []
    encode = router.encoder.encode_batch

    def counted(texts):  # type: ignore[no-untyped-def]
        calls.append(len(texts))
        return encode(texts)

    monkeypatch.setattr(router.encoder, "encode_batch", counted)
    sliced = router.classify_batch(prompts)
    assert calls == [runtime_module.ENCODE_SLICE] * 3 + [5]
    monkeypatch.setattr(runtime_module, "ENCODE_SLICE", len(prompts))
    whole = router.classify_batch(prompts)
    assert calls[4:] == [len(prompts)]
    assert [(a.tier, a.truncated, a.decided_by) for a in sliced] == [(b.tier, b.truncated, b.decided_by) for b in whole]
    for a, b in zip(sliced, whole, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-6)


def test_a_malformed_routing_request_is_an_invalid_input_error() -> None:
    """A caller catching PromptierError (every other bad request raises one) catches these too."""
    for fields, where in (({"allowed_tiers": "small"}, "allowed_tiers"), ({"mode": 1}, "mode"),
                          ({"threshold": "high"}, "threshold"), ({"tier": "small"}, "tier")):
        with pytest.raises(InvalidInputError, match=f"routing request {where}: "):
            classifier.RoutingRequest(**fields)
    assert classifier.RoutingRequest(mode="cost", allowed_tiers=("small",)).allowed_tiers == ("small",)


def test_a_load_during_a_directory_swap_loads_the_artifact_now_there(
        shipped_artifact: Path, trained_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-export replaces the directory whole. A load that read the manifest before the swap and the files
    after mixed two artifacts and failed, blaming the artifact (a server starting or reloading then failed):
    it loads the one now there instead. A directory that stays broken is still refused."""
    import shutil

    import classifier.runtime

    live = Path(shutil.copytree(shipped_artifact, tmp_path / "model"))
    incoming = Path(shutil.copytree(trained_artifact, tmp_path / "incoming"))
    real_read = classifier.runtime._read
    swaps: list[Path] = []

    def read_across_a_swap(path: Path) -> bytes:
        if not swaps:  # after the manifest was read: the writer swaps the directories now
            live.rename(tmp_path / "model.previous")
            incoming.rename(live)
            swaps.append(path)
        return real_read(path)

    monkeypatch.setattr(classifier.runtime, "_read", read_across_a_swap)
    loaded = classifier.load(live)
    assert swaps and loaded.model_version == "tiny-test-1"  # the artifact now there, whole
    (live / "tokenizer.json").write_text('{"version": "1.0"}')  # broken, and not replaced: refused
    with pytest.raises(ArtifactError, match="tokenizer"):
        classifier.load(live)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["calibration"].update(method="isotonic"), r"calibration\.method: Input should be 'temperature'"),
    (lambda m: m["truncation"].update(head_chars=10**9), r"truncation\.head_chars: Input should be less than"),
    (lambda m: m["familiarity"].update(threshold=1e300), r"familiarity\.threshold: Input should be less than"),
    (lambda m: m["familiarity"]["prior"].update(short_chars=3000), r"short_chars must be less than long_chars"),
    (lambda m: m.update(model_version="   "), r"model_version: .*more than white space"),
    (lambda m: m["policy"].update(curve=[{**m["policy"]["curve"][0], "threshold": 0.1, "top_share": 0.9},
                                         {**m["policy"]["curve"][0], "threshold": 0.9, "top_share": 0.1}]),
     r"policy\.curve: .*share must not fall as the threshold rises"),
])
def test_manifest_values_the_runtime_would_serve_otherwise_than_they_say_are_refused(
        shipped_artifact_copy: Path, edit: object, message: str) -> None:
    """Each loaded before, and was served otherwise than written: another calibration as temperature scaling,
    a prompt's head uncut, a threshold float32 cannot reach, a prior whose short prompts are long, a blank
    version, a curve a `top_share` request would be served an arbitrary threshold from."""
    path = shipped_artifact_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)  # type: ignore[operator]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        classifier.load(shipped_artifact_copy)


def test_a_model_with_an_output_the_manifest_does_not_read_is_refused(shipped_artifact_copy: Path) -> None:
    """The load checks that the manifest reads every output the model has: one more would be ignored."""
    onnx = pytest.importorskip("onnx")  # the training extra's: the runtime does not need it

    from classifier.artifact import file_digest

    model_path = shipped_artifact_copy / "model.onnx"
    model = onnx.load(str(model_path))
    inner = model.graph.node[-1].input[0]  # a value the graph computes anyway, exposed as a third output
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(inner))
    onnx.save(model, str(model_path))
    manifest_path = shipped_artifact_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.onnx"] = file_digest(model_path.read_bytes())
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"model outputs are \['logits', 'unfamiliarity', .*expected"):
        classifier.load(shipped_artifact_copy)
