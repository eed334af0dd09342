"""train_lora on SFT data: assistant tokens trained per second vs TRL's ``SFTTrainer`` + PEFT, same model and data.

    python -m bench.run --only train_lora_sft

Sides (each its own process):

- ``ours``: ``stages.train_lora`` (fresh run) on the packed SFT blocks of the tokenize fixture (labels on the
  assistant's tokens, position ids restarting for each example in a block, no attention mask).
- ``trl``: ``trl.SFTTrainer`` with ``peft_config`` on the train conversations of the same fixture (every
  conversation but the ones tokenize held out for validation), the same chat template, ``assistant_only_loss``,
  ``max_length`` = our block size, the same ``LoraConfig``, learning rate, schedule, warmup, clipping and
  seed; fp32 and no gradient checkpointing, as ours on a CPU (SFTConfig's defaults are bf16 and checkpointing
  on). ``packing=false``: one conversation per row, padded to the longest in the batch, with as many
  conversations per step as ours packs into its blocks on average (so the same real tokens per step).
  ``packing=true``: TRL's own best-fit-decreasing packing, as many blocks per step as ours; TRL then runs
  padding-free (the step's blocks flattened into one row, with position ids).

What counts, on both sides alike: the loss tokens of every optimizer step, counted from the batch the model
got (labels after the shift that are not -100), and the time from the end of step ``warmup`` to the end
of the last step, so the first steps (allocator, first-call overheads) are left out the same way on both
sides. Model loading, data preparation, the adapter save and the stage's manifest are outside the clock.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import WORK, child_main, fresh_run, import_ml_stack, run_stage_inprocess

LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.05}
SCHEDULE = {"learning_rate": 5e-4, "lr_schedule": "cosine", "warmup_steps": 10, "max_grad_norm": 1.0}


def steady_rate(marks: list[tuple[float, int, int]], warmup: int) -> dict[str, Any]:
    """Loss tokens per second over the steps after the first ``warmup`` (>= 1: the end of a step starts the
    clock). ``marks``: (time at the end of the step, loss tokens, token slots) per optimizer step."""
    if not 1 <= warmup < len(marks):
        raise ValueError(f"warmup={warmup} must be >= 1 and leave some of the {len(marks)} steps to time")
    timed = marks[warmup:]
    seconds = timed[-1][0] - marks[warmup - 1][0]
    loss_tokens = sum(m[1] for m in timed)
    step_seconds = [b[0] - a[0] for a, b in zip(marks[warmup - 1 :], timed, strict=False)]
    return {
        "seconds": seconds,
        "tokens": loss_tokens,
        "tokens_per_second": loss_tokens / seconds,
        # A cross-check that a few steps slowed by other work on the machine barely moves
        "median_step_tokens_per_second": loss_tokens / (statistics.median(step_seconds) * len(timed)),
        "step_seconds": step_seconds,
        "slot_tokens": sum(m[2] for m in timed),
        "timed_steps": len(timed),
        "loss_tokens_per_step": [m[1] for m in marks],
    }


def ours(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    from stages import train_lora

    marks: list[tuple[float, int, int]] = []
    step = train_lora.LoRARecipe.train_step

    def timed_step(recipe) -> float:
        loss_tokens, slots = recipe.loss_tokens, recipe.trained_tokens
        loss = step(recipe)
        marks.append((time.perf_counter(), recipe.loss_tokens - loss_tokens, recipe.trained_tokens - slots))
        return loss

    train_lora.LoRARecipe.train_step = timed_step
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
    metrics = run_stage_inprocess("train_lora", args)["metrics"]
    return {
        **steady_rate(marks, params["warmup"]),
        "stage_loss_tokens_per_second": metrics["loss_tokens_per_second"],
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["final_loss"],
        "trainable_parameters": metrics["trainable_parameters"],
        "total_parameters": metrics["total_parameters"],
        "rows_per_step": params["batch_size"],
    }


def train_conversations(conversations: str, dataset_uri: str) -> list[dict[str, Any]]:
    """The conversations tokenize put in the train split: all of them but the validation ones it wrote out."""
    held_out = {
        json.dumps(json.loads(line)["messages"], sort_keys=True)
        for line in (Path(dataset_uri) / "validation_docs.jsonl").read_text(encoding="utf-8").splitlines()
    }
    records = [json.loads(line) for line in Path(conversations).read_text(encoding="utf-8").splitlines()]
    return [r for r in records if json.dumps(r["messages"], sort_keys=True) not in held_out]


def trl(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    import datasets
    import torch
    import trl as trl_package
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from stages.train_lora import ALL_LINEAR

    datasets.disable_progress_bars()
    marks: list[tuple[float, int, int]] = []
    real: list[int] = []  # tokens that are not padding, per step
    counts = {"loss": 0, "slots": 0, "real": 0}

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            counts["loss"] += int((labels[..., 1:] != -100).sum())
            counts["slots"] += labels.numel()
            mask = inputs.get("attention_mask")  # padding-free batches have none: every slot is a token
            counts["real"] += int(mask.sum()) if mask is not None else labels.numel()
            return super().training_step(model, inputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), counts["loss"], counts["slots"]))
            real.append(counts["real"])
            counts.update(loss=0, slots=0, real=0)

    records = train_conversations(params["conversations"], params["dataset_uri"])
    tokenizer = AutoTokenizer.from_pretrained(params["base_model"])
    tokenizer.chat_template = Path(params["template"]).read_text(encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(params["base_model"], dtype=torch.float32)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=ALL_LINEAR,
    )
    fresh_run("train_lora", params["run_id"])
    args = SFTConfig(
        output_dir=str(WORK / "runs" / params["run_id"] / "trl"),
        per_device_train_batch_size=params["rows_per_step"],
        max_steps=params["steps"],
        learning_rate=SCHEDULE["learning_rate"],
        lr_scheduler_type=SCHEDULE["lr_schedule"],
        warmup_steps=SCHEDULE["warmup_steps"],
        max_grad_norm=SCHEDULE["max_grad_norm"],
        weight_decay=0.0,
        max_length=params["block_size"],
        packing=params["packing"],
        assistant_only_loss=True,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,  # the loss of every step, as ours records it
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = CountingSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepClock()],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        **steady_rate(marks, params["warmup"]),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "padding_share": 1 - sum(real) / sum(m[2] for m in marks),
        "conversations": len(records),
        "rows_per_step": params["rows_per_step"],
        "trl_version": trl_package.__version__,
    }


SIDES = {"ours": ours, "trl": trl}

if __name__ == "__main__":
    sys.exit(child_main(SIDES))
