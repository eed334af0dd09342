"""The evaluate stage: lm-eval's rolling-window perplexity, the quality gate, the report, the contract."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from stages import evaluate
from stages.core.config import load_config
from stages.core.errors import ConfigError
from tests.conftest import run_stage_cli

# ---------------------------------------------------------------------------------------------
# The reference: lm-evaluation-harness 0.4.x, lm_eval/utils.py, transcribed as it stands there, so that
# the stage's own implementation is checked against the algorithm rather than against itself.


def lm_eval_get_rolling_token_windows(token_list, prefix_token, max_seq_len, context_len):
    assert 1 <= context_len <= max_seq_len
    if not token_list:
        return
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    yield [prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]  # noqa: RUF005
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (
            token_list[window_end - max_seq_len - 1 : window_end - 1],
            token_list[window_end - window_pred_len : window_end],
        )
        predicted += window_pred_len


def lm_eval_make_disjoint_window(pair):
    a, b = pair
    return a[: len(a) - (len(b) - 1)], b


PREFIX = -100


class TestRollingWindows:
    def test_matches_the_gold_windows_of_lm_evals_own_test(self):
        # lm-evaluation-harness tests/test_utils.py::test_get_rolling_token_windows_v1
        gold = [
            ([-100, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
            ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
            ([19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
            ([23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [30, 31, 32, 33]),
        ]
        assert list(evaluate.rolling_token_windows(list(range(34)), PREFIX, 10, 1)) == gold

    def test_disjoint_windows_match_the_reference_on_hand_built_token_lists(self):
        token_lists = [[], [7], [5, 6], list(range(9)), list(range(10)), list(range(11)), list(range(34))]
        token_lists += [list(range(100, 100 + n)) for n in (19, 20, 21, 57)]
        for tokens in token_lists:
            for max_len in (1, 2, 3, 4, 9, 10, 11, 64):
                ours = map(evaluate.make_disjoint_window, evaluate.rolling_token_windows(tokens, PREFIX, max_len, 1))
                ref = map(lm_eval_make_disjoint_window, lm_eval_get_rolling_token_windows(tokens, PREFIX, max_len, 1))
                assert list(ours) == list(ref), (tokens, max_len)

    @pytest.mark.parametrize("max_len", [1, 2, 3, 5, 8, 16])
    def test_every_token_is_predicted_once_from_the_tokens_before_it(self, max_len):
        for n in range(0, 40):
            tokens = list(range(1000, 1000 + n))
            windows = evaluate.document_windows([tokens], PREFIX, max_len)
            predicted = [t for _, _, continuation in windows for t in continuation]
            assert predicted == tokens  # each token exactly once, in order
            for _, context, continuation in windows:
                model_input = (context + continuation)[-(max_len + 1) :][:-1]
                assert 1 <= len(model_input) <= max_len
                assert len(continuation) <= len(model_input)
                # input position i predicts the token after it: the input is the doc's preceding tokens
                first = tokens.index(continuation[0])
                full = [PREFIX, *tokens]  # what precedes token k is full[:k + 1]
                expected = full[first + len(continuation) - len(model_input) : first + len(continuation)]
                assert model_input == expected
                # the scored positions are the last len(continuation) ones of the input
                assert model_input[-len(continuation) :] == full[first : first + len(continuation)]

    def test_full_windows_after_the_first_keep_max_length_tokens_of_context(self):
        windows = evaluate.document_windows([list(range(50))], PREFIX, 8)
        for _, context, continuation in windows[1:]:
            assert len((context + continuation)[:-1]) == 8


class TestAggregation:
    def test_words_and_bytes_are_counted_as_lm_eval_counts_them(self):
        assert evaluate.count_words("To be,  or not\nto be") == 6
        assert evaluate.count_words(" leading space") == 3  # re.split keeps the empty first field
        assert evaluate.count_words("") == 1
        assert len("Æsop’s".encode()) == 9

    def test_perplexities_follow_lm_evals_weighted_perplexity_and_bits_per_byte(self):
        scores = evaluate.perplexities(-100.0, words=20, n_bytes=80, tokens=40)
        assert scores["word_perplexity"] == pytest.approx(math.exp(5))
        assert scores["byte_perplexity"] == pytest.approx(math.exp(1.25))
        assert scores["bits_per_byte"] == pytest.approx(1.25 / math.log(2))
        assert scores["token_perplexity"] == pytest.approx(math.exp(2.5))

    def test_relative_improvement_is_base_minus_adapted_over_base(self):
        base = {"word_perplexity": 50.0, "byte_perplexity": 2.0, "bits_per_byte": 1.0, "token_perplexity": 10.0}
        adapted = {"word_perplexity": 40.0, "byte_perplexity": 2.2, "bits_per_byte": 0.5, "token_perplexity": 10.0}
        improvement = evaluate.relative_improvements(base, adapted)
        assert improvement == pytest.approx(
            {"word_perplexity": 0.2, "byte_perplexity": -0.1, "bits_per_byte": 0.5, "token_perplexity": 0.0}
        )


class TestQualityGate:
    def test_passes_at_or_above_the_threshold(self):
        gate = evaluate.quality_gate({"word_perplexity": 0.123}, "word_perplexity", 0.02)
        assert gate == {
            "passed": True,
            "reason": "word_perplexity improved 12.3% (>= 2.0% required)",
            "metric": "word_perplexity",
            "threshold": 0.02,
            "value": 0.123,
        }
        assert evaluate.quality_gate({"word_perplexity": 0.02}, "word_perplexity", 0.02)["passed"]

    def test_fails_below_the_threshold(self):
        gate = evaluate.quality_gate({"byte_perplexity": 0.015}, "byte_perplexity", 0.02)
        assert not gate["passed"]
        assert gate["reason"] == "byte_perplexity improved 1.5% (< 2.0% required)"

    def test_a_worse_model_says_so(self):
        gate = evaluate.quality_gate({"word_perplexity": -0.031}, "word_perplexity", 0.0)
        assert not gate["passed"]
        assert gate["reason"] == "word_perplexity got worse by 3.1% (< 0.0% required)"

    def test_a_negative_threshold_tolerates_a_small_loss(self):
        assert evaluate.quality_gate({"word_perplexity": -0.01}, "word_perplexity", -0.05)["passed"]


class TestConfig:
    def test_inputs_default_to_this_runs_upstream_stages(self, tmp_path):
        config = load_config(evaluate.EvaluateConfig, None, [f"artifact_root={tmp_path}", "run_id=r1", "base_model=m"])
        assert config.adapter_uri == f"file://{tmp_path}/runs/r1/train_lora"
        assert config.dataset_uri == f"file://{tmp_path}/runs/r1/tokenize"
        assert config.output_uri("evaluate") == f"file://{tmp_path}/runs/r1/evaluate"

    @pytest.mark.parametrize(
        ("override", "named"),
        [
            ("min_relative_improvement=1.0", "min_relative_improvement=1.0"),
            ("gate_metric=accuracy", "gate_metric='accuracy'"),
            ("max_length=1", "max_length=1"),
            ("batch_size=0", "batch_size=0"),
            ("max_eval_docs=-1", "max_eval_docs=-1"),
        ],
    )
    def test_bad_values_are_named(self, tmp_path, override, named):
        with pytest.raises(ConfigError, match=re.escape(named)):
            load_config(evaluate.EvaluateConfig, None, [f"artifact_root={tmp_path}", "base_model=m", override])

    def test_base_model_is_required(self, tmp_path):
        with pytest.raises(ConfigError, match="base_model is required"):
            load_config(evaluate.EvaluateConfig, None, [f"artifact_root={tmp_path}"])


# ---------------------------------------------------------------------------------------------
# With the real tiny model and adapter of the session's fine-tuning run


def adapter_uri(finetune_run: dict) -> str:
    return f"file://{finetune_run['artifact_root']}/runs/ft/train_lora"


def dataset_uri(finetune_run: dict) -> str:
    return f"file://{finetune_run['artifact_root']}/runs/ft/tokenize"


@pytest.fixture(scope="module")
def adapted_model(finetune_run):
    from peft import PeftModel

    from stages.core import models

    base_path = finetune_run["base_model"].removeprefix("file://")
    tokenizer = models.load_tokenizer(base_path)
    base = models.load_model(base_path, torch.float32, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, f"{adapter_uri(finetune_run).removeprefix('file://')}/adapter")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def validation_docs(finetune_run) -> list[str]:
    path = Path(dataset_uri(finetune_run).removeprefix("file://")) / "validation_docs.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


@torch.inference_mode()
def reference_loglikelihood(model, tokens: list[int], prefix: int, max_length: int) -> float:
    """One document, one window at a time, no batching and no padding, in float64."""
    total = 0.0
    for pair in lm_eval_get_rolling_token_windows(tokens, prefix, max_length, 1):
        context, continuation = lm_eval_make_disjoint_window(pair)
        model_input = (context + continuation)[-(max_length + 1) :][:-1]
        logits = model(input_ids=torch.tensor([model_input])).logits[0].double()
        logprobs = logits.log_softmax(-1)[-len(continuation) :]
        total += float(logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].sum())
    return total


@pytest.mark.parametrize("max_length", [128, 24])
def test_batched_loglikelihoods_equal_a_single_document_reference(adapted_model, validation_docs, max_length):
    model, tokenizer = adapted_model
    docs = sorted(validation_docs, key=len)
    docs = docs[:4] + docs[len(docs) // 2 : len(docs) // 2 + 4] + docs[-4:]  # short, middling and the longest
    token_lists = tokenizer(docs, add_special_tokens=False)["input_ids"]
    assert max(len(t) for t in token_lists) > max_length  # some documents need several windows
    prefix = tokenizer.bos_token_id
    ours = evaluate.document_loglikelihoods(model, token_lists, prefix, max_length, 5, torch.device("cpu"))
    for tokens, score in zip(token_lists, ours, strict=True):
        assert score == pytest.approx(reference_loglikelihood(model, tokens, prefix, max_length), abs=1e-4)


def test_a_document_within_the_context_is_one_plain_forward_pass(adapted_model, validation_docs):
    model, tokenizer = adapted_model
    tokens = tokenizer(validation_docs[0], add_special_tokens=False)["input_ids"][:100]
    prefix = tokenizer.bos_token_id
    with torch.inference_mode():
        logprobs = model(input_ids=torch.tensor([[prefix, *tokens[:-1]]])).logits[0].double().log_softmax(-1)
    plain = float(logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].sum())
    (ours,) = evaluate.document_loglikelihoods(model, [tokens], prefix, 128, 8, torch.device("cpu"))
    assert ours == pytest.approx(plain, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# The stage as every runtime runs it: a process


def stage_args(finetune_run: dict, run_id: str, *extra: str) -> list[str]:
    return [
        f"artifact_root={finetune_run['artifact_root']}",
        f"run_id={run_id}",
        f"base_model={finetune_run['base_model']}",
        f"adapter_uri={adapter_uri(finetune_run)}",
        f"dataset_uri={dataset_uri(finetune_run)}",
        *extra,
    ]


def result_line(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def evaluated(finetune_run) -> dict:
    proc = run_stage_cli("evaluate", *stage_args(finetune_run, "eval"))
    out = Path(finetune_run["artifact_root"]) / "runs" / "eval" / "evaluate"
    return {"proc": proc, "out": out, "result": result_line(proc), "args": stage_args(finetune_run, "eval")}


@pytest.mark.integration
class TestStage:
    def test_adapter_lowers_held_out_perplexity(self, evaluated):
        metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
        base, adapted = metrics["base"], metrics["adapted"]
        print(
            f"word perplexity {base['word_perplexity']:.2f} -> {adapted['word_perplexity']:.2f}, "
            f"{metrics['tokens']} tokens in {metrics['eval_seconds']}s ({metrics['tokens_per_second']} tokens/s)"
        )
        assert adapted["word_perplexity"] < base["word_perplexity"]
        assert adapted["byte_perplexity"] < base["byte_perplexity"]
        assert metrics["relative_improvement"]["word_perplexity"] == pytest.approx(
            (base["word_perplexity"] - adapted["word_perplexity"]) / base["word_perplexity"]
        )
        assert metrics["quality_gate"]["passed"] is True
        assert metrics["quality_gate"]["metric"] == "word_perplexity"
        assert metrics["max_length"] == 128  # the tiny model's max_position_embeddings

    def test_metrics_count_the_documents_as_lm_eval_does(self, evaluated, validation_docs):
        metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
        assert metrics["docs"] == len(validation_docs)
        assert metrics["words"] == sum(len(re.split(r"\s+", d)) for d in validation_docs)
        assert metrics["bytes"] == sum(len(d.encode("utf-8")) for d in validation_docs)
        for model in ("base", "adapted"):
            scores = metrics[model]
            assert scores["bits_per_byte"] == pytest.approx(math.log2(scores["byte_perplexity"]))
            assert scores["word_perplexity"] == pytest.approx(math.exp(-scores["loglikelihood"] / metrics["words"]))

    def test_the_same_metrics_go_to_the_orchestrator(self, evaluated):
        metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
        committed = json.loads((evaluated["out"] / "manifest.json").read_text())
        assert committed["metrics"] == metrics
        result = evaluated["result"]
        assert result["cache_hit"] is False
        assert result["metrics"]["quality_gate"]["passed"] is True
        assert "word_perplexity improved" in result["metrics"]["quality_gate"]["reason"]
        assert "word_perplexity" in evaluated["proc"].stderr and "->" in evaluated["proc"].stderr

    def test_report_and_valid_pngs_are_written(self, evaluated):
        from PIL import Image

        out = evaluated["out"]
        report = (out / "report.md").read_text()
        assert "](loss_curve.png)" in report and "](perplexity.png)" in report
        assert "Quality gate: PASSED" in report and "| word_perplexity |" in report
        for name in ("loss_curve.png", "perplexity.png"):
            data = (out / name).read_bytes()
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
            with Image.open(out / name) as image:
                image.verify()
                assert image.size[0] > 100 and image.size[1] > 100
        assert set(committed_outputs(out)) == {
            "metrics.json",
            "samples.jsonl",
            "report.md",
            "loss_curve.png",
            "perplexity.png",
        }

    def test_samples_hold_both_models_completions(self, evaluated):
        samples = [json.loads(line) for line in (evaluated["out"] / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 4
        for sample in samples:
            assert set(sample) == {"prompt", "adapted", "base", "reference"}
            assert sample["prompt"] and (sample["adapted"] or sample["base"])

    def test_rerun_is_a_cache_hit(self, evaluated):
        before = (evaluated["out"] / "manifest.json").read_text()
        proc = run_stage_cli("evaluate", *evaluated["args"])
        assert result_line(proc)["cache_hit"] is True
        assert result_line(proc)["metrics"] == evaluated["result"]["metrics"]
        assert (evaluated["out"] / "manifest.json").read_text() == before

    def test_a_failed_gate_is_reported_not_raised(self, finetune_run):
        proc = run_stage_cli(
            "evaluate",
            *stage_args(finetune_run, "eval-strict", "min_relative_improvement=0.99", "max_eval_docs=10"),
            "num_samples=0",
        )
        gate = result_line(proc)["metrics"]["quality_gate"]
        assert proc.returncode == 0
        assert gate["passed"] is False
        assert gate["reason"].endswith("(< 99.0% required)")
        assert result_line(proc)["metrics"]["docs"] == 10

    def test_adapter_of_another_base_model_exits_2_before_loading(self, finetune_run, tmp_path):
        other = make_other_base_model(finetune_run["base_model"], tmp_path / "other")
        proc = run_stage_cli(
            "evaluate",
            f"artifact_root={finetune_run['artifact_root']}",
            "run_id=eval-other-base",
            f"base_model={other}",
            f"adapter_uri={adapter_uri(finetune_run)}",
            f"dataset_uri={dataset_uri(finetune_run)}",
            check=False,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "adapter was trained on base model" in proc.stderr and "do not match" in proc.stderr
        assert "Traceback" not in proc.stderr
        out = Path(finetune_run["artifact_root"]) / "runs" / "eval-other-base" / "evaluate"
        assert not (out / "manifest.json").exists() and not (out / "metrics.json").exists()


def committed_outputs(out: Path) -> list[str]:
    return list(json.loads((out / "manifest.json").read_text())["outputs"])


def make_other_base_model(base_model: str, folder: Path) -> str:
    """A randomly initialised model with the same architecture and tokenizer: another base model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.core import models

    base_path = base_model.removeprefix("file://")
    torch.manual_seed(1234)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path)).save_pretrained(folder)
    models.load_tokenizer(base_path).save_pretrained(folder)
    return f"file://{folder}"


