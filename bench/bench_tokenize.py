"""tokenize: the real stage end to end vs datasets.map one row at a time, and vs raw encode_batch (the limit).

    python -m bench.run --only tokenize

Sides (each its own process; ``python -m bench.bench_tokenize <side> '<params json>' <out json>``):

- ``ours``: ``stages.tokenize`` in full: read the files, clean, dedup, split, tokenize, pack, write the
  dataset and the validation documents, commit the manifest. Timed from the call to its return.
- ``datasets_map``: the documents the stage keeps (cleaned outside the clock), tokenized by
  ``Dataset.map`` one row at a time with the model's ``AutoTokenizer`` (no packing, no writing).
- ``encode_batch``: the same documents through the raw ``tokenizers`` ``encode_batch`` (Rust, all cores,
  no I/O, no Python per token): the limit. ``encode_batch_fast`` (no offsets) is timed too; the
  faster of the two is the limit. Each call gets a freshly loaded tokenizer (outside the clock), as the
  stage does: a tokenizer that has seen the documents answers most words from its BPE cache.

Tokens are counted alike on every side: each document's tokens plus the end-of-text token after it.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from bench.common import TINY_BASE, WORK, Timer, child_main, corpus, fresh_run, import_ml_stack, run_stage_inprocess

TEXT_UNIT = "line"  # one line, one document: see bench.common.corpus


def _documents(scale: int) -> list[str]:
    """The cleaned, deduplicated documents the stage tokenizes (in input order)."""
    from stages.tokenize import Piece, TokenizeConfig, ingest

    folder = corpus(scale)
    config = TokenizeConfig(
        input_uri=str(folder), base_model=str(TINY_BASE), text_unit=TEXT_UNIT, artifact_root=str(WORK), run_id="docs"
    )
    return ingest([Piece(str(p)) for p in sorted(folder.iterdir())], config).docs


def ours(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    scale = params["scale"]
    run_id = fresh_run("tokenize", f"tokenize-{scale}x")
    args = [f"input_uri={corpus(scale)}", f"text_unit={TEXT_UNIT}", f"base_model={TINY_BASE}"]
    args += [f"artifact_root={WORK}", f"run_id={run_id}"]
    with Timer() as t:
        manifest = run_stage_inprocess("tokenize", args)
    metrics = manifest["metrics"]
    return {
        "seconds": t.seconds,
        "tokens": metrics["tokens_total"],
        "tokens_per_second": metrics["tokens_total"] / t.seconds,
        "docs": metrics["records_kept"],
        "padding_or_dropped_tokens": metrics["tokens_dropped_in_packing"],
        "stage_metrics": metrics,
    }


def datasets_map(params: dict[str, Any]) -> dict[str, Any]:
    import_ml_stack()
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    docs = _documents(params["scale"])
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_BASE))

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": tokenizer(row["text"], add_special_tokens=False)["input_ids"]}

    with Timer() as t:
        dataset = datasets.Dataset.from_dict({"text": docs})
        tokenized = dataset.map(encode, batched=False, remove_columns=["text"])
    tokens = sum(len(ids) for ids in tokenized["input_ids"]) + len(docs)
    return {"seconds": t.seconds, "tokens": tokens, "tokens_per_second": tokens / t.seconds, "docs": len(docs)}


def encode_batch(params: dict[str, Any]) -> dict[str, Any]:
    from tokenizers import Tokenizer

    docs = _documents(params["scale"])
    timings: dict[str, list[float]] = {"encode_batch": [], "encode_batch_fast": []}
    tokens = 0
    for _ in range(params.get("repeats", 3)):
        for name in timings:
            # A fresh tokenizer each time, as the stage has: a used one answers repeated words from its BPE cache.
            tokenizer = Tokenizer.from_file(str(TINY_BASE / "tokenizer.json"))
            tokenizer.no_padding()
            tokenizer.no_truncation()
            with Timer() as t:
                encodings = getattr(tokenizer, name)(docs, add_special_tokens=False)
            timings[name].append(t.seconds)
            tokens = sum(len(e.ids) for e in encodings) + len(docs)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    fastest = min(medians, key=medians.get)
    return {
        "seconds": medians[fastest],
        "tokens": tokens,
        "tokens_per_second": tokens / medians[fastest],
        "docs": len(docs),
        "method": fastest,
        "tokens_per_second_by_method": {name: tokens / s for name, s in medians.items()},
    }


SIDES = {"ours": ours, "datasets_map": datasets_map, "encode_batch": encode_batch}

if __name__ == "__main__":
    sys.exit(child_main(SIDES))
