"""The kubernetes runtime: a stage as a hardened pod on its node pool (KubernetesPodOperator).

GPU stages run on the ``gpu-spot`` node pool; their last try runs on ``gpu-on-demand`` so that a
run that keeps losing its spot nodes still finishes. Exit 2 (the user's mistake) fails the task
without retries. Everything cluster-specific (image, namespace, service account, node selectors,
tolerations, resources) comes from the pipeline config; see ``dags/README.md``.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.utils.container import container_is_running, container_is_terminated
from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager
from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults
from airflow.sdk.exceptions import AirflowException
from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException

from genai_dags.lineage import StageLineage, parent_run_environment
from genai_dags.pod_failures import StagePod, diagnose, refused_at_admission
from genai_dags.settings import NodePool, PipelineSettings, ResolvedStage
from genai_dags.stage_contract import (
    EXIT_USER_ERROR,
    RESOURCES_ENV,
    StageUserError,
    container_environment,
    finish,
    resources_environment,
)

QUOTA_POLL_SECONDS = 5
# The provider's XCom sidecar loop traps only SIGINT (how it is told to stop once the result is read). As
# its container's PID 1 it then outlives a pod deletion or a spot notice by the whole grace period, and
# the deleted pod keeps its GPU (and its place in the quota) that long. It stops on SIGTERM too.
SIDECAR_COMMAND = 'trap "exit 0" INT TERM; while true; do sleep 1; done;'


def _tolerations(pool: NodePool) -> list[k8s.V1Toleration]:
    return [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in pool.tolerations]


class StagePodManager(PodManager):
    """The provider's PodManager, corrected where a live cluster showed it wrong.

    - A pod that has ended has no running container. Once a pod's phase is Failed or Succeeded (evicted,
      past its activeDeadlineSeconds) the kubelet stops its containers but may leave their last statuses
      as they were: still "running" after a deadline, none at all after an eviction. The provider then
      followed the logs of a stopped container forever, or waited 15 minutes for the XCom sidecar.
    - A refused pod is the operator's to name, in one line: the provider logs the whole pod and a
      traceback, at each attempt while the operator waits for room in a full quota.
    """

    def run_pod_async(self, pod: k8s.V1Pod, **kwargs: Any) -> k8s.V1Pod:
        body = self._client.api_client.sanitize_for_serialization(pod)
        self.log.debug("creating pod %s", body)
        return self._client.create_namespaced_pod(body=body, namespace=pod.metadata.namespace, **kwargs)

    def container_is_running(self, pod: k8s.V1Pod, container_name: str) -> bool:
        remote_pod = self.read_pod(pod)
        return not _ended(remote_pod) and container_is_running(pod=remote_pod, container_name=container_name)

    def container_is_terminated(self, pod: k8s.V1Pod, container_name: str) -> bool:
        remote_pod = self.read_pod(pod)
        return _ended(remote_pod) or container_is_terminated(pod=remote_pod, container_name=container_name)


def _ended(remote_pod: k8s.V1Pod) -> bool:
    return bool(remote_pod.status) and remote_pod.status.phase in ("Failed", "Succeeded")


class StagePodOperator(StageLineage, KubernetesPodOperator):
    """KubernetesPodOperator for one stage: picks spot or on-demand capacity per try, maps exit 2 to no-retry."""

    def __init__(
        self,
        *,
        stage: str,
        node_pool: NodePool | None = None,
        fallback_node_pool: NodePool | None = None,
        stage_priority_class: str = "",
        stage_pod: StagePod | None = None,
        fallback_resources: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stage = stage
        # What failure messages name (genai_dags.pod_failures): image, memory, node pool, timeouts.
        self.stage_pod = stage_pod or StagePod(stage, kwargs.get("image") or "", "", "", {}, 0, "")
        self.stage_priority_class = stage_priority_class
        self.node_pool = node_pool or NodePool()
        # GPU stages: the pool that the last try uses when spot capacity keeps being reclaimed.
        self.fallback_node_pool = fallback_node_pool
        # What the last try's attempt records instead (the on-demand pool and its price).
        self.fallback_resources = fallback_resources

    def execute(self, context: Any) -> Any:
        try:
            result = super().execute(context)
        except ApiException as exc:  # the apiserver refused the pod: quota, LimitRange, RBAC
            failure = refused_at_admission(exc, self.stage_pod, self.namespace)
            if failure is None:
                raise
            self.log.error("%s", failure.message)
            raise failure.exception() from None
        if not isinstance(result, dict):
            return result
        self.stage_result = finish(self.log, context, self.outlets, result)
        return self.stage_result

    def capacity_for_try(self, try_number: int) -> tuple[str, NodePool]:
        """Spot for every try but the last; the last try (when there are retries) runs on on-demand capacity."""
        if self.fallback_node_pool is not None and self.retries and try_number > self.retries:
            return "on-demand", self.fallback_node_pool
        return ("spot" if self.fallback_node_pool is not None else "standard"), self.node_pool

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        try_number = int(getattr(context["ti"], "try_number", 1) or 1) if context else 1
        capacity, pool = self.capacity_for_try(try_number)
        if capacity == "on-demand":
            self.log.warning(
                "try %s of %s: spot capacity failed before; this try runs on on-demand nodes",
                try_number,
                self.retries + 1,
            )
        self.node_selector = dict(pool.node_selector)
        self.tolerations = _tolerations(pool)
        self.priority_class_name = self.stage_priority_class or pool.priority_class or None
        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        pod.metadata.labels["genai-pipelines.io/capacity"] = capacity
        lineage_env = [k8s.V1EnvVar(name=k, value=v) for k, v in parent_run_environment(context).items()]
        for container in pod.spec.containers:
            if container.name == PodDefaults.SIDECAR_CONTAINER_NAME:
                container.command = ["sh", "-c", SIDECAR_COMMAND]
                continue
            if lineage_env:  # the task's run, for anything in the stage that emits lineage (genai_dags.lineage)
                container.env = [*(container.env or []), *lineage_env]
            if capacity == "on-demand" and self.fallback_resources is not None:
                for var in container.env or []:
                    if var.name == RESOURCES_ENV:
                        var.value = resources_environment(self.fallback_resources)[RESOURCES_ENV]
        return pod

    def get_or_create_pod(self, pod_request_obj: k8s.V1Pod, context: Any) -> k8s.V1Pod:
        """Create the pod; while the namespace's ResourceQuota has no room for it, wait as for a node.

        A full quota is the namespace's capacity (GPUs, pods), used by the run's other shards or other
        runs: it frees up. Failing at once would spend every retry within seconds.
        """
        deadline = time.monotonic() + self.startup_timeout_seconds
        while True:
            try:
                return super().get_or_create_pod(pod_request_obj, context)
            except ApiException as exc:
                failure = refused_at_admission(exc, self.stage_pod, self.namespace)
                left = deadline - time.monotonic()
                if failure is None or failure.cause != "quota" or left <= 0:
                    raise
                self.log.info(
                    "stage %s: no room in the namespace's ResourceQuota yet; waiting (%.0f s left)", self.stage, left
                )
                time.sleep(min(QUOTA_POLL_SECONDS, left))

    @cached_property
    def pod_manager(self) -> PodManager:
        return StagePodManager(kube_client=self.client, callbacks=self.callbacks)

    def cleanup(
        self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, xcom_result: dict | None = None, context: Any = None
    ) -> None:
        if remote_pod is not None and not self._killed:
            # The copy the provider holds may predate the failure (a launch timeout, a lost sidecar):
            # read what the scheduler and the kubelet recorded before the pod is deleted.
            try:
                remote_pod = self.pod_manager.read_pod(pod)
            except ApiException:  # already gone: keep the provider's copy
                self.log.debug("pod %s is gone; using the last copy read", pod.metadata.name)
        try:
            super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)
        except AirflowException as exc:
            if _exit_code(remote_pod, self.base_container_name) == EXIT_USER_ERROR:
                raise StageUserError(
                    f"stage {self.stage} rejected its settings or input (exit 2, not retried); "
                    "the reason is in the pod log above"
                ) from exc
            failure = diagnose(remote_pod, self.base_container_name, self.stage_pod)
            if failure is None:
                raise
            self.log.error("%s", failure.message)
            raise failure.exception() from exc


def _exit_code(remote_pod: k8s.V1Pod | None, container: str) -> int | None:
    statuses = (remote_pod.status.container_statuses if remote_pod and remote_pod.status else None) or []
    for status in statuses:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


def pod_kwargs(stage: ResolvedStage, settings: PipelineSettings) -> dict[str, Any]:
    k = settings.kubernetes
    uid = k.run_as_user
    requests = {"cpu": stage.cpu, "memory": stage.memory}
    limits = {"memory": stage.memory}  # no CPU limit: throttling slows tokenizing for no benefit
    if stage.uses_gpu:
        requests[k.gpu_resource] = limits[k.gpu_resource] = str(stage.gpu)
    hardened = k8s.V1SecurityContext(
        run_as_non_root=True,
        run_as_user=uid,
        run_as_group=uid,
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )
    volumes = [k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=k.scratch_size))]
    mounts = [k8s.V1VolumeMount(name="scratch", mount_path="/tmp")]
    env = container_environment(stage.image, settings.stage_resources(stage.name), settings.metrics.pushgateway_url)
    if stage.uses_gpu:  # NCCL (one training process per GPU) needs more shared memory than the 64 MiB default
        shm = k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=f"{k.shm_gib_per_gpu * stage.gpu}Gi")
        volumes.append(k8s.V1Volume(name="dshm", empty_dir=shm))
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
        env = {**k.gpu_env, **env}
    if k.artifact_volume_claim:  # a shared file system at the artifact root's own path: URIs mean the same
        claim = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=k.artifact_volume_claim)
        volumes.append(k8s.V1Volume(name="artifacts", persistent_volume_claim=claim))
        mounts.append(k8s.V1VolumeMount(name="artifacts", mount_path=settings.artifact_root.removeprefix("file://")))
    pool_name = stage.node_pool
    return {
        "stage_pod": StagePod(
            stage=stage.name,
            image=stage.image,
            memory=stage.memory,
            node_pool=pool_name,
            node_selector=dict(k.node_pools[pool_name].node_selector),
            startup_timeout_seconds=k.startup_timeout_seconds,
            scratch_size=k.scratch_size,
        ),
        "node_pool": k.node_pools[pool_name],
        "fallback_node_pool": k.node_pools["gpu-on-demand"] if pool_name == "gpu-spot" else None,
        "fallback_resources": settings.stage_resources(stage.name, "on-demand") if pool_name == "gpu-spot" else None,
        "stage_priority_class": stage.priority_class,
        "name": f"genai-{stage.name.replace('_', '-')}",
        "namespace": k.namespace,
        "service_account_name": k.service_account,
        # Stage pods never call the Kubernetes API; object-storage identity comes from workload
        # identity (GKE, AKS) or IRSA / Pod Identity (EKS), which do not need the API token mounted.
        "automount_service_account_token": False,
        "kubernetes_conn_id": k.kubernetes_conn_id,
        "in_cluster": k.in_cluster,
        "image": stage.image,
        "image_pull_policy": k.image.pull_policy,
        "cmds": stage.spec.container_command,
        "env_vars": env,
        "labels": {
            "app.kubernetes.io/name": "genai-stage",
            "app.kubernetes.io/component": stage.name.replace("_", "-"),
            "app.kubernetes.io/part-of": "genai-pipelines",
            "app.kubernetes.io/managed-by": "airflow",
            **k.labels,
        },
        "container_resources": k8s.V1ResourceRequirements(requests=requests, limits=limits),
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=uid,
            run_as_group=uid,
            fs_group=uid,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        "container_security_context": hardened,
        "xcom_sidecar_container_security_context": hardened,
        "volumes": volumes,
        "volume_mounts": mounts,
        "do_xcom_push": True,
        "get_logs": True,
        "log_events_on_failure": True,
        "on_finish_action": "delete_pod",
        "on_kill_action": "delete_pod",
        "termination_message_policy": "FallbackToLogsOnError",
        "termination_grace_period": k.termination_grace_seconds,
        "startup_timeout_seconds": k.startup_timeout_seconds,
        "schedule_timeout_seconds": k.startup_timeout_seconds,
        # The pod's own deadline backs up Airflow's execution_timeout if the worker itself dies.
        "active_deadline_seconds": int(stage.timeout.total_seconds()) + k.startup_timeout_seconds,
    }
