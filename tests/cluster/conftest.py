"""The cluster tier: a real Kubernetes control plane and two kubelets on this machine (tests/cluster/bed).

    make test-cluster          (root, a Docker engine, containerd, runc; the bed's binaries are built once)

The bed starts once per session with the stage images (built by the docker tier) imported into both
nodes, and stops at the end with nothing left behind. Without what it needs, every test here is skipped
with the reason, unless ``GENAI_REQUIRE_CLUSTER=1`` (set by ``.ci/run``): then it is a failure.

The tests talk to the apiserver through the official Python client, as the admin (the cluster's
owner) or as the identities the chart creates.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docker.conftest import ROOT, engine_problem
from tests.served_airflow import ServedAirflow, serve

BED_SCRIPTS = ROOT / "tests" / "cluster" / "bed"
# The bed's state (certificates, each node's containerd with the imported images, logs, the shared
# artifact folder) lives outside any clone, so a fresh clone imports only the image layers that changed;
# not under a home folder: the artifact folder is mounted at its own path in pods whose user (uid 10001)
# must be able to traverse that path's parents in the image (the images' /root is private).
BED_STATE = Path(os.environ.get("GENAI_BED_STATE") or "/var/tmp/genai-pipelines/k8s-bed")
NODES = {"on-demand": "localhost", "spot": "k8sbed-node2"}
STAGE_NAMESPACE = "genai-stages"
SIDECAR_IMAGE = "localhost/xcom-sidecar:busybox"
AIRFLOW_NAMESPACE = "airflow"


def bed_problem() -> str | None:
    """Why the bed cannot start on this machine; None when it can."""
    if os.geteuid() != 0:
        return "the bed needs root (cgroups, mount namespaces, containerd)"
    for tool in ("unshare", "curl", "apt-get"):  # build.sh installs containerd, runc and Go itself
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/sys/fs/cgroup/cpu").is_dir():
        return "the bed's kubelets need cgroup v1 hierarchies (/sys/fs/cgroup/cpu)"
    return engine_problem()


@dataclass
class Cluster:
    """The running bed: kubeconfigs and API clients of its identities."""

    state: Path

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state / "kubeconfig-admin"

    def client(self, kubeconfig: Path | None = None) -> Any:
        from kubernetes import client, config

        api = client.ApiClient(config.new_client_from_config(str(kubeconfig or self.admin_kubeconfig)).configuration)
        return api

    def core(self, kubeconfig: Path | None = None) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.client(kubeconfig))

    def request(self, method: str, path: str, kubeconfig: Path | None = None, body: dict | None = None) -> Any:
        """One raw apiserver call with a kubeconfig's token, for what the Python client cannot say (an
        exec without a stream upgrade, policy/v1beta1 evictions): the ``requests`` response."""
        import requests

        config = yaml.safe_load((kubeconfig or self.admin_kubeconfig).read_text())
        return requests.request(
            method,
            f"https://127.0.0.1:6443{path}",
            json=body,
            headers={"Authorization": f"Bearer {config['users'][0]['user']['token']}"},
            verify=config["clusters"][0]["cluster"]["certificate-authority"],
            timeout=30,
        )

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig that authenticates as a service account, with its token (as a pod would)."""
        core = self.core()
        deadline = time.monotonic() + 60
        while True:  # the token controller adds the secret a moment after the account appears
            account = core.read_namespaced_service_account(name, namespace)
            if account.secrets or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert account.secrets, f"service account {namespace}/{name} got no token secret"
        secret = core.read_namespaced_secret(account.secrets[0].name, namespace)
        token = base64.b64decode(secret.data["token"]).decode()
        admin = yaml.safe_load(self.admin_kubeconfig.read_text())
        path = self.state / f"kubeconfig-sa-{namespace}-{name}"
        admin["users"] = [{"name": name, "user": {"token": token}}]
        admin["contexts"] = [{"name": "bed", "context": {"cluster": "bed", "user": name, "namespace": namespace}}]
        path.write_text(yaml.safe_dump(admin))
        path.chmod(0o600)
        return path


def _bed(action: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BED_SCRIPTS / f"{action}.sh", *args],
        env={**os.environ, "BED": str(BED_STATE), **env},
        capture_output=True,
        text=True,
        timeout=1800,
    )


