"""The runtimes: one stage description becomes a local subprocess, a Kubernetes pod or a container.

Both run exactly ``python -m stages.<name> key=value ...`` and both return the stage's JSON result
(``stage``, ``cache_hit``, ``output_uri``, ``manifest_uri``, ``metrics``) as the task's XCom:

- ``local``: :class:`LocalStageOperator` runs the command as a child process of the task, streams its
  output into the task log, and kills the child's whole process group when the task is killed or
  times out, so nothing is left running.
- ``kubernetes``: :class:`genai_dags.pod_operator.StagePodOperator` runs it in a hardened pod on the
  stage's node pool; GPU stages run on spot capacity and their last retry on on-demand capacity.
- ``docker``: :class:`genai_dags.docker_operator.StageDockerOperator` runs it in a local container from
  the stage's image, hardened like the pod, with the artifact root mounted at its own path.

Exit codes follow ``docs/stages.md``: 2 is the user's mistake, so the task fails without retrying
(a retry cannot fix a bad setting); anything else fails normally and Airflow retries it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from genai_dags.settings import PipelineSettings
from genai_dags.stage_specs import resolve

EXIT_USER_ERROR = 2


class StageUserError(AirflowFailException):
    """The stage rejected its settings or input (exit 2): fail now, a retry would fail the same way."""


def _user_error_message(stage: str, lines: list[str]) -> str:
    reason = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
    return f"stage {stage} rejected its settings or input (exit 2, not retried): {reason}"


def _parse_result(stage: str, text: str | None) -> dict[str, Any]:
    try:
        result = json.loads(text or "")
    except ValueError:
        raise AirflowException(f"stage {stage} exited 0 but printed no JSON result line") from None
    if not isinstance(result, dict) or result.get("stage") != stage:
        raise AirflowException(f"stage {stage} printed an unexpected result: {text[:200]!r}")
    return result


def record_outlet_events(context: Any, outlets: list[Any], result: dict[str, Any]) -> None:
    """Attach where the stage committed its output to the task's asset events (for data-aware DAGs)."""
    extra = {"output_uri": result.get("output_uri"), "cache_hit": bool(result.get("cache_hit"))}
    metrics = result.get("metrics") or {}
    extra.update({k: metrics[k] for k in ("model_name", "version", "uri") if k in metrics})
    for outlet in outlets or []:
        if isinstance(outlet, Asset):
            context["outlet_events"][outlet].extra = extra


class LocalStageOperator(BaseOperator):
    """Run one stage as a local subprocess (the embedded default runtime: laptops, ``make demo``, tests)."""

    template_fields = ("arguments",)
    ui_color = "#e8f4fa"

    def __init__(
        self,
        *,
        stage: str,
        arguments: Any = (),
        python: str = "",
        workdir: str = ".",
        kill_grace_seconds: int = 30,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stage = stage
        self.arguments = arguments
        self.python = python
        self.workdir = workdir
        self.kill_grace_seconds = kill_grace_seconds
        self._proc: subprocess.Popen[str] | None = None

    @property
    def command(self) -> list[str]:
        return [self.python or sys.executable, "-m", f"stages.{self.stage}", *map(str, self.arguments or [])]

    def execute(self, context: Any) -> dict[str, Any]:
        command = self.command
        self.log.info("running %s (in %s)", shlex.join(command), self.workdir)
        tail: deque[str] = deque(maxlen=40)
        json_line = None
        with tempfile.TemporaryDirectory(prefix=f"genai-{self.stage}-") as tmp:
            result_path = Path(tmp) / "result.json"
            env = {
                **stage_environment(os.environ),
                "STAGE_RESULT_PATH": str(result_path),
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [self.workdir, os.environ.get("PYTHONPATH")])),
            }
            # A new session makes the stage the leader of its own process group: on_kill can then stop it
            # and every process it started (tokenizer workers, data loaders) with one signal.
            self._proc = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,
            )
            try:
                assert self._proc.stdout is not None
                for raw in self._proc.stdout:
                    line = raw.rstrip("\n")
                    self.log.info("%s", line)
                    tail.append(line)
                    if line.startswith("{"):
                        json_line = line
                code = self._proc.wait()
            finally:
                # Normal exit: sweep up anything the stage left behind. Timeout or kill (an exception
                # here): SIGTERM first so a trainer can checkpoint, then SIGKILL after the grace period.
                self._stop(graceful=self._proc.poll() is None)
            result_text = result_path.read_text() if result_path.exists() else json_line

        if code == EXIT_USER_ERROR:
            raise StageUserError(_user_error_message(self.stage, list(tail)))
        if code != 0:
            raise AirflowException(f"stage {self.stage} exited {code}; last lines:\n" + "\n".join(list(tail)[-10:]))
        result = _parse_result(self.stage, result_text)
        self.log.info(
            "stage %s: %s at %s",
            self.stage,
            "cache hit" if result.get("cache_hit") else "done",
            result.get("output_uri"),
        )
        record_outlet_events(context, self.outlets, result)
        return result

    def on_kill(self) -> None:
        self.log.warning(
            "task killed: stopping stage %s (process group %s)", self.stage, self._proc.pid if self._proc else None
        )
        self._stop(graceful=True)

    def _stop(self, graceful: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if graceful and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.kill_grace_seconds)
            except subprocess.TimeoutExpired:
                self.log.warning(
                    "stage %s ignored SIGTERM for %ss; sending SIGKILL", self.stage, self.kill_grace_seconds
                )
        _signal_group(proc.pid, signal.SIGKILL)  # whatever is left in the group (usually nothing)
        if proc.poll() is None:
            proc.wait()


