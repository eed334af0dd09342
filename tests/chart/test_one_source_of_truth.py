"""One source of truth: what the chart deploys agrees with the pods the DAGs build from the same pipeline.yaml.

    .venv/bin/pytest tests/chart/test_one_source_of_truth.py -q

The trainer pod is built by the DAG code itself (genai_dags.operators.stage_task, rendered offline by
genai_dags.render_pods.render_pod) under values/<cloud>/pipeline.yaml, for its first try (spot) and its
last try (on-demand), and compared with the objects our chart renders from the same file.
"""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import pytest

from tests.chart.conftest import CLOUDS, REPO, VALUES, only
from tests.chart.test_templates import tolerates

sys.path.insert(0, str(REPO / "dags"))


@pytest.fixture(scope="session")
def trainer_pods() -> dict[str, dict[str, dict]]:
    """{cloud: {"spot": pod, "on-demand": pod}} for the train_lora task, as the DAGs build it."""
    from genai_dags.operators import stage_task
    from genai_dags.render_pods import render_pod
    from genai_dags.settings import load_file

    pods = {}
    for cloud in CLOUDS:
        settings = load_file(VALUES / cloud / "pipeline.yaml")
        op = stage_task("train_lora", settings, arguments=["max_steps=1"], retries=settings.retries)
        dag = SimpleNamespace(dag_id="genai_finetune")
        pods[cloud] = {
            "spot": render_pod(op, dag, try_number=1),
            "on-demand": render_pod(op, dag, try_number=settings.retries + 1),
        }
    return pods


class TestOneSourceOfTruth:
    @pytest.mark.parametrize("cloud", CLOUDS)
    def test_the_trainer_runs_in_the_charts_namespace_with_its_service_account(self, cloud, trainer_pods, rendered):
        for capacity, pod in trainer_pods[cloud].items():
            assert pod["metadata"]["namespace"] == only(rendered[cloud], "Namespace")["metadata"]["name"], capacity
            account = only(rendered[cloud], "ServiceAccount")
            assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
            assert pod["metadata"]["namespace"] == account["metadata"]["namespace"]

    @pytest.mark.parametrize("cloud", CLOUDS)
    def test_the_helm_test_uses_the_trainers_image_and_user(self, cloud, trainer_pods, rendered):
        trainer = trainer_pods[cloud]["spot"]["spec"]
        check = only(rendered[cloud], "Pod")["spec"]
        assert check["containers"][0]["image"] == trainer["containers"][0]["image"]
        assert check["securityContext"]["runAsUser"] == trainer["securityContext"]["runAsUser"]

    @pytest.mark.parametrize("cloud", CLOUDS)
    def test_the_trainer_fits_the_charts_quota_and_limits(self, cloud, trainer_pods, rendered):
        from tests.chart.test_templates import quantity

        hard = only(rendered[cloud], "ResourceQuota")["spec"]["hard"]
        maximum = only(rendered[cloud], "LimitRange")["spec"]["limits"][0]["max"]
        for container in trainer_pods[cloud]["spot"]["spec"]["containers"]:
            requests = container.get("resources", {}).get("requests", {})
            for resource, amount in requests.items():
                assert quantity(amount) <= quantity(hard[f"requests.{resource}"]), (container["name"], resource)
                if resource in maximum:
                    assert quantity(amount) <= quantity(maximum[resource]), (container["name"], resource)

    def test_the_karpenter_nodepool_takes_both_trainer_tries(self, trainer_pods, rendered):
        node_pool = only(rendered["eks"], "NodePool")
        template = node_pool["spec"]["template"]["spec"]
        capacity = next(r for r in template["requirements"] if r["key"] == "karpenter.sh/capacity-type")
        for kind, pod in trainer_pods["eks"].items():
            selector = pod["spec"]["nodeSelector"]
            assert selector["karpenter.sh/nodepool"] == node_pool["metadata"]["name"], kind
            assert selector["karpenter.sh/capacity-type"] == kind
            assert kind in capacity["values"]
            for taint in template["taints"]:
                assert any(tolerates(t, taint) for t in pod["spec"]["tolerations"]), (kind, taint)

    def test_aks_stage_pods_carry_the_workload_identity_label(self, trainer_pods):
        for pod in trainer_pods["aks"].values():
            assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"

    @pytest.mark.parametrize("cloud", ["gke", "aks"])
    def test_the_docs_create_the_node_pools_the_trainer_selects_and_taint_them_tolerably(self, cloud, trainer_pods):
        """GKE and AKS node pools come from the cloud CLI in docs/deploy-<cloud>.md: names, labels, taints."""
        doc = (REPO / "docs" / f"deploy-{cloud}.md").read_text()
        commands = re.findall(
            r"(?ms)^((?:gcloud container node-pools create|az aks nodepool add).*?)(?:\n\n|\n```)", doc
        )
        by_name = {}
        for command in commands:
            name = re.search(r"(?:node-pools create|--name)\s+(\S+)", command).group(1)
            by_name[name] = command
        for kind, pod in trainer_pods[cloud].items():
            selector = pod["spec"]["nodeSelector"]
            pool = selector.get("cloud.google.com/gke-nodepool") or selector.get("kubernetes.azure.com/agentpool")
            if pool is None:  # GKE spot: selected by the spot label, the pool name is free
                pool = next(n for n, c in by_name.items() if "--spot" in c)
            assert pool in by_name, f"{cloud}: docs create no node pool {pool!r} for the {kind} trainer"
            command = by_name[pool]
            taints = re.search(r"--node-taints[ =](\S+)", command)
            for taint_text in taints.group(1).split(",") if taints else []:
                key, value_effect = (
                    taint_text.split("=", 1)
                    if "=" in taint_text.split(":")[0]
                    else (taint_text.split(":")[0], ":" + taint_text.split(":")[1])
                )
                value, effect = value_effect.split(":")
                taint = {"key": key, "value": value, "effect": effect}
                assert any(tolerates(t, taint) for t in pod["spec"]["tolerations"]), (
                    f"{cloud} {pool}: {taint} not tolerated"
                )
            if cloud == "gke" and "cloud.google.com/gke-accelerator" in selector:
                assert f"type={selector['cloud.google.com/gke-accelerator']}" in command
            if kind == "spot":
                assert ("--spot" in command) or ("--priority Spot" in command), f"{pool} is not a spot pool"

    @pytest.mark.parametrize("cloud", CLOUDS)
    def test_the_trainer_pod_passes_the_namespaces_restricted_pod_security(self, cloud, trainer_pods, rendered):
        """The chart enforces Pod Security 'restricted' on the stage namespace: the DAG's pods must meet it."""
        labels = only(rendered[cloud], "Namespace")["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        for capacity, pod in trainer_pods[cloud].items():
            spec = pod["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, capacity
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", capacity
            allowed_volumes = {"emptyDir", "configMap", "secret", "projected", "downwardAPI", "persistentVolumeClaim"}
            for volume in spec.get("volumes", []):
                assert set(volume) - {"name"} <= allowed_volumes, volume
            for container in spec["containers"] + spec.get("initContainers", []):
                context = container.get("securityContext", {})
                assert context.get("allowPrivilegeEscalation") is False, (capacity, container["name"])
                assert context.get("capabilities", {}).get("drop") == ["ALL"], (capacity, container["name"])
                assert not context.get("privileged"), (capacity, container["name"])
