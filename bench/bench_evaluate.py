"""evaluate: the stage's evaluated tokens/s vs lm-evaluation-harness on the same model, adapter and text, and
on held-out conversations (task=sft) vs lm-evaluation-harness and a plain transformers loop.

    python -m bench.run --only evaluate,evaluate_sft

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

Held-out conversations (``task="sft"``: the tokenize fixture's ``validation_docs.jsonl`` of ``messages``
records, an adapter trained on the conversations):

- ``ours``: the stage as above; it scores the assistant's tokens of every conversation (loss and perplexity)
  under base + adapter and under the base, then generates each conversation's last assistant turn with both.
  The scoring is timed by wrapping ``stages.evaluate.assistant_loglikelihood`` (the conversations are already
  rendered and labelled when it is called); ``eval_seconds`` (scoring and generation) and the whole stage are
  reported too.
- ``loop``: what a user writes with transformers alone: each conversation rendered with
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` (the template's ``{% generation %}`` tags
  mark the assistant's tokens, the way TRL's ``assistant_only_loss`` finds them), labels -100 elsewhere, and
  one ``model(input_ids, labels=labels)`` per conversation under ``torch.inference_mode``; the mean loss times
  the conversation's loss tokens, summed. Base + adapter (the ``PeftModel``), then the base
  (``disable_adapter``), as ours. Rendering is outside the clock, as on our side.

- ``lm_eval_sft``: lm-evaluation-harness's ``HFLM.loglikelihood`` (the first round's baseline, as a user
  scores a chat with it): one request per assistant turn, the conversation before it rendered with the
  generation prompt as the context, the turn's content and ``<|im_end|>`` as the continuation; base + adapter
  (``peft=``) and the base, batch size 8. lm-eval moves the context's trailing newline into the
  continuation, so it scores that token too; for the perplexity check only (outside the clock), that
  newline's log-likelihood, also scored by lm-eval, is subtracted.

Tokens evaluated count every token of each conversation fed to the model, once per model (lm-eval feeds the
turns before an assistant turn once per turn; it is credited with the conversation's tokens, as the others).
The assistant perplexity of both models must agree within 0.5%.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import WORK, Timer, child_main, fresh_run, import_ml_stack, run_stage_inprocess

TASK = "bench_heldout"
SFT_METRICS = ("assistant_perplexity",)
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def ours(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    if params.get("task") == "sft":
        return ours_sft(params)
    run_id = fresh_run("evaluate", params["run_id"])
    with Timer() as t:
        manifest = run_stage_inprocess("evaluate", _stage_args(params, run_id))
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


def _stage_args(params: dict[str, Any], run_id: str) -> list[str]:
    return [
        f"base_model={params['base_model']}",
        f"adapter_uri={params['adapter_uri']}",
        f"dataset_uri={params['dataset_uri']}",
        f"max_eval_docs={params['docs']}",
        f"batch_size={params['batch_size']}",
        "min_relative_improvement=-1",  # the gate's verdict is not what is measured
        f"artifact_root={WORK}",
        f"run_id={run_id}",
    ]


def ours_sft(params: dict[str, Any]) -> dict[str, Any]:
    from stages import evaluate

    scoring = {"seconds": 0.0, "tokens": 0}
    original = evaluate.assistant_loglikelihood

    def timed(model, examples, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(model, examples, *args, **kwargs)
        finally:
            scoring["seconds"] += time.perf_counter() - started
            scoring["tokens"] += sum(len(ids) for ids, _ in examples)

    evaluate.assistant_loglikelihood = timed
    run_id = fresh_run("evaluate", params["run_id"])
    with Timer() as t:
        manifest = run_stage_inprocess("evaluate", _stage_args(params, run_id))
    m = manifest["metrics"]
    return {
        "seconds": scoring["seconds"],
        "stage_seconds": t.seconds,
        "eval_seconds": m["eval_seconds"],
        "tokens": scoring["tokens"],  # base and adapted model each score every conversation
        "doc_tokens": scoring["tokens"] // 2,
        "tokens_per_second": scoring["tokens"] / scoring["seconds"],
        "docs": m["conversations"],
        "assistant_tokens": m["assistant_tokens"],
        "metrics": {k: m["adapted"][k] for k in SFT_METRICS},
        "base_metrics": {k: m["base"][k] for k in SFT_METRICS},
    }


def loop(params: dict[str, Any]) -> dict[str, Any]:
    """Assistant-token loss of each held-out conversation, one forward pass each (task=sft)."""
    import_ml_stack()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(params["base_model"])
    template = Path(params["template"]).read_text(encoding="utf-8")
    lines = (Path(params["dataset_uri"]) / "validation_docs.jsonl").read_text(encoding="utf-8").splitlines()
    conversations = [json.loads(line)["messages"] for line in lines[: params["docs"]]]
    base = AutoModelForCausalLM.from_pretrained(params["base_model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(Path(params["adapter_uri"]) / "adapter"))
    model.eval()
    encoded = []
    for turns in conversations:
        enc = tokenizer.apply_chat_template(
            turns, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = torch.tensor([enc["input_ids"]])
        labels = torch.where(torch.tensor([enc["assistant_masks"]]) == 1, ids, -100)
        encoded.append((ids, labels, int((labels[0, 1:] != -100).sum())))

    def loglikelihood() -> float:
        total = 0.0
        with torch.inference_mode():
            for ids, labels, scored in encoded:
                total -= model(input_ids=ids, labels=labels).loss.item() * scored
        return total

    with Timer() as t:
        adapted = loglikelihood()
        with model.disable_adapter():
            base_ll = loglikelihood()
    doc_tokens = sum(ids.shape[1] for ids, _, _ in encoded)
    loss_tokens = sum(scored for _, _, scored in encoded)
    return {
        "seconds": t.seconds,
        "tokens": 2 * doc_tokens,
        "doc_tokens": doc_tokens,
        "tokens_per_second": 2 * doc_tokens / t.seconds,
        "docs": len(encoded),
        "assistant_tokens": loss_tokens,
        "metrics": {"assistant_perplexity": math.exp(-adapted / loss_tokens)},
        "base_metrics": {"assistant_perplexity": math.exp(-base_ll / loss_tokens)},
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


def lm_eval_sft(params: dict[str, Any]) -> dict[str, Any]:
    """The held-out conversations as lm-evaluation-harness scores a chat: one ``loglikelihood`` request per
    assistant turn, its context the conversation before it (with the template's generation prompt), its
    continuation the turn's content and end of turn (task=sft)."""
    import_ml_stack()
    import lm_eval as harness
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(params["base_model"])
    template = Path(params["template"]).read_text(encoding="utf-8")
    lines = (Path(params["dataset_uri"]) / "validation_docs.jsonl").read_text(encoding="utf-8").splitlines()
    conversations = [json.loads(line)["messages"] for line in lines[: params["docs"]]]

    def render(turns, prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            turns, chat_template=template, tokenize=False, add_generation_prompt=prompt
        )

    requests, newlines = [], []
    for turns in conversations:
        for i, turn in enumerate(turns):
            if turn["role"] == "assistant":
                context = render(turns[:i], prompt=True)
                requests.append((context, turn["content"] + "<|im_end|>"))
                # lm-eval moves a context's trailing whitespace (the newline after the role) into the
                # continuation, so it scores that newline too; scored alone, for the check only.
                stripped = context.rstrip()
                newlines.append((stripped, context[len(stripped) :]))
    doc_tokens = sum(len(tokenizer(render(turns, prompt=False), add_special_tokens=False)["input_ids"])
                     for turns in conversations)  # fmt: skip
    adapter = Path(params["adapter_uri"]) / "adapter"
    common = {"pretrained": params["base_model"], "batch_size": params["batch_size"], "device": "cpu"}
    models = {"adapted": HFLM(**common, peft=str(adapter)), "base": HFLM(**common)}

    def loglikelihood(lm, pairs) -> list[float]:
        instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        return [logprob for logprob, _ in lm.loglikelihood(instances, disable_tqdm=True)]

    with Timer() as t:
        scored = {name: sum(loglikelihood(lm, requests)) for name, lm in models.items()}
    newline = {name: sum(loglikelihood(lm, newlines)) for name, lm in models.items()}
    loss_tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in requests)

    def perplexity(name: str) -> float:
        return math.exp(-(scored[name] - newline[name]) / loss_tokens)

    return {
        "seconds": t.seconds,
        "tokens": 2 * doc_tokens,
        "doc_tokens": doc_tokens,
        "tokens_per_second": 2 * doc_tokens / t.seconds,
        "docs": len(conversations),
        "requests": len(requests),
        "assistant_tokens": loss_tokens,
        "metrics": {"assistant_perplexity": perplexity("adapted")},
        "base_metrics": {"assistant_perplexity": perplexity("base")},
        "version": harness.__version__,
    }


SIDES = {"ours": ours, "lm_eval": lm_eval, "loop": loop, "lm_eval_sft": lm_eval_sft}

if __name__ == "__main__":
    sys.exit(child_main(SIDES))
