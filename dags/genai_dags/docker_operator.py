"""The docker runtime: a stage in a local container from its image, with the artifact root mounted.

    make build-images, then a pipeline config with ``runtime: docker`` (dags/README.md) and make airflow

The container gets what a Kubernetes pod gets: the same image, the same ``python -m stages.<name>``
command and arguments, the same environment (``stage_contract.container_environment``), a non-root user, a read-only
root filesystem with a scratch ``/tmp``, no capabilities and no privilege escalation. The local artifact
root is mounted read-write at its own path, so every URI means the same inside and outside; the paths
in ``docker.mounts`` (input data) are mounted read-only the same way. Exit 2 (the user's mistake) fails
the task without retries, like the other runtimes.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk.exceptions import AirflowException
from docker.types import DeviceRequest, Mount

from genai_dags.lineage import StageLineage, parent_run_environment
from genai_dags.settings import PipelineSettings, ResolvedStage
from genai_dags.stage_contract import EXIT_USER_ERROR, container_environment, finish, parse_result, user_error

DEFAULT_UID = 10001  # the images' own user (images/stage-base), used when Airflow itself runs as root


class _HardenedClient:
    """The provider's Docker API client, with the hardening the operator has no parameters for.

    ``DockerOperator`` offers no read-only root filesystem, no ``cap_drop``, no ``security_opt`` and no
    tmpfs; every container it creates goes through ``create_host_config``, so they are added there.
    """

    def __init__(self, client: Any, hardening: dict[str, Any]) -> None:
        self._client = client
        self._hardening = hardening

    def create_host_config(self, **kwargs: Any) -> Any:
        return self._client.create_host_config(**kwargs, **self._hardening)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class StageDockerOperator(StageLineage, DockerOperator):
    """DockerOperator for one stage: hardened container, the stage's JSON result as XCom, exit 2 not retried."""

    template_fields = (*DockerOperator.template_fields, "arguments")

    def __init__(self, *, stage: str, arguments: Any = (), stage_command: list[str], **kwargs: Any) -> None:
        super().__init__(command=None, **kwargs)
        self.stage = stage
        self.arguments = arguments
        self.stage_command = stage_command

    @property
    def cli(self) -> Any:
        return _HardenedClient(
            self.hook.api_client,
            {
                "read_only": True,
                "cap_drop": ["ALL"],
                "security_opt": ["no-new-privileges"],
                # The pod's emptyDirs: scratch at /tmp and the result file's folder.
                "tmpfs": {"/tmp": "rw,exec,nosuid,nodev", "/airflow/xcom": "rw,nosuid,nodev"},
            },
        )

    def execute(self, context: Any) -> dict[str, Any]:
        # The image's entry point is the stage; the command is given explicitly, as in a pod.
        self.entrypoint = list(self.stage_command)
        self.command = [str(a) for a in (self.arguments or [])]
        self.environment = {**(self.environment or {}), **parent_run_environment(context)}
        self.log.info("running %s in %s", " ".join([*self.entrypoint, *self.command]), self.image)
        try:
            lines = super().execute(context)
        except DockerContainerFailedException as exc:
            logs = [str(line) for line in (exc.logs or [])]
            code = self._exit_code()
            if code == EXIT_USER_ERROR:
                raise user_error(self.stage, logs) from exc
            raise AirflowException(
                f"stage {self.stage} exited {code} in {self.image}; last lines:\n" + "\n".join(logs[-10:])
            ) from exc
        finally:
            self._remove_container()
        lines = lines if isinstance(lines, list) else [lines or ""]
        json_line = next((line for line in reversed(lines) if str(line).startswith("{")), None)
        self.stage_result = finish(self.log, context, self.outlets, parse_result(self.stage, json_line))
        return self.stage_result

    def _exit_code(self) -> int | None:
        try:
            return int(self.hook.api_client.inspect_container(self.container["Id"])["State"]["ExitCode"])
        except Exception:  # the container is gone: the provider's message has the status
            return None

    def _remove_container(self) -> None:
        if getattr(self, "container", None):
            try:
                self.hook.api_client.remove_container(self.container["Id"], force=True)
            except Exception as exc:  # best effort: a leftover stopped container holds no resources
                self.log.warning("could not remove container %s: %s", self.container["Id"][:12], exc)


def _uid(settings: PipelineSettings) -> int:
    if settings.docker.run_as_user:
        return settings.docker.run_as_user
    return os.getuid() or DEFAULT_UID


def docker_kwargs(stage: ResolvedStage, settings: PipelineSettings) -> dict[str, Any]:
    """DockerOperator arguments of one stage."""
    root = settings.artifact_root.removeprefix("file://")
    mounts = [Mount(target=root, source=root, type="bind")]
    mounts += [Mount(target=path, source=path, type="bind", read_only=True) for path in settings.docker.mounts]
    uid = _uid(settings)
    return {
        "image": stage.image,
        "stage_command": stage.spec.container_command,
        "docker_url": settings.docker.url,
        "environment": container_environment(
            stage.image, settings.stage_resources(stage.name), settings.metrics.pushgateway_url
        ),
        "user": f"{uid}:{uid}",
        "mounts": mounts,
        "mount_tmp_dir": False,  # /tmp is a tmpfs, like the pod's emptyDir
        "network_mode": "bridge",
        "shm_size": 2 * 1024**3 if stage.uses_gpu else None,
        "device_requests": [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if stage.uses_gpu and settings.docker.gpus
        else None,
        "xcom_all": True,
        "do_xcom_push": True,
        "auto_remove": "never",  # removed by the operator once the exit code is read
        "labels": {"app.kubernetes.io/part-of": "genai-pipelines", "app.kubernetes.io/component": stage.name},
    }
