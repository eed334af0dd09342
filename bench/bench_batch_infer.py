"""batch_infer: the stage's generated tokens/s vs per-prompt generate and vs one plain batched generate.

    python -m bench.run --only batch_infer,batch_infer_sft

Two rows: ``batch_infer`` on text prompts (``{"id", "prompt"}``), ``batch_infer_sft`` on chat prompts
(``{"id", "messages"}``, the last turn the user's) with an adapter trained on conversations (the
``template`` parameter: the chat template both sides render with).

Sides (each its own process; greedy, the same prompts, model, adapter and ``max_new_tokens``):

- ``ours``: ``stages.batch_infer`` (fresh run): length-sorted, left-padded batches of ``batch_size``, the
  adapter merged into the weights, ``torch.inference_mode``. Timed by its own ``generate_seconds``
  (prompts already tokenized, as on the other sides); the whole stage's time is reported too.
- ``loop``: base + ``PeftModel`` as loaded (adapter not merged), one ``model.generate`` per prompt.
- ``batched``: the same model, one plain ``model.generate`` per 64 prompts in input order (left padding,
  attention mask), i.e. what a user writes after reading the generate docs.

Chat prompts: the baselines render each conversation with ``apply_chat_template(..., add_generation_prompt=True)``
(the same template as the stage, which reads it beside the adapter) and stop at the end of turn
(``<|im_end|>``) or end-of-text, as the stage does; the batched side lets ``apply_chat_template`` pad the batch.

Generated tokens are counted alike: each completion up to (not including) its first stop token.
Every baseline completion is compared with the stage's; a difference is a near-tie when, at the first
token where they part, the baseline's top two logits are within ``NEAR_TIE`` of each other (float
rounding of batched vs unbatched matmuls can flip such an argmax, and nothing else should differ).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import WORK, Timer, child_main, fresh_run, import_ml_stack, run_stage_inprocess

NEAR_TIE = 1e-3  # logits; fp32 batched vs unbatched matmuls differ by ~1e-5
END_OF_TURN = "<|im_end|>"  # the SFT rows' ChatML template (bench.common.SFT_TEMPLATE) closes a turn with it


def ours(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    run_id = fresh_run("batch_infer", params["run_id"])
    args = [
        f"base_model={params['base_model']}",
        f"adapter_uri={params['adapter_uri']}",
        f"prompts_uri={params['prompts']}",
        f"batch_size={params['batch_size']}",
        f"max_new_tokens={params['max_new_tokens']}",
        f"artifact_root={WORK}",
        f"run_id={run_id}",
    ]
    with Timer() as t:
        manifest = run_stage_inprocess("batch_infer", args)
    metrics = manifest["metrics"]
    predictions = WORK / "runs" / run_id / "batch_infer" / "predictions.jsonl"
    lengths = [json.loads(line)["completion_tokens"] for line in predictions.read_text().splitlines()]
    return {
        "seconds": metrics["generate_seconds"],
        "stage_seconds": t.seconds,
        "tokens": metrics["generated_tokens"],
        "tokens_per_second": metrics["generated_tokens"] / metrics["generate_seconds"],
        "prompts": metrics["prompts"],
        "batches": metrics["batches"],
        "predictions": str(predictions),
        "prompt_tokens": metrics["prompt_tokens"],
        "stopped_early": sum(n < params["max_new_tokens"] for n in lengths),  # at a stop token
    }


def _load(params: dict[str, Any]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(params["base_model"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(params["base_model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(Path(params["adapter_uri"]) / "adapter"))
    model.eval()
    records = [json.loads(line) for line in Path(params["prompts"]).read_text().splitlines() if line.strip()]
    return model, tokenizer, records


def _template(params: dict[str, Any]) -> str | None:
    """The chat template of a chat row (None for text prompts)."""
    return Path(params["template"]).read_text(encoding="utf-8") if params.get("template") else None


def _prompt_ids(tokenizer, record: dict[str, Any], template: str | None) -> list[int]:
    if template is None:
        return tokenizer(record["prompt"])["input_ids"]
    return tokenizer.apply_chat_template(
        record["messages"], chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def _stops(tokenizer, template: str | None) -> list[int]:
    """End-of-text, and for chat prompts the end of turn before it."""
    return ([tokenizer.convert_tokens_to_ids(END_OF_TURN)] if template else []) + [tokenizer.eos_token_id]


def _cut(row: list[int], stops: list[int]) -> list[int]:
    return row[: next((k for k, token in enumerate(row) if token in stops), len(row))]


def _compare(model, tokenizer, records, completions: list[list[int]], params: dict[str, Any]) -> dict[str, Any]:
    """How many completions differ from the stage's, and whether each difference starts at a near-tie."""
    import torch

    theirs = [json.loads(line)["completion"] for line in Path(params["ours_predictions"]).read_text().splitlines()]
    template = _template(params)
    differ, near_ties, gaps = 0, 0, []
    for record, tokens, other in zip(records, completions, theirs, strict=True):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text == other:
            continue
        differ += 1
        # the first generated token whose decoded prefix stops matching the stage's completion
        step = next(
            (k for k in range(1, len(tokens) + 1) if not other.startswith(tokenizer.decode(tokens[:k]))),
            len(tokens),
        )
        prompt = _prompt_ids(tokenizer, record, template)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + tokens[: step - 1]])).logits[0, -1]
        top2 = torch.topk(logits.float(), 2).values
        gap = float(top2[0] - top2[1])
        gaps.append(gap)
        near_ties += gap < NEAR_TIE
    return {"differ_from_ours": differ, "near_ties": near_ties, "tie_gaps": gaps}


def loop(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()

    import torch

    model, tokenizer, records = _load(params)
    template = _template(params)
    stops = _stops(tokenizer, template)
    encoded = [torch.tensor([_prompt_ids(tokenizer, r, template)]) for r in records]
    completions = []
    with Timer() as t:
        for ids in encoded:
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=params["max_new_tokens"],
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
            )
            completions.append(_cut(out[0, ids.shape[1] :].tolist(), stops))
    tokens = sum(len(c) for c in completions)
    return {
        "seconds": t.seconds,
        "tokens": tokens,
        "tokens_per_second": tokens / t.seconds,
        **_compare(model, tokenizer, records, completions, params),
    }


def batched(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()

    model, tokenizer, records = _load(params)
    template = _template(params)
    stops = _stops(tokenizer, template)
    size = params["batch_size"]
    chunks = [records[i : i + size] for i in range(0, len(records), size)]
    if template is None:
        batches = [tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True) for chunk in chunks]
    else:
        batches = [
            tokenizer.apply_chat_template(
                [r["messages"] for r in chunk],
                chat_template=template,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                padding=True,
            )
            for chunk in chunks
        ]
    completions = []
    with Timer() as t:
        for enc in batches:
            out = model.generate(
                **enc,
                max_new_tokens=params["max_new_tokens"],
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
            )
            completions += [_cut(row, stops) for row in out[:, enc["input_ids"].shape[1] :].tolist()]
    tokens = sum(len(c) for c in completions)
    return {
        "seconds": t.seconds,
        "tokens": tokens,
        "tokens_per_second": tokens / t.seconds,
        **_compare(model, tokenizer, records, completions, params),
    }


SIDES = {"ours": ours, "loop": loop, "batched": batched}

if __name__ == "__main__":
    sys.exit(child_main(SIDES))
