"""Has new data drifted from what a model was trained on? Two measures, two thresholds, one verdict.

    python -m stages.drift artifact_root=s3://bucket/genai run_id=drift-1 \\
        reference_uri=s3://bucket/genai/runs/ft-1/tokenize \\
        reference_evaluation_uri=s3://bucket/genai/models/folio-lora/ft-1/evaluation

``genai_monitor`` runs it after tokenizing a new batch the way the model's own data was tokenized
(``dataset_uri``) and evaluating the model on it (``evaluation_uri``):

- **perplexity ratio**: the model's perplexity on the new batch's held-out part over its perplexity on
  its own held-out data, both measured by ``evaluate`` the same way (word perplexity for text,
  assistant-token perplexity for conversations). Above ``max_perplexity_ratio``: drifted.
- **token divergence**: the Jensen-Shannon divergence (base 2, in [0, 1]) between the unigram token
  frequencies of the model's training split and of the new batch's (for conversations, the assistant
  tokens: what the model learns to produce). Above ``max_token_divergence``: drifted.

Outputs under ``<artifact_root>/runs/<run_id>/drift/``: ``drift.json`` (the numbers, the thresholds and
the verdict), ``report.md`` and ``drift.png``. Deciding what drift starts is the DAG's business.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import layout, store, token_blocks, uris
from stages.core.chat import IGNORE
from stages.core.config import check, help_field
from stages.core.errors import UserError
from stages.core.runner import StageConfig, StageRun, run_stage

log = logging.getLogger("stages.drift")

DRIFT = "drift.json"
PLOT = "drift.png"
# evaluate's measure for conversations, for text: per byte, since a batch's words may be nothing like the
# model's (numbers, code), and word perplexity then grows with word length as much as with surprise.
PERPLEXITIES = ("assistant_perplexity", "byte_perplexity")


@dataclass(kw_only=True)
class DriftConfig(StageConfig):
    reference_uri: str = help_field("", "The tokenize output the model was trained on (its train split).")
    reference_evaluation_uri: str = help_field(
        "", "The model's own evaluation (evaluate's output, or a published model's evaluation/)."
    )
    dataset_uri: str = help_field("", "The new batch's tokenize output; empty means this run's.")
    evaluation_uri: str = help_field("", "evaluate's output for the model on the new batch; empty means this run's.")
    max_perplexity_ratio: float = help_field(
        1.25, "Drifted when the perplexity on the new batch is more than this times the held-out one."
    )
    max_token_divergence: float = help_field(
        0.1, "Drifted when the Jensen-Shannon divergence of unigram token frequencies is above this (0 to 1)."
    )
    max_tokens: int = help_field(
        20_000_000, "Count at most this many tokens of each side (their train splits are shuffled); 0: all."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("reference_uri", "reference_evaluation_uri"):
            check(bool(getattr(self, field)), f"{field} is required")
            setattr(self, field, uris.normalize_uri(getattr(self, field), field))
        self.resolve_input("dataset_uri", layout.TOKENIZE)
        self.resolve_input("evaluation_uri", layout.EVALUATE)
        check_thresholds(self.max_perplexity_ratio, self.max_token_divergence)
        check(self.max_tokens >= 0, f"max_tokens={self.max_tokens} must be >= 0 (0 means all)")


def check_thresholds(max_perplexity_ratio: float, max_token_divergence: float) -> None:
    check(
        1 < max_perplexity_ratio <= 1000,
        f"max_perplexity_ratio={max_perplexity_ratio} must be in (1, 1000]: a ratio of 1 calls any batch drifted",
    )
    check(
        0 < max_token_divergence <= 1,
        f"max_token_divergence={max_token_divergence} must be in (0, 1]: the divergence is base 2",
    )


def inputs(config: DriftConfig) -> dict[str, str]:
    return {
        "reference_uri": config.reference_uri,
        "reference_evaluation_uri": config.reference_evaluation_uri,
        "dataset_uri": config.dataset_uri,
        "evaluation_uri": config.evaluation_uri,
    }


def token_counts(dataset_uri: str, field: str, max_tokens: int) -> np.ndarray:
    """Unigram counts over the train split: every token for text, the labelled ones for conversations."""
    blocks = token_blocks.load_blocks(dataset_uri, field)
    ids = blocks["input_ids"]
    tokens = ids[blocks["labels"] != IGNORE] if "labels" in blocks else ids.reshape(-1)
    if max_tokens:
        tokens = tokens[:max_tokens]
    if tokens.size == 0:
        raise UserError(f"{field}={dataset_uri!r} has no tokens to count")
    return np.bincount(tokens)


def js_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon divergence, base 2, of two count vectors over the same vocabulary: 0 same, 1 disjoint."""
    size = max(len(p_counts), len(q_counts))
    p = np.pad(p_counts, (0, size - len(p_counts))).astype(np.float64)
    q = np.pad(q_counts, (0, size - len(q_counts))).astype(np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        seen = a > 0
        return float(np.sum(a[seen] * np.log2(a[seen] / m[seen])))

    return min(1.0, max(0.0, (kl(p) + kl(q)) / 2))


def read_scores(uri: str, field: str) -> dict[str, float]:
    try:
        metrics = json.loads(store.read_text(uris.join(uri, layout.METRICS)))
        return metrics["adapted"]
    except FileNotFoundError:
        raise UserError(f"{field}={uri!r} holds no {layout.METRICS}: not an evaluate output") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{field}={uri!r}: {layout.METRICS} has no adapted scores") from None


def perplexity_measure(reference: dict[str, float], new: dict[str, float]) -> str:
    for metric in PERPLEXITIES:
        if metric in reference and metric in new:
            return metric
    raise UserError(
        "reference_evaluation_uri and evaluation_uri share no perplexity: one scored text, the other "
        "conversations (tokenize the new batch the way the model's data was)"
    )


def drift(config: DriftConfig, run: StageRun) -> dict[str, Any]:
    reference_scores = read_scores(config.reference_evaluation_uri, "reference_evaluation_uri")
    new_scores = read_scores(config.evaluation_uri, "evaluation_uri")
    metric = perplexity_measure(reference_scores, new_scores)
    ratio = new_scores[metric] / reference_scores[metric]

    reference_counts = token_counts(config.reference_uri, "reference_uri", config.max_tokens)
    new_counts = token_counts(config.dataset_uri, "dataset_uri", config.max_tokens)
    divergence = js_divergence(reference_counts, new_counts)

    perplexity = {
        "metric": metric,
        "held_out": reference_scores[metric],
        "new": new_scores[metric],
        "ratio": round(ratio, 6),
        "threshold": config.max_perplexity_ratio,
        "drifted": ratio > config.max_perplexity_ratio,
    }
    tokens = {
        "js_divergence": round(divergence, 6),
        "threshold": config.max_token_divergence,
        "drifted": divergence > config.max_token_divergence,
        "reference_tokens": int(reference_counts.sum()),
        "new_tokens": int(new_counts.sum()),
    }
    reasons = []
    if perplexity["drifted"]:
        reasons.append(f"{metric} rose {ratio:.2f}x (> {config.max_perplexity_ratio}x)")
    if tokens["drifted"]:
        reasons.append(f"token divergence {divergence:.3f} (> {config.max_token_divergence})")
    metrics = {
        "drifted": bool(reasons),
        "reason": "; ".join(reasons)
        or (
            f"{metric} {ratio:.2f}x (<= {config.max_perplexity_ratio}x), "
            f"token divergence {divergence:.3f} (<= {config.max_token_divergence})"
        ),
        "perplexity": perplexity,
        "tokens": tokens,
        "reference_uri": config.reference_uri,
        "dataset_uri": config.dataset_uri,
    }
    plot(reference_counts, new_counts, perplexity, tokens, run.scratch / PLOT)
    store.upload_file(run.scratch / PLOT, run.output(PLOT))
    store.write_text(run.output(layout.REPORT), render_report(metrics))
    store.write_text(run.output(DRIFT), json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("%s: %s", "DRIFTED" if metrics["drifted"] else "no drift", metrics["reason"])
    return metrics


def plot(reference: np.ndarray, new: np.ndarray, perplexity: dict, tokens: dict, path: Path) -> None:
    """Left: the two perplexities against the threshold. Right: rank-frequency curves of both token counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    values = [perplexity["held_out"], perplexity["new"]]
    bars = left.bar(
        ["held-out", "new batch"], values, color=["tab:gray", "tab:red" if perplexity["drifted"] else "tab:green"]
    )
    left.bar_label(bars, labels=[f"{v:.3g}" for v in values])
    left.axhline(perplexity["held_out"] * perplexity["threshold"], color="tab:red", linestyle="--", label="threshold")
    left.set_title(f"{perplexity['metric'].replace('_', ' ')} (ratio {perplexity['ratio']:.2f})")
    left.legend(loc="lower right")
    for counts, label in ((reference, "trained on"), (new, "new batch")):
        shares = np.sort(counts[counts > 0])[::-1] / counts.sum()
        right.loglog(np.arange(1, len(shares) + 1), shares, label=label)
    right.set_title(f"token frequencies (JS divergence {tokens['js_divergence']:.3f})")
    right.set_xlabel("rank")
    right.set_ylabel("share")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def render_report(metrics: dict[str, Any]) -> str:
    p, t = metrics["perplexity"], metrics["tokens"]
    return "\n".join(
        [
            "# Drift report",
            "",
            f"**Verdict: {'drifted' if metrics['drifted'] else 'no drift'}** ({metrics['reason']})",
            "",
            "| measure | value | threshold | drifted |",
            "|---|---:|---:|---|",
            f"| {p['metric']}: new batch / held-out ({p['new']:.4g} / {p['held_out']:.4g}) | {p['ratio']:.3f} "
            f"| {p['threshold']} | {'yes' if p['drifted'] else 'no'} |",
            f"| Jensen-Shannon divergence of unigram tokens ({t['reference_tokens']} vs {t['new_tokens']} tokens) "
            f"| {t['js_divergence']:.4f} | {t['threshold']} | {'yes' if t['drifted'] else 'no'} |",
            "",
            f"Trained on: `{metrics['reference_uri']}`  ",
            f"New batch: `{metrics['dataset_uri']}`",
            "",
            f"![drift]({PLOT})",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage("drift", DriftConfig, inputs, drift, argv)


if __name__ == "__main__":
    sys.exit(main())
