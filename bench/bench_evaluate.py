"""evaluate: the stage's evaluated tokens/s vs lm-evaluation-harness on the same model, adapter and text.

    python -m bench.run --only evaluate

Sides (each its own process):

- ``ours``: ``stages.evaluate`` (fresh run) on the first ``docs`` held-out documents: rolling
  log-likelihood of every token under the base model and under base + adapter (2 x tokens evaluated),
  then samples, plots and the report. Its ``eval_seconds`` times the scoring; the whole stage is timed too.
- ``lm_eval``: lm-evaluation-harness 0.4.13 (installed by ``make bench`` into build/bench-lm-eval, not
  into the venv), as ``lm_eval --model hf --model_args pretrained=<base>,peft=<adapter>
  --tasks bench_heldout --include_path <dir> --batch_size 8 --device cpu``, through its Python entry point
  ``simple_evaluate`` with the same arguments. The task is a local JSONL file of the same documents
  (``loglikelihood_rolling``, ``doc_to_target: text``), scored under base + adapter (1 x tokens).
  Scoring is timed by wrapping ``HFLM.loglikelihood_rolling``; ``simple_evaluate`` as a whole is timed too.

Tokens evaluated per second compare like with like: scoring time against scoring time, and the
stage's whole run against ``simple_evaluate``'s. Its word and byte perplexity and bits per byte must
equal the stage's adapted-model numbers within 0.5%.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import WORK, Timer, child_main, fresh_run, import_ml_stack, run_stage_inprocess

TASK = "bench_heldout"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def ours(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    run_id = fresh_run("evaluate", params["run_id"])
    args = [
        f"base_model={params['base_model']}",
        f"adapter_uri={params['adapter_uri']}",
        f"dataset_uri={params['dataset_uri']}",
        f"max_eval_docs={params['docs']}",
        f"batch_size={params['batch_size']}",
        "min_relative_improvement=-1",  # the gate's verdict is not what is measured
        f"artifact_root={WORK}",
        f"run_id={run_id}",
    ]
    with Timer() as t:
        manifest = run_stage_inprocess("evaluate", args)
    m = manifest["metrics"]
    return {
        "seconds": m["eval_seconds"],
        "stage_seconds": t.seconds,
        "tokens": 2 * m["tokens"],  # base and adapted model each score every token
        "doc_tokens": m["tokens"],
        "tokens_per_second": 2 * m["tokens"] / m["eval_seconds"],
        "stage_tokens_per_second": 2 * m["tokens"] / t.seconds,
        "docs": m["docs"],
        "windows": m["windows"],
        "metrics": {k: m["adapted"][k] for k in METRICS},
        "base_metrics": {k: m["base"][k] for k in METRICS},
    }


def lm_eval(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    import lm_eval as harness
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    docs_source = Path(params["dataset_uri"]) / "validation_docs.jsonl"
    lines = docs_source.read_text(encoding="utf-8").splitlines()[: params["docs"]]
    tokenizer = AutoTokenizer.from_pretrained(params["base_model"])
    texts = [json.loads(line)["text"] for line in lines]
    doc_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])

    scoring = {"seconds": 0.0}
    original = HFLM.loglikelihood_rolling

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            scoring["seconds"] += time.perf_counter() - started

    HFLM.loglikelihood_rolling = timed
    with tempfile.TemporaryDirectory(prefix="bench-lm-eval-") as tmp:
        data = Path(tmp) / "docs.jsonl"
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        (Path(tmp) / f"{TASK}.yaml").write_text(
            f"task: {TASK}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
            "test_split: test\n"
            "output_type: loglikelihood_rolling\n"
            'doc_to_text: ""\n'
            "doc_to_target: text\n"
            "metric_list:\n" + "".join(f"  - metric: {m}\n" for m in METRICS)
        )
        adapter = Path(params["adapter_uri"]) / "adapter"
        with Timer() as t:
            results = harness.simple_evaluate(
                model="hf",
                model_args=f"pretrained={params['base_model']},peft={adapter}",
                tasks=[TASK],
                task_manager=TaskManager(include_path=tmp),
                batch_size=params["batch_size"],
                device="cpu",
            )
    scores = results["results"][TASK]
    return {
        "seconds": scoring["seconds"],
        "stage_seconds": t.seconds,
        "tokens": doc_tokens,
        "doc_tokens": doc_tokens,
        "tokens_per_second": doc_tokens / scoring["seconds"],
        "stage_tokens_per_second": doc_tokens / t.seconds,
        "docs": len(lines),
        "metrics": {m: scores[f"{m},none"] for m in METRICS},
        "version": harness.__version__,
    }


SIDES = {"ours": ours, "lm_eval": lm_eval}

if __name__ == "__main__":
    sys.exit(child_main(SIDES))
