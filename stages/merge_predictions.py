"""Merge the shard outputs of a fanned-out batch_infer into one predictions.jsonl, in shard order.

    python -m stages.merge_predictions artifact_root=s3://bucket/genai run_id=bi-1 num_shards=4

Reads ``<artifact_root>/runs/<run_id>/batch_infer/shard-<i:05d>-of-<n:05d>/predictions.jsonl`` for
i = 0..n-1 (each shard must be committed) and writes
``<artifact_root>/runs/<run_id>/merge_predictions/predictions.jsonl``: shard 0's records, then
shard 1's, and so on. Shards are contiguous slices of the prompts, so this is the input order.
With ``num_shards=1`` the unsharded ``batch_infer/predictions.jsonl`` is taken as it is.
Records are streamed, never all held in memory; ids must be unique across shards.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from stages.core import layout, manifest, store, uris
from stages.core.config import check, help_field
from stages.core.errors import UserError
from stages.core.runner import StageConfig, StageRun, run_stage

log = logging.getLogger("stages.merge_predictions")


@dataclass(kw_only=True)
class MergePredictionsConfig(StageConfig):
    predictions_uri: str = help_field("", "The batch_infer output holding the shard folders; empty means this run's.")
    num_shards: int = help_field(1, "How many shards batch_infer was split into; every one must be committed.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.resolve_input("predictions_uri", layout.BATCH_INFER)
        check(1 <= self.num_shards <= 99_999, f"num_shards={self.num_shards} must be in [1, 99999]")


def shard_uris(config: MergePredictionsConfig) -> list[str]:
    if config.num_shards == 1:
        return [config.predictions_uri]
    count = config.num_shards
    return [uris.join(config.predictions_uri, layout.shard_name(i, count)) for i in range(count)]


def inputs(config: MergePredictionsConfig) -> dict[str, str]:
    """Every shard, committed: a missing or half-written shard is an error, never a silently short file."""
    shards = shard_uris(config)
    missing = [uri for uri in shards if manifest.read(uri) is None]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(shards)} batch_infer shard(s) are not committed (no manifest.json), "
            f"first: {missing[0]}; rerun those shards, or check num_shards={config.num_shards}"
        )
    return {f"shard_{i:05d}": uri for i, uri in enumerate(shards)}


def merge(config: MergePredictionsConfig, run: StageRun) -> dict[str, Any]:
    merged = run.scratch / layout.PREDICTIONS
    seen: set[Any] = set()
    per_shard = []
    with merged.open("wb") as out:
        for uri in shard_uris(config):
            count = 0
            source = uris.join(uri, layout.PREDICTIONS)
            with store.open_file(source, "rb") as fh:
                for number, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    try:
                        record_id = json.loads(raw)["id"]
                    except (ValueError, KeyError, TypeError):
                        raise UserError(f"{source} line {number} is not a prediction record with an id") from None
                    key = json.dumps(record_id)
                    if key in seen:
                        raise UserError(f"{source} line {number}: id {record_id!r} appears in more than one record")
                    seen.add(key)
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    count += 1
            per_shard.append(count)
    store.upload_file(merged, run.output(layout.PREDICTIONS))

    # Sanity check: the committed file holds exactly the records read.
    with store.open_file(run.output(layout.PREDICTIONS), "rb") as fh:
        lines = sum(1 for _ in fh)
    if lines != sum(per_shard):
        raise RuntimeError(f"merged file has {lines} lines, expected {sum(per_shard)}")
    log.info("merged %d shard(s), %d records, into %s", len(per_shard), sum(per_shard), run.output(layout.PREDICTIONS))
    return {"records": sum(per_shard), "shards": len(per_shard), "records_per_shard": per_shard}


def main(argv: list[str] | None = None) -> int:
    return run_stage("merge_predictions", MergePredictionsConfig, inputs, merge, argv)


if __name__ == "__main__":
    sys.exit(main())
