"""Held-out scores of the base model and of base + LoRA adapter, a quality gate, and a small report.

    python -m stages.evaluate base_model=s3://bucket/models/base run_id=exp1 min_relative_improvement=0.02

Scores every document of ``validation_docs.jsonl`` (written by ``tokenize``) the way
lm-evaluation-harness 0.4.x scores ``loglikelihood_rolling`` tasks (wikitext and friends): the same
tokenization, the same rolling windows, the same word and byte counts, so the numbers here are the
numbers ``lm_eval --model hf --model_args pretrained=<base>,peft=<adapter>`` prints for a task over
the same documents.

Held-out conversations (tokenize with ``task=sft``) are scored the way they were trained: the loss and
perplexity over the assistant's tokens (the adapter's chat template, labels as in training), then each
conversation's last assistant turn is generated greedily from the turns before it (stopping at the
template's end of turn) and compared with the reference: exact match (after trimming whitespace) and
chrF (sacrebleu's corpus chrF, as a fraction). Outputs under ``<artifact_root>/runs/<run_id>/evaluate/``:

    metrics.json      base and adapted scores, their improvement, quality gate verdict
    samples.jsonl     greedy completions of the adapted and the base model for held-out prompts
    loss_curve.png    training loss from the adapter run's train_log.jsonl
    perplexity.png    scores before / after
    report.md         a human summary of all of the above

The stage reports a failed quality gate (``metrics.quality_gate.passed`` is false) and still exits 0:
the DAG decides what a failed gate means.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from stages.core import chat, layout, models, store, uris
from stages.core.config import SEED_BOUNDS, check, help_field
from stages.core.errors import UserError
from stages.core.generation import generate_completions
from stages.core.runner import StageConfig, StageRun, run_stage

log = logging.getLogger("stages.evaluate")

PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity")
# Scores of held-out conversations (task=sft). The gate compares the relative decrease of the perplexity and
# the gain (adapted - base, a fraction in [-1, 1]) of exact match and chrF.
SFT_METRICS = ("assistant_perplexity", "exact_match", "chrf")
LM_EVAL_DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM context when neither model config nor tokenizer gives one
SAMPLE_PROMPT_TOKENS = 32
CHAMPION = "champion"


@dataclass(kw_only=True)
class EvaluateConfig(StageConfig):
    base_model: str = help_field("", "Base model: URI of a save_pretrained folder, or a hub model id.")
    adapter_uri: str = help_field("", "Output of train_lora (or a PEFT adapter folder); empty means this run's.")
    dataset_uri: str = help_field("", "Output of tokenize (its validation_docs.jsonl); empty means this run's.")
    max_eval_docs: int = help_field(0, "Score only the first N held-out documents; 0 scores all of them.")
    batch_size: int = help_field(8, "Token windows per forward pass.", bounds=(1, 4096))
    max_length: int = help_field(
        0, "Tokens per scoring window; 0 takes the model's context length (max_position_embeddings), as lm-eval does."
    )
    gate_metric: Literal[
        "auto", "word_perplexity", "byte_perplexity", "token_perplexity", "assistant_perplexity", "exact_match", "chrf"
    ] = help_field(
        "auto",
        "Metric the quality gate compares; auto: word_perplexity for held-out text, assistant_perplexity for "
        "held-out conversations (exact_match and chrf also apply to conversations).",
    )
    min_relative_improvement: float = help_field(
        0.02,
        "Gate passes when the improvement of gate_metric is at least this (negative allows a loss): "
        "(base - adapted) / base for a perplexity, adapted - base for exact_match and chrf.",
    )
    champion_uri: str = help_field(
        "",
        "A published model to compare with on the same held-out data (the current champion; same base model); "
        "empty: none.",
    )
    min_improvement_over_champion: float = help_field(
        0.0,
        "The adapter beats the champion when the improvement of gate_metric over it is more than this "
        "(0: strictly better), measured as the gate measures it against the base.",
    )
    num_samples: int = help_field(
        4, "Held-out prompts to complete with both models for samples.jsonl.", bounds=(0, 1000)
    )
    sample_max_new_tokens: int = help_field(
        32,
        "New tokens per sample completion (greedy); prompt and completion fit the model's context.",
        bounds=(1, 32_768),
    )
    precision: Literal["auto", "fp32", "bf16"] = help_field("auto", "auto: bf16 on a GPU that has it, else fp32.")
    device: Literal["auto", "cpu", "cuda"] = help_field("auto", "Where to run the models.")
    seed: int = help_field(0, "Seed for torch (the evaluation itself is deterministic).", bounds=SEED_BOUNDS)

    # Batching changes only float rounding of the scores (far below the digits reported).
    OPERATIONAL = frozenset({"batch_size", "device"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.base_model = models.check_base_model(self.base_model)
        self.resolve_input("adapter_uri", layout.TRAIN_LORA)
        self.resolve_input("dataset_uri", layout.TOKENIZE)
        if self.champion_uri:
            self.champion_uri = uris.normalize_uri(self.champion_uri, "champion_uri")
        check(
            -1 <= self.min_improvement_over_champion < 1,
            f"min_improvement_over_champion={self.min_improvement_over_champion} must be in [-1, 1)",
        )
        check(self.max_eval_docs >= 0, f"max_eval_docs={self.max_eval_docs} must be >= 0 (0 means all)")
        check(
            self.max_length == 0 or self.max_length >= 2,
            f"max_length={self.max_length} must be 0 (the model's context) or >= 2",
        )
        check(
            -1 <= self.min_relative_improvement < 1,
            f"min_relative_improvement={self.min_relative_improvement} must be in [-1, 1): "
            "a relative improvement of perplexity cannot reach 1",
        )


def check_lengths(config: EvaluateConfig, context: int) -> None:
    """Scoring windows and sample completions fit the model's context (generation past it runs away)."""
    if config.max_length > context:
        raise UserError(f"max_length={config.max_length} is longer than base_model's context of {context} tokens")
    if config.num_samples and SAMPLE_PROMPT_TOKENS + config.sample_max_new_tokens > context:
        raise UserError(
            f"sample_max_new_tokens={config.sample_max_new_tokens} after a {SAMPLE_PROMPT_TOKENS}-token prompt "
            f"is longer than base_model's context of {context} tokens"
        )


