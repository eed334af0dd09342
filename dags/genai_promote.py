"""
# genai_promote

Move a model's alias by hand: a rollback to an earlier version, or the promotion of a version that
`genai_finetune` could not compare with the champion (trained on another base model).

    promote

- **promote** checks that the version is published, then moves `<model_name>@<alias>` (`champion` by
  default) to it with the reason given, recorded in the alias's log and in the version's decision
  (`genai_dags/registry.py`). A promotion that raced with another one changes nothing and fails, naming
  where the alias went. With `registry.mlflow.tracking_uri` set, the version is registered in MLflow first
  (if it is not yet) and MLflow's alias follows ours (`genai_dags/mlflow_registry.py`).

Trigger it with a conf such as:

    make trigger DAG=genai_promote CONF='{"model_name": "folio-lora", "version": "ft-1a2b", "reason": "rollback"}'
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from genai_dags import mlflow_registry, params, registry
from genai_dags.dag_defaults import dag_kwargs, last_task_kwargs
from genai_dags.settings import load_settings

SETTINGS = load_settings()
PARAMS = params.promote_params()
log = logging.getLogger(__name__)


@dag(dag_id="genai_promote", params=PARAMS, **dag_kwargs(SETTINGS, __doc__, ["registry"]))
def genai_promote() -> None:
    @task(**last_task_kwargs(SETTINGS))
    def promote() -> dict[str, Any]:
        """Point the alias at the version, recorded with the reason and this run."""
        context = get_current_context()
        conf = dict(context["params"])
        name, version, alias = conf["model_name"], conf["version"], conf["alias"]
        mlflow = mlflow_registry.from_settings(SETTINGS)
        try:
            params.check_conf(dict(context["dag_run"].conf or {}), PARAMS)
            decision = mlflow_registry.move_by_hand(
                SETTINGS.artifact_root, name, version, alias, conf["reason"], context["dag_run"].run_id, mlflow
            )
        except (params.ConfError, registry.RegistryError) as exc:
            raise AirflowFailException(str(exc)) from None
        except mlflow_registry.MlflowRegistryError as exc:  # down: retried; it registers before ours moves
            if exc.retryable:
                raise
            raise AirflowFailException(str(exc)) from None
        if decision["decision"] == "already":
            log.info("%s@%s is %s already: nothing to move", name, alias, version)
        else:
            log.info("%s@%s: %s -> %s (%s)", name, alias, decision["previous"], version, conf["reason"])
        return decision

    promote()


genai_promote()
