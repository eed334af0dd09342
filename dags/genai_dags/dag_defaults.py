"""What every GenAI DAG shares: owner, retries with exponential backoff, failure notifications, tags."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from genai_dags import notifications
from genai_dags.settings import PipelineSettings

TAGS = ["genai"]


def default_args(settings: PipelineSettings) -> dict[str, Any]:
    return {
        "owner": settings.owner,
        # Retries absorb spot preemption (the trainer resumes from its checkpoint) and flaky
        # infrastructure; a stage's own "your input is wrong" (exit 2) is never retried.
        "retries": settings.retries,
        "retry_delay": timedelta(seconds=settings.retry_delay_seconds),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(seconds=settings.max_retry_delay_seconds),
        "on_failure_callback": notifications.on_failure(settings),
    }


def dag_kwargs(settings: PipelineSettings, doc_md: str | None, extra_tags: list[str]) -> dict[str, Any]:
    return {
        "schedule": None,
        "catchup": False,
        "doc_md": doc_md,
        "tags": [*TAGS, settings.runtime, *extra_tags],
        "default_args": default_args(settings),
        "max_active_tasks": 8,
    }


def last_task_kwargs(settings: PipelineSettings) -> dict[str, Any]:
    """The run's success notification hangs on its last task: a task callback knows the run and its URLs."""
    return {"on_success_callback": notifications.on_success(settings)}
