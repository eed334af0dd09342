"""
# genai_batch_inference

Batch inference with a model that `genai_finetune` published, fanned out over shards of the input:

    plan -> batch_infer[0..n-1] (dynamic task mapping) -> merge_predictions

- **plan** checks the conf, reads the published model's `lineage.json` (its base model), counts the
  prompts (newlines, streamed: cheap, and in a task, never at parse time) and derives the number of
  shards: `ceil(records / records_per_shard)`, capped by `max_shards` (itself capped by the platform).
- **batch_infer** runs once per shard (`shard_index`, `num_shards`) in parallel.
- **merge_predictions** concatenates the shard outputs in shard order into one `predictions.jsonl`
  under `<artifact_root>/runs/<run_id>/merge_predictions/`.

Trigger it with a conf such as `examples/batch-inference.json`:

    make trigger DAG=genai_batch_inference CONF=examples/batch-inference.json
"""

from __future__ import annotations

import logging

from airflow.sdk import XComArg, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from genai_dags import params, planner, registry
from genai_dags.dag_defaults import dag_kwargs, last_task_kwargs
from genai_dags.operators import mapped_stage_task, stage_task
from genai_dags.settings import load_settings

SETTINGS = load_settings()
PARAMS = params.batch_inference_params(SETTINGS)
log = logging.getLogger(__name__)


@dag(dag_id="genai_batch_inference", params=PARAMS, **dag_kwargs(SETTINGS, __doc__, ["inference"]))
def genai_batch_inference() -> None:
    @task
    def plan() -> list[list[str]]:
        """Validate the conf, find the published model, count the prompts and split them into shards."""
        context = get_current_context()
        conf = dict(context["params"])
        try:
            params.check_conf(dict(context["dag_run"].conf or {}), PARAMS)
            version = registry.resolve(SETTINGS.artifact_root, conf["model_name"], conf.get("version"))
            conf.update(model_name=conf["model_name"].partition("@")[0], version=version)
            lineage = planner.read_published(SETTINGS, conf["model_name"], version)
            prompts = planner.resolve_uri(conf["prompts_uri"], SETTINGS)
            records = planner.count_records(prompts)
            inputs = planner.input_fingerprint({"prompts_uri": prompts})
            result = planner.batch_plan(conf, SETTINGS, inputs, lineage, records)
        except (params.ConfError, planner.PlanError, registry.RegistryError) as exc:
            raise AirflowFailException(str(exc)) from None
        log.info(
            "%d prompts -> %d shard(s) of up to %d; stage run id %s",
            records,
            result["num_shards"],
            conf["records_per_shard"],
            result["run_id"],
        )
        # Dynamic task mapping needs the list as the return value; the rest goes under its own keys.
        for key in ("run_id", "num_shards", "merge_predictions"):
            context["ti"].xcom_push(key=key, value=result[key])
        return result["batch_infer"]

    shard_arguments = plan()
    infer = mapped_stage_task("batch_infer", SETTINGS, arguments=shard_arguments)
    merge = stage_task(
        "merge_predictions",
        SETTINGS,
        arguments=XComArg(shard_arguments.operator, key="merge_predictions"),
        **last_task_kwargs(SETTINGS),
    )
    infer >> merge


genai_batch_inference()
