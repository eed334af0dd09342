"""The plan task's cost estimate: train_lora's hours and price from the run conf, before any node scales up.

    PYTHONPATH=dags python -m genai_dags.cost_estimate values/gke/pipeline.yaml examples/finetune-demo.json

An estimate, labelled so: the tokens train_lora will process (``max_steps x batch_size x grad_accum_steps
x block_size``, from the conf over train_lora's defaults) over a throughput: the one train_lora measured
when it trained the model's champion on the same base model (:func:`measured_throughput`), else the one the
platform configured for its pool (``costs.train_tokens_per_second``); priced at that pool's price
(``costs.prices``). It leaves
out the other stages, node start-up, preemptions and retries; what a run really cost is measured from its
attempts (``stages.core.costs``) and reported by publish.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from genai_dags import memory_plan
from genai_dags.settings import PipelineSettings, load_file


def measured_throughput(params: dict[str, Any], settings: PipelineSettings) -> tuple[float, str] | None:
    """train_lora's tokens/s when it trained ``<model_name>@champion`` on the same base model, and whence."""
    import fsspec

    from genai_dags import planner, registry

    name = params["model_name"]
    champion = registry.read_alias(settings.artifact_root, name, registry.CHAMPION)
    if champion is None:
        return None
    try:
        lineage = planner.read_published(settings, name, champion.version)
        if lineage.get("base_model") != planner.resolve_base_model(params["base_model"], settings):
            return None
        with fsspec.open(f"{lineage['stages']['train_lora']['output_uri']}/manifest.json", "rb") as fh:
            throughput = float(json.load(fh)["metrics"]["tokens_per_second"])
    except (planner.PlanError, OSError, ValueError, KeyError, TypeError):  # an estimate: fall back, never fail
        return None
    return (throughput, f"measured by {name}@champion ({champion.version})") if throughput > 0 else None


def train_estimate(
    params: dict[str, Any], settings: PipelineSettings, measured: tuple[float, str] | None = None
) -> str:
    """One line for the plan task's log: the estimate, or why there is none."""
    train = {**memory_plan.TRAIN_DEFAULTS, **(params.get("train") or {})}
    steps = int(train.get("max_steps") or 0)
    if not steps:
        return "cost estimate skipped: train.max_steps is 0 (epochs over a dataset not tokenized yet)"
    resources = settings.stage_resources("train_lora")
    pool = resources["node_pool"]
    throughput, source = measured or (settings.costs.train_tokens_per_second.get(pool), "configured")
    if not throughput:
        return (
            f"cost estimate skipped: no costs.train_tokens_per_second.{pool} in the platform config "
            "and no champion's measured throughput"
        )
    block_size = int((params.get("tokenize") or {}).get("block_size", memory_plan.BLOCK_SIZE_DEFAULT))
    blocks = int(train["batch_size"]) * int(train["grad_accum_steps"])
    tokens = steps * blocks * block_size
    hours = tokens / throughput / 3600
    line = (
        f"cost estimate (an estimate, not a measurement; train_lora only): {steps} steps x {blocks} blocks x "
        f"{block_size} tokens = {tokens:,} tokens at {throughput:g} tokens/s ({source}) on {pool} = {hours:.3g} h"
    )
    price, on_demand = resources["unit_price_per_hour"], resources["on_demand_unit_price_per_hour"]
    if price is None:
        return line + " (no costs.prices: not priced)"
    units = float(resources["units"])
    return (
        f"{line} x {units:g} {resources['unit']} = {hours * units * price:.4f} {resources['currency']} "
        f"({resources['capacity']}; {hours * units * on_demand:.4f} on demand)"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m genai_dags.cost_estimate <pipeline.yaml> <conf.json>", file=sys.stderr)
        return 2
    with open(args[1], encoding="utf-8") as fh:
        print(train_estimate(json.load(fh), load_file(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
