"""tokenize, task=sft: the real stage end to end vs TRL's dataset preparation for ``SFTTrainer``, same conversations.

    python -m bench.run --only tokenize_sft

Sides (each its own process; ``python -m bench.bench_tokenize_sft <side> '<params json>' <out json>``):

- ``ours``: ``stages.tokenize task=sft`` in full: read the JSONL, check and deduplicate the conversations,
  render each with the chat template (``template``: a Jinja file; empty: the tokenizer's own), label the
  assistant's tokens, split, pack (best-fit decreasing) and write the dataset, the validation conversations
  and the template, commit the manifest. Timed from the call to its return.
- ``trl``: what ``SFTTrainer`` does to the same file before it trains: ``load_dataset("json")``, then its
  ``_prepare_dataset`` (the code its constructor runs): the chat template with ``{% generation %}``
  tracking (``assistant_only_loss=True``), tokenization, the labels from the assistant mask, and packing
  (``packing=True``, its default best-fit-decreasing strategy, ``max_length`` = our block size), with
  ``datasets``' default of one process. The datasets cache is a fresh folder per run, so nothing is reused.
  The trainer is built around a one-conversation dataset first, outside the clock (its constructor loads the
  model and compiles the template); the clock covers loading and preparing the real file.

Tokens are counted alike on both sides: every token of every rendered conversation (not padding). Loss
tokens (labels that are not -100) are reported for both, to show that they label the same tokens.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import WORK, Timer, child_main, fresh_run, import_ml_stack, run_stage_inprocess


def ours(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    run_id = fresh_run("tokenize", params["run_id"])
    args = [
        f"input_uri={params['conversations']}",
        f"base_model={params['base_model']}",
        "task=sft",
        *([f"chat_template={params['template']}"] if params["template"] else []),
        f"block_size={params['block_size']}",
        f"artifact_root={WORK}",
        f"run_id={run_id}",
    ]
    with Timer() as t:
        manifest = run_stage_inprocess("tokenize", args)
    metrics = manifest["metrics"]
    return {
        "seconds": t.seconds,
        "tokens": metrics["tokens_total"],
        "tokens_per_second": metrics["tokens_total"] / t.seconds,
        "loss_tokens": metrics["tokens_with_loss"],
        "conversations": metrics["records_kept"],
        "examples": metrics["train_examples"] + metrics["validation_examples"],
        "blocks": metrics["train_blocks"] + metrics["validation_blocks"],
        "padding_share": metrics["padding_share"],
        "stage_metrics": metrics,
    }


def trl(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    import datasets
    import torch
    import trl as trl_package
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(params["base_model"])
    tokenizer.chat_template = Path(params["template"]).read_text(encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(params["base_model"], dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        args = SFTConfig(
            output_dir=f"{tmp}/out",
            max_length=params["block_size"],
            packing=True,
            assistant_only_loss=True,
            report_to="none",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
        )
        first = datasets.load_dataset("json", data_files=params["conversations"], split="train[:1]", cache_dir=tmp)
        trainer = SFTTrainer(model=model, args=args, train_dataset=first, processing_class=tokenizer)
        with Timer() as t:
            dataset = datasets.load_dataset(
                "json", data_files=params["conversations"], split="train", cache_dir=f"{tmp}/cache"
            )
            prepared = trainer._prepare_dataset(dataset, tokenizer, args, args.packing, None, "train")
        lengths = [sum(s) for s in prepared["seq_lengths"]]
        # The file's template renders what the tokenizer's own ChatML renders, character for character.
        own = AutoTokenizer.from_pretrained(params["base_model"])
        same_text = all(
            own.apply_chat_template(r["messages"], tokenize=False)
            == tokenizer.apply_chat_template(r["messages"], tokenize=False)
            for r in dataset
        )
        loss_tokens = sum(sum(1 for x in labels if x != -100) for labels in prepared["labels"])
        blocks = len(prepared)
    tokens = sum(lengths)
    return {
        "seconds": t.seconds,
        "tokens": tokens,
        "tokens_per_second": tokens / t.seconds,
        "loss_tokens": loss_tokens,
        "conversations": len(dataset),
        "blocks": blocks,
        "padding_share": 1 - tokens / (blocks * params["block_size"]),
        "trl_version": trl_package.__version__,
        "same_text_as_own_template": same_text,
    }


SIDES = {"ours": ours, "trl": trl}

if __name__ == "__main__":
    sys.exit(child_main(SIDES))