def inputs(config: EvaluateConfig) -> dict[str, str]:
    found = {"base_model": config.base_model, "adapter_uri": config.adapter_uri, "dataset_uri": config.dataset_uri}
    return {**found, "champion_uri": config.champion_uri} if config.champion_uri else found


# ---------------------------------------------------------------------------------------------
# Rolling windows, as lm-evaluation-harness 0.4.x builds them for loglikelihood_rolling.
# Mirrors ``lm_eval.utils.get_rolling_token_windows`` and ``lm_eval.utils.make_disjoint_window``
# (https://github.com/EleutherAI/lm-evaluation-harness/blob/main/lm_eval/utils.py) and the way
# ``lm_eval.models.huggingface.HFLM.loglikelihood_rolling`` / ``_loglikelihood_tokens`` use them.


def rolling_token_windows(
    token_list: list[int], prefix_token: int, max_seq_len: int, context_len: int
) -> Iterator[tuple[list[int], list[int]]]:
    """(input tokens, tokens to predict) pairs covering ``token_list``; score the last len(pred) logits.

    The first window predicts up to ``max_seq_len`` tokens after ``prefix_token``; each later window
    predicts the next ``max_seq_len - context_len + 1`` tokens (fewer at the end), conditioned on the
    ``max_seq_len`` tokens before its last prediction. Every token is predicted exactly once.
    """
    assert 1 <= context_len <= max_seq_len
    if not token_list:
        return
    pred_len = max_seq_len - context_len + 1  # +1: input position i predicts token i + 1
    predicted = min(max_seq_len, len(token_list))
    yield [prefix_token, *token_list[: predicted - 1]], token_list[:predicted]
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (
            token_list[window_end - max_seq_len - 1 : window_end - 1],
            token_list[window_end - window_pred_len : window_end],
        )
        predicted += window_pred_len


