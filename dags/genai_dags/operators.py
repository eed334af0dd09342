"""Which runtime runs a stage: one stage description becomes a local process, a Kubernetes pod or a container.

Every runtime runs exactly ``python -m stages.<name> key=value ...`` and answers its exit code and
result line the same way (``genai_dags.stage_contract``):

- ``local``: :class:`genai_dags.local_operator.LocalStageOperator`, a child process of the task;
- ``kubernetes``: :class:`genai_dags.pod_operator.StagePodOperator`, a hardened pod on the stage's node
  pool; GPU stages run on spot capacity and their last retry on on-demand capacity;
- ``docker``: :class:`genai_dags.docker_operator.StageDockerOperator`, a local container from the
  stage's image, hardened like the pod, with the artifact root mounted at its own path.

This module only picks the runtime; each runtime's module is imported only when it is the configured
one (the Kubernetes client costs a second of parse time that the local runtime never needs).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from genai_dags.lineage import without_operator_state
from genai_dags.settings import PipelineSettings, ResolvedStage


def _runtime(stage: ResolvedStage, settings: PipelineSettings) -> tuple[type[BaseOperator], dict[str, Any]]:
    """The configured runtime's operator class and its arguments for this stage."""
    if settings.runtime == "kubernetes":
        from genai_dags.pod_operator import StagePodOperator, pod_kwargs

        return StagePodOperator, pod_kwargs(stage, settings)
    if settings.runtime == "docker":
        from genai_dags.docker_operator import StageDockerOperator, docker_kwargs

        return StageDockerOperator, docker_kwargs(stage, settings)
    from genai_dags.local_operator import LocalStageOperator, local_kwargs

    return LocalStageOperator, local_kwargs(stage, settings)


def _operator(
    stage_name: str, settings: PipelineSettings, task_id: str | None, extra: dict[str, Any]
) -> tuple[type[BaseOperator], dict[str, Any]]:
    stage = settings.stage(stage_name)
    cls, runtime_kwargs = _runtime(stage, settings)
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
    return without_operator_state(cls(arguments=arguments, **kwargs))


def mapped_stage_task(
    stage: str, settings: PipelineSettings, *, arguments: Any, task_id: str | None = None, **extra: Any
):
    """The same, mapped: one task instance per element of ``arguments`` (a list of argument lists)."""
    cls, kwargs = _operator(stage, settings, task_id, extra)
    return without_operator_state(cls.partial(**kwargs).expand(arguments=arguments))
