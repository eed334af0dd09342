"""Our chart installed on a real apiserver, `helm test` run by a real kubelet, its RBAC enforced.

make test-cluster
"""

from __future__ import annotations

import json

import pytest

from tests.cluster.conftest import AIRFLOW_NAMESPACE, STAGE_NAMESPACE, helm

pytestmark = pytest.mark.cluster


def test_helm_install_is_admitted_and_helm_test_passes(platform):
    from kubernetes import client

    api = platform.cluster.client()
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    # Every object the chart renders was admitted: the real apiserver validated and stored it.
    assert core.read_namespace(STAGE_NAMESPACE).metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert core.read_namespaced_service_account("genai-stage-runner", STAGE_NAMESPACE)
    assert [r.metadata.name for r in rbac.list_namespaced_role(STAGE_NAMESPACE).items] == ["genai-pod-launcher"]
    binding = rbac.list_namespaced_role_binding(STAGE_NAMESPACE).items[0]
    assert [(s.namespace, s.name) for s in binding.subjects] == [(AIRFLOW_NAMESPACE, "airflow-worker")]
    quota = core.list_namespaced_resource_quota(STAGE_NAMESPACE).items[0]
    assert quota.status.hard["requests.nvidia.com/gpu"] == "2"  # the quota controller took it up
    assert core.list_namespaced_limit_range(STAGE_NAMESPACE).items
    classes = {c.metadata.name: c for c in client.SchedulingV1Api(api).list_priority_class().items}
    assert classes["genai-training"].preemption_policy == "Never"
    assert classes["genai-inference"].value > classes["genai-training"].value
    policies = client.NetworkingV1Api(api).list_namespaced_network_policy(STAGE_NAMESPACE).items
    assert {p.metadata.name for p in policies}  # admitted (the bed has no CNI that enforces them)

    admin = platform.cluster.admin_kubeconfig
    tested = helm("test", "genai", "--namespace", AIRFLOW_NAMESPACE, kubeconfig=admin)
    assert tested.returncode == 0, tested.stderr + tested.stdout
    assert "Phase:          Succeeded" in tested.stdout
    log = core.read_namespaced_pod_log("genai-artifact-check", STAGE_NAMESPACE)
    assert "as genai-stage-runner" in log and "artifact root reachable" in log, log
    assert "wrote, read back and deleted" in log  # the stage identity can write the shared root


def _refused(call, *args, **kwargs) -> str:
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        call(*args, **kwargs)
    assert refused.value.status == 403, refused.value
    return json.loads(refused.value.body)["message"]


def _exec(platform, namespace: str, pod: str) -> tuple[int, str]:
    """Status and message of a plain exec request as the worker: authorization is decided before any upgrade."""
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}/exec?command=true&stdout=true"
    answer = platform.cluster.request("POST", path, platform.worker_kubeconfig)
    return answer.status_code, answer.json().get("message", "") if answer.text.startswith("{") else answer.text


def test_the_worker_identity_can_do_nothing_but_run_stage_pods(platform):
    from kubernetes import client

    worker = platform.cluster.core(platform.worker_kubeconfig)
    admin = platform.cluster.core()
    assert worker.list_namespaced_pod(STAGE_NAMESPACE) is not None  # allowed: its own job
    message = _refused(worker.list_namespaced_secret, STAGE_NAMESPACE)
    assert 'cannot list resource "secrets"' in message
    _refused(worker.list_namespaced_secret, AIRFLOW_NAMESPACE)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="not-here"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="localhost/pause:catatonit")]),
    )
    message = _refused(worker.create_namespaced_pod, "default", pod)
    assert 'cannot create resource "pods"' in message and 'namespace "default"' in message
    # A pod outside the stage namespace (the admin's), which the worker must not exec into.
    admin.create_namespaced_pod(
        "default",
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="outside"),
            spec=client.V1PodSpec(
                containers=[client.V1Container(name="c", image="localhost/pause:catatonit", image_pull_policy="Never")]
            ),
        ),
    )
    try:
        status, message = _exec(platform, "default", "outside")
        assert status == 403 and 'resource "pods/exec"' in message, message
    finally:
        admin.delete_namespaced_pod("outside", "default", grace_period_seconds=0)
    # The same request in the stage namespace passes authorization (and fails after it: the pod has exited).
    status, message = _exec(platform, STAGE_NAMESPACE, "genai-artifact-check")
    assert status not in (401, 403), message
    message = _refused(worker.list_node)
    assert 'cannot list resource "nodes"' in message
