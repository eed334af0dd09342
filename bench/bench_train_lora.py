"""train_lora: the stage's trained tokens/s vs the Hugging Face Trainer + PEFT, same model, LoRA, batch and data.

    python -m bench.run --only train_lora

Sides (each its own process):

- ``ours``: ``stages.train_lora`` (fresh run) on the packed blocks of the tokenize fixture; its own
  ``tokens_per_second`` (the training loop, the adapter save and the sanity check; model loading before
  it is outside the clock on both sides).
- ``trainer``: ``transformers.Trainer`` on the same blocks (``labels = input_ids``), the same ``LoraConfig``
  (r, alpha, dropout, every linear projection), batch, steps, learning-rate schedule, warmup and
  gradient clipping, with Trainer defaults otherwise (fused AdamW, no saving, no evaluation).
  Timed by ``trainer.train()``.

Padding: both sides train on the same fixed-length packed blocks, so no token is padding; the only
tokens lost are the tail of each split that does not fill a block (``tokens_dropped_in_packing``).
For scale, the ``ours`` side also reports what batching the same documents one per row, padded to
the longest in each batch of 8 (truncated at the block size), would have wasted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.common import WORK, Timer, child_main, fresh_run, import_ml_stack, run_stage_inprocess

LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.05}
SCHEDULE = {"learning_rate": 5e-4, "lr_schedule": "cosine", "warmup_steps": 10, "max_grad_norm": 1.0}


def ours(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    run_id = fresh_run("train_lora", params["run_id"])
    args = [
        f"base_model={params['base_model']}",
        f"dataset_uri={params['dataset_uri']}",
        f"artifact_root={WORK}",
        f"run_id={run_id}",
        f"batch_size={params['batch_size']}",
        f"max_steps={params['steps']}",
        f"rank={LORA['rank']}",
        f"alpha={LORA['alpha']}",
        f"dropout={LORA['dropout']}",
        *(f"{k}={v}" for k, v in SCHEDULE.items()),
    ]
    with Timer() as t:
        manifest = run_stage_inprocess("train_lora", args)
    metrics = manifest["metrics"]
    tokenize_metrics = _tokenize_metrics(params["dataset_uri"])
    result = {
        "seconds": metrics["trained_tokens_this_attempt"] / metrics["tokens_per_second"],
        "stage_seconds": t.seconds,
        "tokens": metrics["trained_tokens_this_attempt"],
        "tokens_per_second": metrics["tokens_per_second"],
        "padding_tokens": 0,
        "tokens_dropped_in_packing": tokenize_metrics["tokens_dropped_in_packing"],
        "tokens_total": tokenize_metrics["tokens_total"],
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["final_loss"],
        "trainable_parameters": metrics["trainable_parameters"],
        "total_parameters": metrics["total_parameters"],
    }
    if params.get("padded_comparison"):
        result["padded_per_document_waste"] = _padded_waste(params, metrics)
    return result


def _tokenize_metrics(dataset_uri: str) -> dict[str, Any]:
    import json

    return json.loads((Path(dataset_uri) / "manifest.json").read_text())["metrics"]


def _padded_waste(params: dict[str, Any], metrics: dict[str, Any]) -> float:
    """Share of padding if the training documents were batched one per row (8 per batch, padded)."""
    import json

    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(params["base_model"]) / "tokenizer.json"))
    docs = [json.loads(line)["text"] for line in (Path(params["dataset_uri"]) / "validation_docs.jsonl").open()]
    lengths = np.array([min(len(e.ids) + 1, 128) for e in tokenizer.encode_batch_fast(docs)])
    lengths = lengths[np.random.default_rng(0).permutation(len(lengths))]
    batches = [lengths[i : i + params["batch_size"]] for i in range(0, len(lengths), params["batch_size"])]
    padded = sum(len(b) * int(b.max()) for b in batches)
    return 1 - int(lengths.sum()) / padded


def trainer(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from stages.train_lora import ALL_LINEAR

    torch.manual_seed(0)
    blocks = datasets.load_from_disk(str(Path(params["dataset_uri"]) / "dataset"))["train"]
    blocks = blocks.map(lambda b: {"labels": b["input_ids"]}, batched=True)
    model = AutoModelForCausalLM.from_pretrained(params["base_model"], dtype=torch.float32)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=ALL_LINEAR,
    )
    model = get_peft_model(model, lora)
    fresh_run("train_lora", params["run_id"])
    output_dir = WORK / "runs" / params["run_id"] / "trainer"
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=params["batch_size"],
        max_steps=params["steps"],
        learning_rate=SCHEDULE["learning_rate"],
        lr_scheduler_type=SCHEDULE["lr_schedule"],
        warmup_steps=SCHEDULE["warmup_steps"],
        max_grad_norm=SCHEDULE["max_grad_norm"],
        weight_decay=0.0,
        logging_steps=1,  # the loss of every step, as ours records it
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    run = Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator)
    with Timer() as t:
        out = run.train()
    tokens = params["steps"] * params["batch_size"] * len(blocks[0]["input_ids"])
    losses = [h["loss"] for h in run.state.log_history if "loss" in h]
    return {
        "seconds": t.seconds,
        "tokens": tokens,
        "tokens_per_second": tokens / t.seconds,
        "trainer_runtime": out.metrics.get("train_runtime"),
        "padding_tokens": 0,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
    }


SIDES = {"ours": ours, "trainer": trainer}

if __name__ == "__main__":
    sys.exit(child_main(SIDES))
