"""Metrics people graph, pushed to a Prometheus Pushgateway when the runtime names one; nothing is sent otherwise.

    STAGE_METRICS_PUSHGATEWAY=http://pushgateway.monitoring:9091 python -m stages.train_lora run_id=exp1

A stage is a batch job: Prometheus cannot scrape it, so it pushes (the Pushgateway's HTTP text format,
``POST /metrics/job/genai_stage/run_id/<run_id>/stage/<stage>[/model_name/<name>]``). POST replaces only
the series of the same names in that group, so the trainer's pushes during training and the runner's
push at the end of the attempt live side by side. The platform config's ``metrics.pushgateway_url``
reaches every runtime's stage in ``STAGE_METRICS_PUSHGATEWAY``.

Series (gauges; units in the names; ``docs/grafana/genai-stages.json`` graphs them):

- train_lora, every ``log_every`` steps and at the last: ``genai_train_loss``,
  ``genai_train_learning_rate``, ``genai_train_tokens_per_second``, ``genai_train_step_seconds``,
  ``genai_train_step`` (and ``genai_train_gpu_memory_peak_bytes`` and ``genai_train_gpu_utilization_percent``
  on a GPU);
- every stage, at the end of each attempt (the runner): ``genai_stage_duration_seconds{status=...}``
  (the attempt's wall time; ``status`` is how it ended), and when it did work,
  ``genai_stage_tokens_per_second`` (tokenize, train_lora, evaluate, batch_infer);
- publish, which prices the run: ``genai_run_cost{currency=...}``, ``genai_run_on_demand_cost{currency=...}``
  and ``genai_run_duration_seconds`` (every attempt of every stage of the run).

Labels are the run id, the stage, the model name where the stage has one, and the two above: never a
setting's value, a URI or a credential. Metrics never fail a stage: a push that fails (endpoint down, an
HTTP error) logs one warning per process and the stage goes on; after a failure the pushes of the next
``RETRY_AFTER_S`` seconds are skipped, so a dead endpoint costs a trainer at most one short timeout a minute.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)
PUSHGATEWAY_ENV = "STAGE_METRICS_PUSHGATEWAY"
JOB = "genai_stage"
TIMEOUT_S = 2.0
RETRY_AFTER_S = 60.0

# Every series a stage pushes, with what it means: the dashboard (docs/grafana/genai-stages.json) and the
# tests are checked against this list.
SERIES = {
    "genai_train_step": "train_lora: optimizer steps done",
    "genai_train_loss": "train_lora: the step's training loss",
    "genai_train_learning_rate": "train_lora: the scheduler's learning rate",
    "genai_train_tokens_per_second": "train_lora: trained tokens per second since the attempt started",
    "genai_train_step_seconds": "train_lora: wall seconds of the last step",
    "genai_train_gpu_memory_peak_bytes": "train_lora: peak GPU memory allocated by the trainer (GPU only)",
    "genai_train_gpu_utilization_percent": "train_lora: the GPU's busy time over the last sample period, per NVML "
    "(GPU only, where nvidia-ml-py is installed: the CUDA images)",
    "genai_stage_duration_seconds": "every stage: the attempt's wall seconds, labelled with how it ended",
    "genai_stage_tokens_per_second": "tokenize, train_lora, evaluate, batch_infer: tokens per second of the work",
    "genai_run_cost": "publish: what every attempt of the run cost, in the price table's currency",
    "genai_run_on_demand_cost": "publish: the same hours at on-demand prices",
    "genai_run_duration_seconds": "publish: wall seconds of every attempt of every stage of the run",
}

_state = {"warned": False, "skip_until": 0.0}


def gpu_utilization(device: Any) -> float | None:
    """The GPU's utilisation in percent as NVML reports it; None where NVML is not there (no nvidia-ml-py, no
    driver): a metric, never a reason to fail."""
    import torch

    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # ModuleNotFoundError without pynvml, NVML errors without a driver
        return None


def labels(stage: str, config: Any) -> dict[str, str]:
    """The group's labels: the run and the stage, and the model's name where the stage's config has one."""
    found = {"run_id": str(config.run_id), "stage": stage}
    if model_name := getattr(config, "model_name", ""):
        found["model_name"] = str(model_name)
    return found


def push(group: Mapping[str, str], values: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> bool:
    """Push gauges to the configured Pushgateway; True when sent. ``values``: name -> number, or name ->
    (extra labels, number). None and non-finite values are left out. Never raises."""
    url = (environ if environ is not None else os.environ).get(PUSHGATEWAY_ENV, "").strip()
    if not url or time.monotonic() < _state["skip_until"]:
        return False
    body = exposition(values)
    if not body:
        return False
    try:
        request = _request(url, group, body)
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            response.read()
        return True
    except Exception as exc:  # metrics are a side channel: nothing about them may fail a stage
        _state["skip_until"] = time.monotonic() + RETRY_AFTER_S
        reason = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else str(exc)
        where = _without_credentials(url)
        if not _state["warned"]:
            _state["warned"] = True
            log.warning("metrics: could not push to the Pushgateway at %s (%s); the stage goes on", where, reason)
        else:
            log.debug("metrics: push to %s failed again (%s)", where, reason)
        return False


def exposition(values: Mapping[str, Any]) -> str:
    """Prometheus text format, one gauge per name."""
    lines = []
    for name, value in values.items():
        extra, number = value if isinstance(value, tuple) else ({}, value)
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            continue
        tags = ",".join(f'{k}="{_escape(str(v))}"' for k, v in extra.items())
        if name in SERIES:
            lines.append(f"# HELP {name} {SERIES[name]}")
        sample = f"{name}{{{tags}}}" if tags else name
        lines += [f"# TYPE {name} gauge", f"{sample} {float(number)!r}"]
    return "\n".join(lines) + "\n" if lines else ""


def _request(url: str, group: Mapping[str, str], body: str) -> urllib.request.Request:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    path = parts.path.rstrip("/") + "/metrics/job/" + JOB
    for key, value in group.items():
        path += "/" + _path_label(key, value)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    headers = {"Content-Type": "text/plain; version=0.0.4"}
    if parts.username:  # http://user:password@host: basic auth, never in a log line or a label
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
    target = urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))
    return urllib.request.Request(target, data=body.encode(), method="POST", headers=headers)


def _path_label(key: str, value: str) -> str:
    """One label of the grouping key as a path segment (base64 where the value holds a '/', or is empty)."""
    if value and "/" not in value:
        return f"{key}/{urllib.parse.quote(value, safe='')}"
    return f"{key}@base64/{base64.urlsafe_b64encode(value.encode()).decode() or '='}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