# Airflow's own secrets: connections, variables, and its configuration (database URL, Fernet and API keys).
AIRFLOW_ONLY = ("AIRFLOW_CONN_", "AIRFLOW_VAR_", "AIRFLOW__")


def stage_environment(environ: Any) -> dict[str, str]:
    """The worker's environment without Airflow's secrets: stage code never imports Airflow, and a stage pod
    gets none of them either. Cloud credentials (AWS_*, GOOGLE_*, AZURE_*) stay: the stages need them."""
    return {k: v for k, v in environ.items() if not k.startswith(AIRFLOW_ONLY)}


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, sig)


def _local_kwargs(settings: PipelineSettings) -> dict[str, Any]:
    return {
        "python": settings.local.python,
        "workdir": str(settings.local.workdir),
        "kill_grace_seconds": settings.local.kill_grace_seconds,
    }


def _operator(
    stage_name: str, settings: PipelineSettings, task_id: str | None, extra: dict[str, Any]
) -> tuple[type[BaseOperator], dict[str, Any]]:
    stage = resolve(stage_name, settings)
    if settings.runtime == "kubernetes":
        # Imported only here: the Kubernetes client costs a second of parse time the local runtime never needs.
        from genai_dags.pod_operator import StagePodOperator, pod_kwargs

        cls: type[BaseOperator] = StagePodOperator
        runtime_kwargs = pod_kwargs(stage, settings)
    elif settings.runtime == "docker":
        from genai_dags.docker_operator import StageDockerOperator, docker_kwargs

        cls = StageDockerOperator
        runtime_kwargs = docker_kwargs(stage, settings)
    else:
        cls = LocalStageOperator
        runtime_kwargs = _local_kwargs(settings)
    kwargs = {
        "task_id": task_id or stage_name,
        "stage": stage_name,
        "execution_timeout": stage.timeout,
        "doc_md": f"`python -m stages.{stage_name}`: {stage.spec.doc}",
        **runtime_kwargs,
        **extra,
    }
    return cls, kwargs


def stage_task(
    stage: str, settings: PipelineSettings, *, arguments: Any, task_id: str | None = None, **extra: Any
) -> BaseOperator:
    """The task that runs ``python -m stages.<stage> <arguments>`` on the configured runtime."""
    cls, kwargs = _operator(stage, settings, task_id, extra)
    return cls(arguments=arguments, **kwargs)


def mapped_stage_task(
    stage: str, settings: PipelineSettings, *, arguments: Any, task_id: str | None = None, **extra: Any
):
    """The same, mapped: one task instance per element of ``arguments`` (a list of argument lists)."""
    cls, kwargs = _operator(stage, settings, task_id, extra)
    return cls.partial(**kwargs).expand(arguments=arguments)
