"""
# genai_monitor

Has new data drifted from what the model's champion was trained on? If so, retrain it on the new data:

    plan -> tokenize -> evaluate -> drift -> decide

- **plan** finds `<model_name>@champion`, its lineage and the conf it was trained with, and the batch:
  the conf's `data_uri`, else the newest file or folder under the platform's `monitor.data_prefix`.
  When the champion was trained on that very batch there is nothing to measure: the run is skipped.
- **tokenize** tokenizes the batch as the champion's data was; **evaluate** scores the champion on the
  batch's held-out part as it was scored on its own.
- **drift** compares the two (the champion's perplexity on the batch over its held-out perplexity) and the
  unigram token frequencies of both training splits (Jensen-Shannon divergence), against
  `monitor.max_perplexity_ratio` and `monitor.max_token_divergence`; its report (`drift.json`,
  `report.md`, `drift.png`) is under `runs/<run_id>/drift/`.
- **decide** emits an event on the `genai_drift` asset when the batch drifted, with the conf to retrain
  with in its extra (the champion's conf, `train_data_uri` the batch); `genai_retrain`, scheduled on that
  asset, starts `genai_finetune` with it. Without drift it is skipped and emits nothing.

It runs on the platform's `monitor.schedule` (none: triggered only). Trigger it by hand with a conf such as:

    make trigger DAG=genai_monitor CONF='{"model_name": "shakespeare-folio", "data_uri": "data/incoming/2026-12-01"}'
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import Asset, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from genai_dags import monitor, params, planner, registry
from genai_dags.dag_defaults import dag_kwargs, last_task_kwargs
from genai_dags.operators import stage_task
from genai_dags.settings import load_settings

SETTINGS = load_settings()
PARAMS = params.monitor_params(SETTINGS)
DRIFT = Asset(name=monitor.DRIFT_ASSET, uri=monitor.drift_asset_uri(SETTINGS))
log = logging.getLogger(__name__)


@dag(
    dag_id="genai_monitor",
    params=PARAMS,
    **{**dag_kwargs(SETTINGS, __doc__, ["monitoring"]), "schedule": SETTINGS.monitor.schedule},
)
def genai_monitor() -> None:
    @task(multiple_outputs=True)
    def plan() -> dict[str, Any]:
        """Find the champion and the batch; build the stages' arguments and the conf that would retrain."""
        context = get_current_context()
        try:
            params.check_conf(dict(context["dag_run"].conf or {}), PARAMS)
            result = monitor.monitor_plan(dict(context["params"]), SETTINGS)
        except (params.ConfError, planner.PlanError, registry.RegistryError) as exc:
            raise AirflowFailException(str(exc)) from None
        except monitor.NothingNew as exc:
            raise AirflowSkipException(f"nothing new to measure: {exc}") from None
        log.info(
            "measuring %s against %s@champion (%s); stage run id %s",
            result["data_uri"], result["model_name"], result["champion"], result["run_id"],
        )  # fmt: skip
        return result

    @task(outlets=[DRIFT], **last_task_kwargs(SETTINGS))
    def decide(steps: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
        """Drifted: an event on genai_drift carrying the conf to retrain with. Not drifted: skipped, no event."""
        verdict = measured["metrics"]
        report = f"{measured['output_uri']}/report.md"
        if not verdict["drifted"]:
            raise AirflowSkipException(f"no drift: {verdict['reason']} (report: {report})")
        extra = {
            "model_name": steps["model_name"],
            "champion": steps["champion"],
            "data_uri": steps["data_uri"],
            "reason": verdict["reason"],
            "report_uri": report,
            "conf": steps["retrain_conf"],
        }
        get_current_context()["outlet_events"][DRIFT].extra = extra
        log.warning(
            "%s drifted from %s@champion: %s; retraining", steps["data_uri"], steps["model_name"], verdict["reason"]
        )
        return extra

    steps = plan()
    tokenize = stage_task("tokenize", SETTINGS, arguments=steps["tokenize"])
    evaluate = stage_task("evaluate", SETTINGS, arguments=steps["evaluate"])
    drift = stage_task("drift", SETTINGS, arguments=steps["drift"])
    tokenize >> evaluate >> drift
    decide(steps, drift.output)


genai_monitor()