def make_disjoint_window(pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """Cut the input so that context + continuation are consecutive, non-overlapping tokens."""
    context, continuation = pair
    return context[: len(context) - (len(continuation) - 1)], continuation


def document_windows(
    token_lists: list[list[int]], prefix_token: int, max_length: int
) -> list[tuple[int, list[int], list[int]]]:
    """(document index, context, continuation) for every window of every document."""
    return [
        (doc, *make_disjoint_window(pair))
        for doc, tokens in enumerate(token_lists)
        for pair in rolling_token_windows(tokens, prefix_token, max_seq_len=max_length, context_len=1)
    ]


@torch.inference_mode()
def window_loglikelihoods(
    model, windows: list[tuple[int, list[int], list[int]]], max_length: int, batch_size: int, device: torch.device
) -> list[float]:
    """Sum of log p(continuation | context) per window, batched across documents.

    As HFLM._loglikelihood_tokens: the model input is ``(context + continuation)[-(max_length + 1):][:-1]``,
    windows run longest first, right-padded; the last ``len(continuation)`` real positions are scored.
    Right padding needs no attention mask in a causal model (no real position attends to a later one),
    and the padded positions are never scored. Log-softmax is taken in float32 and summed in float64
    (lm-eval stays in the model's dtype throughout: in fp32 the two differ by summation rounding, about
    1e-4 on a 500-token document; in bf16 this is the more accurate of the two).
    """
    rows = [(context + continuation)[-(max_length + 1) :][:-1] for _, context, continuation in windows]
    order = sorted(range(len(windows)), key=lambda i: (-len(rows[i]), i))
    scores = [0.0] * len(windows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(rows[chunk[0]])
        spans = [(len(rows[i]) - len(windows[i][2]), len(rows[i])) for i in chunk]  # scored positions
        batch = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (i, (start_pos, end)) in enumerate(zip(chunk, spans, strict=True)):
            batch[j, :end] = torch.tensor(rows[i], dtype=torch.long)
            targets[j, start_pos:end] = torch.tensor(windows[i][2], dtype=torch.long)
        logits = model(input_ids=batch.to(device), use_cache=False).logits  # a KV cache is only for generating
        targets = targets.to(logits.device)
        sums = []
        for j, (start_pos, end) in enumerate(spans):
            # one window at a time: a float32 copy of a whole batch's logits can be gigabytes
            logprobs = logits[j, start_pos:end].float().log_softmax(dim=-1)
            sums.append(logprobs.gather(1, targets[j, start_pos:end, None]).sum(dtype=torch.float64))
        for i, value in zip(chunk, torch.stack(sums).tolist(), strict=True):  # one device sync per batch
            scores[i] = value
    return scores


def document_loglikelihoods(
    model, token_lists: list[list[int]], prefix_token: int, max_length: int, batch_size: int, device: torch.device
) -> list[float]:
    """lm-eval's loglikelihood_rolling for each document: the sum over its windows, in window order."""
    windows = document_windows(token_lists, prefix_token, max_length)
    totals = [0.0] * len(token_lists)
    scores = window_loglikelihoods(model, windows, max_length, batch_size, device)
    for (doc, _, _), score in zip(windows, scores, strict=True):
        totals[doc] += score
    return totals


def count_words(text: str) -> int:
    """lm-eval's perplexity tasks count words as ``len(re.split(r"\\s+", doc))`` (an empty doc is 1 word)."""
    return len(re.split(r"\s+", text))


def perplexities(loglikelihood: float, words: int, n_bytes: int, tokens: int) -> dict[str, float]:
    """lm-eval's weighted_perplexity and bits_per_byte aggregations, plus per-token perplexity."""
    return {
        "word_perplexity": math.exp(-loglikelihood / words),
        "byte_perplexity": math.exp(-loglikelihood / n_bytes),
        "bits_per_byte": -loglikelihood / n_bytes / math.log(2),
        "token_perplexity": math.exp(-loglikelihood / tokens),
        "loglikelihood": loglikelihood,
    }


def relative_improvements(base: dict[str, float], adapted: dict[str, float]) -> dict[str, float]:
    return {m: (base[m] - adapted[m]) / base[m] for m in PERPLEXITY_METRICS}


def resolve_gate_metric(config: EvaluateConfig, sft: bool) -> str:
    """The metric the gate compares: ``gate_metric``, or for auto the main one of the held-out data's kind."""
    if config.gate_metric == "auto":
        return "assistant_perplexity" if sft else "word_perplexity"
    if sft != (config.gate_metric in SFT_METRICS):
        held_out, fits = ("conversations", SFT_METRICS) if sft else ("text", PERPLEXITY_METRICS)
        raise UserError(
            f"gate_metric={config.gate_metric} does not apply to dataset_uri={config.dataset_uri!r}, which holds "
            f"held-out {held_out}: use one of {', '.join(m for m in fits if m != 'bits_per_byte')}"
        )
    return config.gate_metric


def quality_gate(improvement: dict[str, float], metric: str, threshold: float, strict: bool = False) -> dict[str, Any]:
    """Whether the improvement of ``metric`` reaches ``threshold`` (passes ``threshold`` with ``strict``)."""
    value = improvement[metric]
    passed = value > threshold if strict else value >= threshold
    unit = " points" if metric in ("exact_match", "chrf") else ""  # a gain of a fraction, not a relative change
    if value >= 0:
        change = f"{metric} improved {value:.1%}{unit}"
    else:
        change = f"{metric} got worse by {-value:.1%}{unit}"
    needed = (">" if passed else "<=") if strict else (">=" if passed else "<")
    reason = f"{change} ({needed} {threshold:.1%}{unit} required)"
    return {"passed": passed, "reason": reason, "metric": metric, "threshold": threshold, "value": value}


def champion_comparison(
    config: EvaluateConfig, champion: dict[str, float], improvement: dict[str, float], metric: str
) -> dict[str, Any]:
    """The adapter against the champion: the champion's scores and whether the adapter beat it."""
    gate = quality_gate(improvement, metric, config.min_improvement_over_champion, strict=True)
    return {**gate, "reason": "over the champion, " + gate["reason"], "uri": config.champion_uri,
            "scores": champion, "improvement": improvement}  # fmt: skip


def sft_improvement(reference: dict[str, float], adapted: dict[str, float]) -> dict[str, float]:
    """The relative decrease of the perplexity, the gain of exact match and chrF, from ``reference``."""
    return {
        "assistant_perplexity": (reference["assistant_perplexity"] - adapted["assistant_perplexity"])
        / reference["assistant_perplexity"],
        "exact_match": adapted["exact_match"] - reference["exact_match"],
        "chrf": adapted["chrf"] - reference["chrf"],
    }


@contextlib.contextmanager
def scoring(model, name: str):
    """The PEFT model as ``name``: ``adapted`` (the new adapter), ``base`` (no adapter), ``champion``."""
    if name == "base":
        with model.disable_adapter():
            yield
        return
    model.set_adapter(CHAMPION if name == CHAMPION else "default")
    try:
        yield
    finally:
        model.set_adapter("default")


# ---------------------------------------------------------------------------------------------
# Inputs


def read_documents(dataset_uri: str, max_docs: int) -> list[str] | list[list[dict[str, str]]]:
    """The held-out documents (``{"text": ...}`` lines) or conversations (``{"messages": [...]}`` lines)."""
    uri = uris.join(dataset_uri, layout.VALIDATION_DOCS)
    docs: list = []
    kind = None
    try:
        with store.open_file(uri, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                    key = "messages" if "messages" in obj else "text"
                    doc = chat.conversation(obj, chat.Fields()) if key == "messages" else obj["text"]
                except (ValueError, KeyError, TypeError, chat.BadRecord):
                    raise UserError(f"{uri} line {number}: not a JSON object with a 'text' or 'messages'") from None
                if not isinstance(doc, (str, list)):
                    raise UserError(f"{uri} line {number}: 'text' is {type(doc).__name__}, not a string")
                if kind not in (None, key):
                    raise UserError(f"{uri} line {number}: mixes held-out texts and conversations")
                kind = key
                docs.append(doc)
                if max_docs and len(docs) == max_docs:
                    break
    except FileNotFoundError:
        raise UserError(f"dataset_uri={dataset_uri!r} has no validation_docs.jsonl; is it a tokenize output?") from None
    if not docs:
        raise UserError(f"{uri} holds no documents to evaluate")
    return docs


def read_train_log(log_file: Path) -> list[dict[str, Any]]:
    """The training loss history beside the adapter (train_lora and published models keep one)."""
    if not log_file.exists():
        return []
    return [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Samples, plots, report


@torch.inference_mode()
def generate_samples(model, tokenizer, docs: list[str], config: EvaluateConfig, device: torch.device) -> list[dict]:
    """Greedy completions of the first tokens of held-out documents, adapted and base side by side."""
    samples = []
    for text in docs:
        if len(samples) == config.num_samples:
            break
        tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(tokens) < 8:
            continue
        n_prompt = min(SAMPLE_PROMPT_TOKENS, len(tokens) // 2)
        prompt = torch.tensor([tokens[:n_prompt]], device=device)
        kwargs = {
            "attention_mask": torch.ones_like(prompt),
            "max_new_tokens": config.sample_max_new_tokens,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        adapted = model.generate(input_ids=prompt, **kwargs)[0, n_prompt:]
        with model.disable_adapter():
            base = model.generate(input_ids=prompt, **kwargs)[0, n_prompt:]
        samples.append(
            {
                "prompt": tokenizer.decode(tokens[:n_prompt]),
                "adapted": tokenizer.decode(adapted, skip_special_tokens=True),
                "base": tokenizer.decode(base, skip_special_tokens=True),
                "reference": tokenizer.decode(tokens[n_prompt : n_prompt + config.sample_max_new_tokens]),
            }
        )
    return samples


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], color="tab:blue", linewidth=1.5)
    else:
        ax.text(0.5, 0.5, "no train_log.jsonl beside the adapter", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_perplexity(
    base: dict[str, float],
    adapted: dict[str, float],
    path: Path,
    shown: tuple[str, ...] = ("word_perplexity", "token_perplexity", "byte_perplexity"),
    title: str = "held-out perplexity (lower is better)",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(9, 3.5), dpi=100)
    for ax, metric in zip(axes, shown, strict=True):
        values = [base[metric], adapted[metric]]
        bars = ax.bar(["base", "adapted"], values, color=["tab:gray", "tab:green"])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values])
        ax.set_title(metric.replace("_", " "))
        ax.margins(y=0.15)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def render_report(metrics: dict[str, Any], samples: list[dict], config: EvaluateConfig) -> str:
    gate = metrics["quality_gate"]
    lines = [
        "# Evaluation report",
        "",
        f"- base model: `{config.base_model}`",
        f"- adapter: `{config.adapter_uri}`",
        f"- held-out documents: {metrics['docs']} ({metrics['tokens']} tokens, {metrics['words']} words, "
        f"{metrics['bytes']} bytes), scored in windows of {metrics['max_length']} tokens",
        "",
        f"## Quality gate: {'PASSED' if gate['passed'] else 'FAILED'}",
        "",
        gate["reason"] + ".",
        *champion_section(metrics),
        "",
        "## Perplexity",
        "",
        "| metric | base | adapted | relative improvement |",
        "|---|---:|---:|---:|",
    ]
    for m in PERPLEXITY_METRICS:
        base, adapted, rel = metrics["base"][m], metrics["adapted"][m], metrics["relative_improvement"][m]
        lines.append(f"| {m} | {base:.4f} | {adapted:.4f} | {rel:+.2%} |")
    lines += [
        "",
        f"![perplexity before and after]({layout.PERPLEXITY_PLOT})",
        "",
        "## Training loss",
        "",
        f"![training loss]({layout.LOSS_CURVE})",
        "",
    ]
    # Held-out text continues the prompt: it comes after the completions it is compared with.
    lines += samples_section(samples, [("Adapted", "adapted"), ("Base", "base"), ("Held-out text", "reference")])
    return "\n".join(lines).rstrip() + "\n"


def samples_section(samples: list[dict], fields: list[tuple[str, str]]) -> list[str]:
    """Each sample's prompt, then ``fields`` (label, key) in that order."""
    lines = ["## Samples (greedy)", ""]
    if not samples:
        lines.append("No samples were generated.")
    for i, sample in enumerate(samples, 1):
        lines += [f"### Sample {i}", "", f"**Prompt:** {_quote(sample['prompt'])}", ""]
        for label, key in fields:
            lines += [f"**{label}:** {_quote(sample[key])}", ""]
    return lines


def champion_section(metrics: dict[str, Any]) -> list[str]:
    """The comparison with the champion, when there was one."""
    comparison = metrics.get(CHAMPION)
    if not comparison:
        return []
    verdict = "beats the champion" if comparison["passed"] else "does not beat the champion"
    metric = comparison["metric"]
    return ["", f"## Against the champion: {verdict}", "", f"Champion `{comparison['uri']}`: {metric} "
            f"{comparison['scores'][metric]:.4f}; {comparison['reason']}."]  # fmt: skip


def _quote(text: str) -> str:
    return "`" + " ".join(text.split()).replace("`", "'") + "`" if text.strip() else "*(empty)*"


# ---------------------------------------------------------------------------------------------
# The stage


def evaluate(config: EvaluateConfig, run: StageRun) -> dict[str, Any]:
    from peft import PeftModel

    torch.manual_seed(config.seed)
    device = models.pick_device(config.device)
    dtype = models.pick_dtype(config.precision, device)
    docs = read_documents(config.dataset_uri, config.max_eval_docs)
    sft = isinstance(docs[0], list)
    gate_metric = resolve_gate_metric(config, sft)

    with models.adapter_dir(config.adapter_uri, run.inputs["base_model"]["sha256"], config.base_model) as adapter:
        history = read_train_log(adapter.parent / layout.TRAIN_LOG)
        saved_template = chat.saved_template(adapter)
        with models.model_dir(config.base_model) as base_path:
            tokenizer = models.load_tokenizer(base_path)
            # HFLM.max_length when none is given (lm_eval.models.utils.resolve_max_length): the model config's
            # context, else the tokenizer's model_max_length (as models.context_length reads them), else 2048.
            context = models.context_length(models.load_model_config(base_path), tokenizer)
            context = context or LM_EVAL_DEFAULT_MAX_LENGTH
            max_length = config.max_length or context
            check_lengths(config, context)  # before any weights are allocated
            base = models.load_model(base_path, dtype, device)
        model = PeftModel.from_pretrained(base, str(adapter))
    if config.champion_uri:  # a second adapter on the same base: scored in turn, never merged
        base_sha256 = run.inputs["base_model"]["sha256"]
        with models.adapter_dir(config.champion_uri, base_sha256, config.base_model, "champion_uri") as champion:
            model.load_adapter(str(champion), adapter_name=CHAMPION)
    model = model.to(device)
    model.eval()
    if sft:
        template = saved_template or chat.resolve_template(tokenizer, "", config.base_model)
        renderer = chat.Renderer(tokenizer, template)
        return evaluate_sft(config, run, model, renderer, docs, history, gate_metric, context, device)
    prefix_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix_token is None:
        raise UserError(f"base_model={config.base_model!r} has neither a bos nor an eos token to start documents with")

    token_lists = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    tokens = sum(len(t) for t in token_lists)
    words = sum(count_words(d) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    if tokens == 0:
        raise UserError(f"the {len(docs)} held-out documents tokenize to nothing")
    n_windows = len(document_windows(token_lists, prefix_token, max_length))
    log.info(
        "scoring %d documents (%d tokens, %d windows of <= %d tokens) with base and adapted model on %s/%s",
        len(docs), tokens, n_windows, max_length, device, dtype,
    )  # fmt: skip

    started = time.perf_counter()
    scores = {}
    for name in ("adapted", "base", CHAMPION) if config.champion_uri else ("adapted", "base"):
        with scoring(model, name):
            ll = document_loglikelihoods(model, token_lists, prefix_token, max_length, config.batch_size, device)
        scores[name] = perplexities(sum(ll), words, n_bytes, tokens)
    seconds = time.perf_counter() - started

    base_scores, adapted_scores = scores["base"], scores["adapted"]
    improvement = relative_improvements(base_scores, adapted_scores)
    gate = quality_gate(improvement, gate_metric, config.min_relative_improvement)
    metrics = {
        "task": "causal_lm",
        "base": base_scores,
        "adapted": adapted_scores,
        "relative_improvement": improvement,
        "quality_gate": gate,
        "docs": len(docs),
        "tokens": tokens,
        "words": words,
        "bytes": n_bytes,
        "max_length": max_length,
        "windows": n_windows,
        "eval_seconds": round(seconds, 3),
        "tokens_per_second": round(len(scores) * tokens / max(seconds, 1e-9), 1),  # each model scores every token
        "device": str(device),
        "precision": str(dtype).removeprefix("torch."),
    }
    if config.champion_uri:
        vs_champion = relative_improvements(scores[CHAMPION], adapted_scores)
        metrics[CHAMPION] = champion_comparison(config, scores[CHAMPION], vs_champion, gate_metric)
    sanity_check(metrics)

    samples = generate_samples(model, tokenizer, docs, config, device)
    plot_loss_curve(history, run.scratch / layout.LOSS_CURVE)
    plot_perplexity(base_scores, adapted_scores, run.scratch / layout.PERPLEXITY_PLOT)
    for name in (layout.LOSS_CURVE, layout.PERPLEXITY_PLOT):
        store.upload_file(run.scratch / name, run.output(name))
    store.write_text(run.output(layout.SAMPLES), "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    store.write_text(run.output(layout.REPORT), render_report(metrics, samples, config))
    store.write_text(run.output(layout.METRICS), json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    m = gate_metric
    log.info(
        "%s %.4f -> %.4f (%+.1f%%), %.0f tokens/s; quality gate %s: %s",
        m, base_scores[m], adapted_scores[m], 100 * improvement[m], metrics["tokens_per_second"],
        "passed" if gate["passed"] else "FAILED", gate["reason"],
    )  # fmt: skip
    return metrics


# ---------------------------------------------------------------------------------------------
# Held-out conversations (task=sft)


@torch.inference_mode()
def assistant_loglikelihood(model, examples: list[tuple[list[int], list[int]]], batch_size: int, device) -> float:
    """Sum of log p(token | the tokens before it) over every labelled token of every example."""
    total = torch.zeros((), dtype=torch.float64)
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = len(chunk[0][0])
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), chat.IGNORE, dtype=torch.long)
        for j, (row_ids, row_labels) in enumerate(chunk):  # right-padded: no real token attends to padding
            ids[j, : len(row_ids)] = torch.tensor(row_ids)
            labels[j, : len(row_labels)] = torch.tensor(row_labels)
        targets = labels[:, 1:]
        scored = targets != chat.IGNORE
        logprobs = scored_logits(model, ids.to(device), scored.to(device)).float().log_softmax(dim=-1)
        total += logprobs.gather(1, targets[scored][:, None].to(logprobs.device)).sum(dtype=torch.float64).cpu()
    return float(total)


def scored_logits(model, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """The logits that predict the scored targets (``scored[i, p]``: the token at ``p + 1`` is scored), one
    row each in row-major order. The language-model head runs over those positions only (``logits_to_keep``
    with a mask): with a 128k vocabulary the logits of every position are the largest tensor of the pass.
    A model whose forward cannot keep a mask returns every position's logits, sliced here."""
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, :-1] = scored
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    return logits if logits.dim() == 2 else logits[:, :-1][scored]


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (whitespace-trimmed) and sacrebleu's corpus chrF, both as fractions."""
    import sacrebleu

    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return {
        "exact_match": exact / len(references),
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score / 100,
    }


def evaluate_sft(
    config: EvaluateConfig,
    run: StageRun,
    model,
    renderer: chat.Renderer,
    conversations: list[list[dict[str, str]]],
    history: list[dict[str, Any]],
    gate_metric: str,
    context: int,
    device: torch.device,
) -> dict[str, Any]:
    tokenizer = renderer.tokenizer
    trainable = []
    for turns in conversations:
        try:
            chat.check_trainable(turns)
        except chat.Dropped:
            continue  # tokenize holds out only trainable ones; a hand-made file may not
        trainable.append(turns)
    kept, examples, prompts, references = [], [], [], []
    for turns, (ids, labels) in zip(trainable, renderer.examples(trainable), strict=True):
        prompt = renderer.prompt_ids(turns[:-1])
        if len(ids) > context or len(prompt) + config.sample_max_new_tokens > context:
            continue  # tokenize kept it for a block that fit; it does not fit with room to generate
        kept.append(turns)
        examples.append((ids, labels))
        prompts.append(prompt)
        references.append(turns[-1]["content"])
    if not examples:
        raise UserError(f"no held-out conversation fits base_model's context of {context} tokens")
    loss_tokens = sum(sum(1 for x in labels[1:] if x != chat.IGNORE) for _, labels in examples)
    log.info(
        "scoring %d held-out conversations (%d assistant tokens) and generating their last assistant turn",
        len(examples), loss_tokens,
    )  # fmt: skip
    stops = renderer.stop_ids()
    started = time.perf_counter()
    scores = {}
    for name in ("adapted", "base", CHAMPION) if config.champion_uri else ("adapted", "base"):
        with scoring(model, name):
            loglikelihood = assistant_loglikelihood(model, examples, config.batch_size, device)
            generated, _ = generate_completions(
                model, tokenizer, prompts, batch_size=config.batch_size, max_new_tokens=config.sample_max_new_tokens,
                device=device, stops=stops,
            )  # fmt: skip
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
        scores[name] = {
            "assistant_loss": -loglikelihood / loss_tokens,
            "assistant_perplexity": math.exp(-loglikelihood / loss_tokens),
            **text_scores(texts, references),
        }
        scores[name + "_texts"] = texts
    seconds = time.perf_counter() - started
    base, adapted = scores["base"], scores["adapted"]
    improvement = sft_improvement(base, adapted)
    gate = quality_gate(improvement, gate_metric, config.min_relative_improvement)
    metrics = {
        "task": "sft",
        "base": base,
        "adapted": adapted,
        "improvement": improvement,
        "quality_gate": gate,
        "conversations": len(examples),
        "assistant_tokens": loss_tokens,
        "eval_seconds": round(seconds, 3),
        "device": str(device),
    }
    if config.champion_uri:
        champion = scores[CHAMPION]
        metrics[CHAMPION] = champion_comparison(config, champion, sft_improvement(champion, adapted), gate_metric)
    for model_name in ("base", "adapted"):
        value = metrics[model_name]["assistant_perplexity"]
        if not math.isfinite(value) or value < 1:
            raise RuntimeError(f"{model_name} assistant_perplexity is {value}: the scoring is broken")

    samples = [
        {"prompt": turns[-2]["content"] if len(turns) > 1 else "", "adapted": a, "base": b, "reference": ref}
        for turns, a, b, ref in zip(kept, scores["adapted_texts"], scores["base_texts"], references, strict=True)
    ][: config.num_samples]
    plot_loss_curve(history, run.scratch / layout.LOSS_CURVE)
    plot_perplexity(base, adapted, run.scratch / layout.PERPLEXITY_PLOT, shown=SFT_METRICS,
                    title="held-out conversations")  # fmt: skip
    for name in (layout.LOSS_CURVE, layout.PERPLEXITY_PLOT):
        store.upload_file(run.scratch / name, run.output(name))
    store.write_text(run.output(layout.SAMPLES), "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    store.write_text(run.output(layout.REPORT), render_sft_report(metrics, samples, config))
    store.write_text(run.output(layout.METRICS), json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info(
        "assistant perplexity %.3f -> %.3f, exact match %.1f%% -> %.1f%%, chrF %.3f -> %.3f; quality gate %s: %s",
        base["assistant_perplexity"], adapted["assistant_perplexity"], 100 * base["exact_match"],
        100 * adapted["exact_match"], base["chrf"], adapted["chrf"], "passed" if gate["passed"] else "FAILED",
        gate["reason"],
    )  # fmt: skip
    return metrics


def render_sft_report(metrics: dict[str, Any], samples: list[dict], config: EvaluateConfig) -> str:
    gate = metrics["quality_gate"]
    lines = [
        "# Evaluation report (held-out conversations)",
        "",
        f"- base model: `{config.base_model}`",
        f"- adapter: `{config.adapter_uri}`",
        f"- held-out conversations: {metrics['conversations']} ({metrics['assistant_tokens']} assistant tokens); "
        "the last assistant turn of each generated greedily",
        "",
        f"## Quality gate: {'PASSED' if gate['passed'] else 'FAILED'}",
        "",
        gate["reason"] + ".",
        *champion_section(metrics),
        "",
        "| metric | base | adapted | improvement |",
        "|---|---:|---:|---:|",
    ]
    for m in SFT_METRICS:
        base, adapted, gain = metrics["base"][m], metrics["adapted"][m], metrics["improvement"][m]
        lines.append(f"| {m} | {base:.4f} | {adapted:.4f} | {gain:+.2%} |")
    lines += ["", f"![scores before and after]({layout.PERPLEXITY_PLOT})", "", "## Training loss", "",
              f"![training loss]({layout.LOSS_CURVE})", ""]  # fmt: skip
    # The reference answer first: the completions are judged against it.
    lines += samples_section(samples, [("Reference", "reference"), ("Adapted", "adapted"), ("Base", "base")])
    return "\n".join(lines).rstrip() + "\n"


def sanity_check(metrics: dict[str, Any]) -> None:
    """A perplexity below 1 or not finite means the scores are not log-probabilities: a bug, not a result."""
    for model in ("base", "adapted"):
        for name in PERPLEXITY_METRICS:
            value = metrics[model][name]
            if not math.isfinite(value) or (name.endswith("perplexity") and value < 1):
                raise RuntimeError(f"{model} {name} is {value}: the scoring is broken")


def main(argv: list[str] | None = None) -> int:
    return run_stage(layout.EVALUATE, EvaluateConfig, inputs, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