def _running() -> bool:
    ca = BED_STATE / "pki" / "ca.crt"
    check = ["curl", "-sf", "--cacert", str(ca), "https://127.0.0.1:6443/readyz"]
    return ca.is_file() and subprocess.run(check, capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def cluster(stage_images) -> Cluster:
    """The bed, started for this session and stopped after it.

    ``GENAI_BED_REUSE=1`` keeps a bed running between sessions (start it with start.sh): only the stage
    images are imported again, and the tests clean up their own objects.
    """
    problem = bed_problem()
    if problem:
        if os.environ.get("GENAI_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"GENAI_REQUIRE_CLUSTER=1 but the cluster bed cannot start: {problem}")
        pytest.skip(f"cluster tier: {problem}")
    if os.environ.get("GENAI_BED_REUSE") == "1" and _running():
        done = _bed("import-images", *stage_images.values())
        assert done.returncode == 0, done.stderr
        yield Cluster(BED_STATE)
        return
    _bed("stop")  # a bed left running by an interrupted session
    started = time.monotonic()
    done = _bed("start", IMAGES=" ".join(stage_images.values()))
    print(done.stdout[-3000:])
    if done.returncode != 0:
        logs = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted((BED_STATE / "logs").glob("*.log")))
        _bed("stop")
        pytest.fail(f"the cluster bed did not start:\n{done.stderr[-3000:]}\n{logs}")
    print(f"cluster bed started in {time.monotonic() - started:.0f} s")
    yield Cluster(BED_STATE)
    stopped = _bed("stop")
    print(stopped.stdout[-2000:], stopped.stderr[-2000:])
    # Nothing left behind: every recorded process stopped, every mount under the bed undone.
    assert not list((BED_STATE / "pids").glob("*.pid")), stopped.stdout[-2000:]
    assert "; 0 mounts left under" in stopped.stdout, stopped.stdout[-2000:]


def pods_left(cluster: Cluster, namespace: str = STAGE_NAMESPACE, wait: float = 60) -> list[str]:
    """Stage pods that still exist once deletions have had ``wait`` seconds to finish (the chart's test pod
    is kept on purpose). A deleted pod lingers until its kubelet has stopped its containers."""
    deadline = time.monotonic() + wait
    while True:
        pods = cluster.core().list_namespaced_pod(namespace, label_selector="app.kubernetes.io/name=genai-stage")
        names = [p.metadata.name for p in pods.items]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(1)


def create(call, *args) -> None:
    """Create an object unless it exists (a reused bed keeps the objects of earlier sessions)."""
    from kubernetes.client.exceptions import ApiException

    try:
        call(*args)
    except ApiException as exc:
        if exc.status != 409:
            raise


@dataclass
class Platform:
    """Our chart installed on the bed, with what Airflow's chart and the cluster admin would add."""

    cluster: Cluster
    artifact_root: Path
    pipeline_config: Path
    worker_kubeconfig: Path
    release: str = "genai"


def helm(*args: str, kubeconfig: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    from tests.chart.conftest import find_helm

    return subprocess.run(
        [find_helm(), *args],
        cwd=ROOT,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bed_pipeline_config(artifact_root: Path, tag: str) -> str:
    """values/bed/pipeline.yaml with this session's artifact folder and image tag."""
    config = yaml.safe_load((ROOT / "values" / "bed" / "pipeline.yaml").read_text())
    config["artifact_root"] = str(artifact_root)
    config["kubernetes"]["image"]["tag"] = tag
    return yaml.safe_dump(config, sort_keys=False)


@pytest.fixture(scope="session")
def platform(cluster, stage_images, tmp_path_factory) -> Platform:
    from kubernetes import client

    api = cluster.client()
    core = client.CoreV1Api(api)
    artifact_root = cluster.state / "artifacts"
    shutil.rmtree(artifact_root, ignore_errors=True)
    artifact_root.mkdir(parents=True)
    artifact_root.chmod(0o777)  # hostPath volumes keep the folder's own owner: the stage uid must write
    tag = stage_images["stage-base"].rsplit(":", 1)[1]
    config = tmp_path_factory.mktemp("bed-config") / "pipeline.yaml"
    config.write_text(bed_pipeline_config(artifact_root, tag))

    # What the Airflow chart creates: its namespace and the workers' service account.
    create(core.create_namespace, client.V1Namespace(metadata=client.V1ObjectMeta(name=AIRFLOW_NAMESPACE)))
    create(
        core.create_namespaced_service_account,
        AIRFLOW_NAMESPACE,
        client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="airflow-worker")),
    )
    installed = helm(
        "upgrade", "--install", "genai", "charts/genai-pipelines", "--namespace", AIRFLOW_NAMESPACE,
        "-f", "values/bed/genai.yaml", "--set-file", f"pipelineConfig={config}", "--wait",
        kubeconfig=cluster.admin_kubeconfig,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    # What the cluster admin provides for a shared file system: a ReadWriteMany volume and its claim.
    create(
        core.create_persistent_volume,
        client.V1PersistentVolume(
            metadata=client.V1ObjectMeta(name="genai-artifacts"),
            spec=client.V1PersistentVolumeSpec(
                capacity={"storage": "10Gi"},
                access_modes=["ReadWriteMany"],
                storage_class_name="bed-shared",
                host_path=client.V1HostPathVolumeSource(path=str(artifact_root), type="Directory"),
            ),
        ),
    )
    create(
        core.create_namespaced_persistent_volume_claim,
        STAGE_NAMESPACE,
        client.V1PersistentVolumeClaim(
            metadata=client.V1ObjectMeta(name="genai-artifacts"),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteMany"],
                storage_class_name="bed-shared",
                volume_name="genai-artifacts",
                resources=client.V1ResourceRequirements(requests={"storage": "10Gi"}),
            ),
        ),
    )
    deadline = time.monotonic() + 60
    while core.read_namespaced_persistent_volume_claim("genai-artifacts", STAGE_NAMESPACE).status.phase != "Bound":
        assert time.monotonic() < deadline, "the artifact claim did not bind"
        time.sleep(1)
    worker = cluster.service_account_kubeconfig(AIRFLOW_NAMESPACE, "airflow-worker")
    # Airflow reaches the cluster through this connection, as the chart's least-privilege identity.
    os.environ["AIRFLOW_CONN_GENAI_BED"] = json.dumps(
        {
            "conn_type": "kubernetes",
            # The bed's stand-in for the provider's alpine sidecar (tests/cluster/bed/Dockerfile.sidecar).
            "extra": {"kube_config_path": str(worker), "xcom_sidecar_container_image": SIDECAR_IMAGE},
        }
    )
    from genai_dags import local_airflow

    local_airflow.migrate()  # Airflow's metadata database, for the DAG runs of the tests
    yield Platform(cluster, artifact_root, config, worker)
    os.environ.pop("AIRFLOW_CONN_GENAI_BED", None)  # the other tiers run without it


def seed(root: Path, tiny_base_model: str, folio_corpus: Path) -> None:
    """The inputs every run starts from: the base model and the data, inside the artifact root."""
    if not (root / "base/model").exists():
        shutil.copytree(tiny_base_model.removeprefix("file://"), root / "base/model")
        shutil.copytree(folio_corpus, root / "data/folio")
        prompts = (ROOT / "examples/prompts/folio-prompts.jsonl").read_text().splitlines()[:8]
        (root / "data/prompts.jsonl").write_text("\n".join(prompts) + "\n")
    for path in [root, *root.rglob("*")]:  # the pods' uid writes beside these files
        path.chmod(0o777 if path.is_dir() else 0o666)


@pytest.fixture(scope="session")
def bed_inputs(platform, tiny_base_model, folio_corpus) -> Path:
    """The base model and the data in the bed's artifact root, where the stage pods read them."""
    seed(platform.artifact_root, tiny_base_model, folio_corpus)
    return platform.artifact_root


@pytest.fixture(scope="session")
def served_airflow(platform, tmp_path_factory) -> ServedAirflow:
    """Airflow's components under the bed's pipeline config (tests/served_airflow.py)."""
    with serve(platform.pipeline_config, tmp_path_factory.mktemp("airflow-served")) as served:
        yield served
