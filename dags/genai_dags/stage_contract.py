"""What every runtime shares with the stages: the user-error exit code, the result line, the environment.

A stage is ``python -m stages.<name> key=value ...`` (``docs/stages.md``). Whatever runs it (a local
process, a pod, a container), the runtime reads the same things back and answers the same way:

- exit 2 is the user's mistake: the task fails without retrying (a retry cannot fix a bad setting);
  anything else fails normally and Airflow retries it;
- on success the stage's JSON result (``stage``, ``cache_hit``, ``output_uri``, ``manifest_uri``,
  ``metrics``) becomes the task's XCom and its output URI goes on the task's asset events.

A leaf: it imports nothing of ours, and every runtime module imports it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowException, AirflowFailException

EXIT_USER_ERROR = 2
# Where a stage in a pod or container writes its result line: the kubernetes provider's XCom sidecar
# reads it from there, and the docker runtime mounts a tmpfs at the same folder.
RESULT_PATH_IN_CONTAINER = "/airflow/xcom/return.json"
# Airflow's own secrets: connections, variables, and its configuration (database URL, Fernet and API keys).
AIRFLOW_ONLY = ("AIRFLOW_CONN_", "AIRFLOW_VAR_", "AIRFLOW__")


class StageUserError(AirflowFailException):
    """The stage rejected its settings or input (exit 2): fail now, a retry would fail the same way."""


def user_error(stage: str, log_lines: list[str]) -> StageUserError:
    """The task's failure for exit 2, quoting the stage's own ``error:`` line."""
    reason = next(
        (line for line in reversed(log_lines) if line.startswith("error:")), log_lines[-1] if log_lines else ""
    )
    return StageUserError(f"stage {stage} rejected its settings or input (exit 2, not retried): {reason}")


def parse_result(stage: str, text: str | None) -> dict[str, Any]:
    """The stage's JSON result line, checked to be this stage's."""
    try:
        result = json.loads(text or "")
    except ValueError:
        raise AirflowException(f"stage {stage} exited 0 but printed no JSON result line") from None
    if not isinstance(result, dict) or result.get("stage") != stage:
        raise AirflowException(f"stage {stage} printed an unexpected result: {(text or '')[:200]!r}")
    return result


def finish(log: logging.Logger, context: Any, outlets: list[Any], result: dict[str, Any]) -> dict[str, Any]:
    """Log where the stage committed its output and attach it to the task's asset events (data-aware DAGs)."""
    log.info(
        "stage %s: %s at %s",
        result.get("stage"),
        "cache hit" if result.get("cache_hit") else "done",
        result.get("output_uri"),
    )
    extra = {"output_uri": result.get("output_uri"), "cache_hit": bool(result.get("cache_hit"))}
    metrics = result.get("metrics") or {}
    extra.update({k: metrics[k] for k in ("model_name", "version", "uri") if k in metrics})
    for outlet in outlets or []:
        if isinstance(outlet, Asset):
            context["outlet_events"][outlet].extra = extra
    return result


# What an attempt runs with and is priced at (node pool, capacity, requests, prices): the stage records it
# with its wall time (stages.core.costs), since a stage process cannot know its node pool.
RESOURCES_ENV = "STAGE_RESOURCES"


def resources_environment(resources: Mapping[str, Any]) -> dict[str, str]:
    return {RESOURCES_ENV: json.dumps(dict(resources), sort_keys=True)}


# Where the stage pushes its metrics (stages.core.telemetry): the platform config's metrics.pushgateway_url.
METRICS_ENV = "STAGE_METRICS_PUSHGATEWAY"


def metrics_environment(pushgateway_url: str) -> dict[str, str]:
    return {METRICS_ENV: pushgateway_url} if pushgateway_url else {}


def container_environment(
    image: str, resources: Mapping[str, Any] | None = None, pushgateway_url: str = ""
) -> dict[str, str]:
    """The environment of a stage in a pod or a container: read-only root filesystem, scratch at ``/tmp``."""
    return {
        **resources_environment(resources or {}),
        **metrics_environment(pushgateway_url),
        "STAGE_RESULT_PATH": RESULT_PATH_IN_CONTAINER,
        "STAGE_IMAGE": image,  # recorded in every manifest: the lineage of published models
        "HOME": "/tmp",
        "HF_HOME": "/tmp/hf-home",
        "TMPDIR": "/tmp",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def local_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment without Airflow's secrets: stage code never imports Airflow, and a stage pod
    gets none of them either. Cloud credentials (AWS_*, GOOGLE_*, AZURE_*) stay: the stages need them."""
    return {k: v for k, v in environ.items() if not k.startswith(AIRFLOW_ONLY)}
