"""Why a stage pod failed, in one sentence that names the setting to change, and whether to retry.

The cncf.kubernetes provider reports every failure alike ("Pod ... returned a failure", "Pod took too
long to be scheduled", an ApiException): Airflow would then spend every retry on a missing image or a
request the namespace's LimitRange can never admit. :func:`diagnose` reads what the apiserver and the
kubelet recorded on the pod; :func:`refused_at_admission` reads the apiserver's refusal of a new pod.

======================================  =========  ===============================================
cause                                   retried    the message names
======================================  =========  ===============================================
image missing or unpullable             no         the image and the settings that choose it
OOMKilled                               no         the memory limit and ``stages.<stage>.memory``
LimitRange violated at admission        no         the LimitRange's words and ``stages.<stage>``
ResourceQuota full past startup timeout yes        the quota's words (other runs may free it)
unschedulable past the startup timeout  yes        the node pool, its selector, the scheduler's words
evicted (emptyDir over sizeLimit, ...)  yes        the kubelet's words and ``kubernetes.scratch_size``
activeDeadlineSeconds reached           yes        ``stages.<stage>.timeout_minutes`` (training resumes)
SIGTERM (preemption, drain, delete)     yes        that the next try resumes from its checkpoint
======================================  =========  ===============================================

A leaf beside ``stage_contract``: it imports only the Kubernetes models' shapes (duck-typed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

EXIT_SIGTERM = 143
IMAGE_ERRORS = ("ErrImageNeverPull", "InvalidImageName", "ErrImagePull", "ImagePullBackOff")


@dataclass(frozen=True)
class PodFailure:
    cause: str
    retry: bool
    message: str

    def exception(self) -> AirflowException:
        """AirflowFailException ends the task now; AirflowException lets Airflow retry it."""
        return (AirflowException if self.retry else AirflowFailException)(self.message)


@dataclass(frozen=True)
class StagePod:
    """What a message about one stage's pod needs to name."""

    stage: str
    image: str
    memory: str
    node_pool: str
    node_selector: dict[str, str]
    startup_timeout_seconds: int
    scratch_size: str


def _container(remote_pod: Any, name: str) -> Any:
    statuses = (remote_pod.status.container_statuses if remote_pod and remote_pod.status else None) or []
    return next((s for s in statuses if s.name == name), None)


def diagnose(remote_pod: Any, container: str, pod: StagePod) -> PodFailure | None:
    """The failure the pod's status shows, or None when it shows none we know (the caller's error stands)."""
    if remote_pod is None or remote_pod.status is None:
        return None
    status = remote_pod.status
    stage = pod.stage
    if status.reason == "Evicted":
        return PodFailure(
            "evicted",
            True,
            f"stage {stage}: the kubelet evicted its pod ({status.message or 'no reason given'}); retried. "
            f"If the pod's scratch space ran out, raise kubernetes.scratch_size (now {pod.scratch_size}).",
        )
    if status.reason == "DeadlineExceeded":
        return PodFailure(
            "deadline",
            True,
            f"stage {stage}: the pod reached its activeDeadlineSeconds and was stopped; retried (training "
            f"resumes from its newest checkpoint). Raise stages.{stage}.timeout_minutes if it needs longer.",
        )
    state = _container(remote_pod, container)
    waiting = state.state.waiting if state and state.state else None
    if waiting and waiting.reason in IMAGE_ERRORS:
        return PodFailure(
            "image",
            False,
            f"stage {stage}: image {pod.image} cannot be used ({waiting.reason}: {waiting.message or ''}); "
            f"not retried. Check kubernetes.image (repository, tag, pull_policy) or stages.{stage}.image; "
            "`make images-list` prints the images a build made.",
        )
    terminated = state.state.terminated if state and state.state else None
    if terminated and terminated.reason == "OOMKilled":
        return PodFailure(
            "oom",
            False,
            f"stage {stage}: out of memory (OOMKilled at its {pod.memory} limit); not retried, the same input "
            f"needs the same memory. Raise stages.{stage}.memory in the pipeline config.",
        )
    if terminated and terminated.exit_code == EXIT_SIGTERM:
        return PodFailure(
            "sigterm",
            True,
            f"stage {stage}: its pod was stopped with SIGTERM (spot preemption, node drain or deletion); "
            "retried: training resumes from the checkpoint it saved on the way out, another stage redoes its "
            "work (nothing partial was committed).",
        )
    if status.phase == "Pending" and not (state and state.state and state.state.running):
        scheduled = next((c for c in status.conditions or [] if c.type == "PodScheduled"), None)
        if scheduled is None or scheduled.status != "True":
            why = (scheduled.message if scheduled else None) or "the scheduler gave no reason"
            selector = ", ".join(f"{k}={v}" for k, v in sorted(pod.node_selector.items())) or "none"
            return PodFailure(
                "unschedulable",
                True,
                f"stage {stage}: no node of pool {pod.node_pool} (selector {selector}) took its pod within "
                f"{pod.startup_timeout_seconds} s: {why}. Retried; if it persists, check the pool's capacity "
                f"and kubernetes.node_pools.{pod.node_pool}.",
            )
    return None


def refused_at_admission(exc: Exception, pod: StagePod, namespace: str) -> PodFailure | None:
    """The apiserver's refusal to create the pod (ResourceQuota, LimitRange, RBAC), or None."""
    if getattr(exc, "status", None) != 403:
        return None
    try:
        reason = json.loads(exc.body)["message"]  # type: ignore[attr-defined]
    except (TypeError, ValueError, KeyError):
        reason = str(getattr(exc, "body", "") or exc)
    stage = pod.stage
    # A quota the quota controller has not counted yet (just created or changed) refuses pods for a moment.
    if "exceeded quota" in reason or "status unknown for quota" in reason:
        return PodFailure(
            "quota",
            True,
            f"stage {stage}: the ResourceQuota of namespace {namespace} had no room for its pod within "
            f"{pod.startup_timeout_seconds} s ({reason}); retried, as other runs may free it. Raise "
            "resourceQuota.hard in the chart values if it persists.",
        )
    if "per Container" in reason or "per Pod" in reason or "LimitRange" in reason:
        return PodFailure(
            "limitrange",
            False,
            f"stage {stage}: the LimitRange of namespace {namespace} refused its pod ({reason}); not retried. "
            f"Lower stages.{stage}.cpu / stages.{stage}.memory or raise limitRange.max in the chart values.",
        )
    if "cannot create resource" in reason:
        return PodFailure(
            "rbac",
            False,
            f"stage {stage}: Airflow's identity may not create pods in namespace {namespace} ({reason}); "
            "not retried. Check airflow.workerServiceAccount in the chart values and kubernetes.namespace.",
        )
    return None
