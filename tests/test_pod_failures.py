"""Each way a stage pod fails, as the apiserver and kubelet record it, becomes one message and a retry decision.

The same shapes come from a live apiserver in tests/cluster/test_failures_on_cluster.py; here they are
built from the Kubernetes client's models so every cause is covered in the fast tier.
"""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException
from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException

from genai_dags.pod_failures import StagePod, diagnose, refused_at_admission

POD = StagePod("train_lora", "repo/trainer:1", "2Gi", "gpu-spot", {"cloud.google.com/gke-spot": "true"}, 60, "2Gi")


def pod(*, phase="Failed", reason=None, message=None, state=None, conditions=None) -> k8s.V1Pod:
    statuses = [k8s.V1ContainerStatus(name="base", image="x", image_id="", ready=False, restart_count=0, state=state)]
    return k8s.V1Pod(
        status=k8s.V1PodStatus(
            phase=phase, reason=reason, message=message, container_statuses=statuses, conditions=conditions
        )
    )


def waiting(reason: str) -> k8s.V1ContainerState:
    return k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(reason=reason, message="not present"))


def unscheduled(message: str) -> list[k8s.V1PodCondition]:
    return [k8s.V1PodCondition(type="PodScheduled", status="False", message=message)]


def terminated(exit_code: int, reason: str) -> k8s.V1ContainerState:
    return k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=exit_code, reason=reason))


@pytest.mark.parametrize(
    ("remote", "cause", "retry", "names"),
    [
        (
            pod(phase="Pending", state=waiting("ErrImageNeverPull")),
            "image", False, ["repo/trainer:1", "stages.train_lora.image", "kubernetes.image"],
        ),
        (pod(state=terminated(137, "OOMKilled")), "oom", False, ["2Gi", "stages.train_lora.memory"]),
        (
            pod(reason="Evicted", message='Usage of EmptyDir volume "scratch" exceeds the limit "2Gi".'),
            "evicted", True, ['EmptyDir volume "scratch"', "kubernetes.scratch_size"],
        ),
        (pod(reason="DeadlineExceeded"), "deadline", True, ["stages.train_lora.timeout_minutes"]),
        (pod(state=terminated(143, "Error")), "sigterm", True, ["SIGTERM", "resumes"]),
        (
            pod(phase="Pending", conditions=unscheduled("0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")),
            "unschedulable", True, ["gpu-spot", "gke-spot=true", "Insufficient nvidia.com/gpu", "60 s"],
        ),
    ],
)  # fmt: skip
def test_a_failed_pod_is_diagnosed(remote, cause, retry, names):
    failure = diagnose(remote, "base", POD)
    assert (failure.cause, failure.retry) == (cause, retry)
    for name in names:
        assert name in failure.message, (name, failure.message)
    assert isinstance(failure.exception(), AirflowFailException) is not retry


def test_a_plain_failure_is_left_to_the_provider():
    assert diagnose(pod(state=terminated(1, "Error")), "base", POD) is None
    assert diagnose(None, "base", POD) is None


def refusal(message: str, status: int = 403) -> ApiException:
    exc = ApiException(status=status, reason="Forbidden")
    exc.body = json.dumps({"kind": "Status", "message": message, "code": status})
    return exc


@pytest.mark.parametrize(
    ("message", "cause", "retry", "names"),
    [
        (
            'pods "x" is forbidden: exceeded quota: genai-stages, requested: pods=1, used: pods=12, limited: pods=12',
            "quota", True, ["exceeded quota", "resourceQuota.hard", "within 60 s"],
        ),
        (
            'pods "x" is forbidden: status unknown for quota: full, resources: pods',
            "quota", True, ["status unknown for quota", "within 60 s"],
        ),
        (
            'pods "x" is forbidden: maximum memory usage per Container is 6Gi, but limit is 8Gi',
            "limitrange", False, ["6Gi", "stages.train_lora.memory", "limitRange.max"],
        ),
        (
            'pods is forbidden: User "system:serviceaccount:airflow:airflow-worker" cannot create resource "pods"',
            "rbac", False, ["airflow.workerServiceAccount"],
        ),
    ],
)  # fmt: skip
def test_an_admission_refusal_is_named(message, cause, retry, names):
    failure = refused_at_admission(refusal(message), POD, "genai-stages")
    assert (failure.cause, failure.retry) == (cause, retry)
    assert "genai-stages" in failure.message
    for name in names:
        assert name in failure.message


def test_other_api_errors_are_not_admission_refusals():
    assert refused_at_admission(refusal("boom", status=500), POD, "genai-stages") is None
    assert refused_at_admission(ValueError("x"), POD, "genai-stages") is None
