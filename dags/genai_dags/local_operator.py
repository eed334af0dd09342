"""The local runtime: a stage as a child process of the task (the embedded default: laptops, ``make demo``, tests).

The child's output streams line by line into the task log; its JSON result line is the task's XCom.
Killing or timing out the task stops the child's whole process group: SIGTERM first (the trainer
checkpoints), SIGKILL after the grace period, so nothing is left running.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from genai_dags.lineage import StageLineage, parent_run_environment
from genai_dags.settings import PipelineSettings, ResolvedStage
from genai_dags.stage_contract import (
    EXIT_USER_ERROR,
    finish,
    local_environment,
    metrics_environment,
    parse_result,
    resources_environment,
    user_error,
)


class LocalStageOperator(StageLineage, BaseOperator):
    """Run one stage as a local subprocess."""

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
        stage_resources: dict[str, Any] | None = None,
        pushgateway_url: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stage = stage
        # Not ``resources``: BaseOperator's own argument of that name means something else.
        self.stage_resources = stage_resources or {}
        self.pushgateway_url = pushgateway_url
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
                **local_environment(os.environ),
                **resources_environment(self.stage_resources),
                **metrics_environment(self.pushgateway_url),
                **parent_run_environment(context),
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
            raise user_error(self.stage, list(tail))
        if code != 0:
            raise AirflowException(f"stage {self.stage} exited {code}; last lines:\n" + "\n".join(list(tail)[-10:]))
        self.stage_result = finish(self.log, context, self.outlets, parse_result(self.stage, result_text))
        return self.stage_result

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


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, sig)


def local_kwargs(stage: ResolvedStage, settings: PipelineSettings) -> dict[str, Any]:
    """LocalStageOperator arguments: the interpreter, working directory and kill grace of the platform config."""
    return {
        "python": settings.local.python,
        "workdir": str(settings.local.workdir),
        "kill_grace_seconds": settings.local.kill_grace_seconds,
        "stage_resources": settings.stage_resources(stage.name),
        "pushgateway_url": settings.metrics.pushgateway_url,
    }