@pytest.mark.integration
def test_the_champion_is_scored_on_the_same_held_out_data_and_must_be_beaten(finetune_run):
    """The adapter against itself as champion: the same scores, no improvement, so it does not beat it."""
    proc = run_stage_cli(
        "evaluate", *stage_args(finetune_run, "eval-champion", f"champion_uri={adapter_uri(finetune_run)}")
    )
    metrics = result_line(proc)["metrics"]
    champion = metrics["champion"]
    assert champion["scores"]["word_perplexity"] == pytest.approx(metrics["adapted"]["word_perplexity"], rel=1e-6)
    assert champion["improvement"]["word_perplexity"] == pytest.approx(0, abs=1e-6)
    assert champion["passed"] is False and champion["uri"] == adapter_uri(finetune_run)
    assert "over the champion, word_perplexity" in champion["reason"] and "<= 0.0% required" in champion["reason"]
    assert metrics["quality_gate"]["passed"] is True  # against the base, as without a champion
    report = (Path(finetune_run["artifact_root"]) / "runs/eval-champion/evaluate/report.md").read_text()
    assert "## Against the champion: does not beat the champion" in report


def test_a_champion_trained_on_another_base_model_is_refused(finetune_run, tmp_path):
    import shutil

    champion = tmp_path / "champion"
    shutil.copytree(Path(adapter_uri(finetune_run).removeprefix("file://")) / "adapter", champion)
    (champion / "training_base.json").write_text(json.dumps({"base_model": "other", "sha256": "0" * 64}))
    proc = run_stage_cli(
        "evaluate", *stage_args(finetune_run, "eval-foreign-champion", f"champion_uri={champion}"), check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"champion_uri='file://{champion}': adapter was trained on base model 'other'" in proc.stderr
