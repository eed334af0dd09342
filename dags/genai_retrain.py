"""
# genai_retrain

Retraining that starts by itself: scheduled on the `genai_drift` asset, which `genai_monitor` updates when
a new batch drifted from what a model's champion was trained on.

    confs -> trigger_finetune (one per drifted model)

- **confs** reads the asset events this run consumed; each carries the conf to retrain with (the
  champion's own conf, `train_data_uri` the drifted batch). Events for the same conf count once.
- **trigger_finetune** starts `genai_finetune` with each conf. The new version must still pass its gate
  and beat the champion on the same held-out data to be promoted.

Any other DAG can be scheduled on `genai_drift` too: the event's extra also holds `model_name`,
`champion`, `data_uri`, `reason` and `report_uri`. (`genai_finetune` is not scheduled on the asset
itself because a finetune run needs its conf: Airflow validates a DAG's params when it creates an
asset-triggered run, without a conf.)
"""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from genai_dags import monitor
from genai_dags.dag_defaults import dag_kwargs
from genai_dags.settings import load_settings

SETTINGS = load_settings()
DRIFT = Asset(name=monitor.DRIFT_ASSET, uri=monitor.drift_asset_uri(SETTINGS))
log = logging.getLogger(__name__)


@dag(dag_id="genai_retrain", **{**dag_kwargs(SETTINGS, __doc__, ["monitoring"]), "schedule": [DRIFT]})
def genai_retrain() -> None:
    @task
    def confs() -> list[dict[str, Any]]:
        """The retraining conf of every drift event this run consumed, each once, oldest first."""
        events = get_current_context()["triggering_asset_events"][DRIFT]
        found: dict[str, dict[str, Any]] = {}
        for event in events:
            conf = (event.extra or {}).get("conf")
            if isinstance(conf, dict):
                found.setdefault(json.dumps(conf, sort_keys=True), conf)
                log.info("%s drifted (%s): retraining on %s", event.extra.get("model_name"),
                         event.extra.get("reason"), conf.get("train_data_uri"))  # fmt: skip
        if not found:
            raise AirflowSkipException("no drift event with a retraining conf")
        return list(found.values())

    TriggerDagRunOperator.partial(task_id="trigger_finetune", trigger_dag_id="genai_finetune").expand(conf=confs())


genai_retrain()
