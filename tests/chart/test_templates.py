"""One test class per template of charts/genai-pipelines, asserting on the rendered objects of every target.

.venv/bin/pytest tests/chart/test_templates.py -q
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import jsonschema
import pytest

from tests.chart.conftest import CHART, CLOUDS, REPO, TARGETS, VALUES, find, helm_run, only, pipeline_with

sys.path.insert(0, str(REPO / "dags"))
from genai_dags.settings import KubernetesSettings
from genai_dags.stage_specs import STAGES

# The cncf.kubernetes provider's source, found without importing Airflow.
PROVIDER_POD_MANAGER = (
    Path(importlib.util.find_spec("airflow").origin).parent / "providers/cncf/kubernetes/utils/pod_manager.py"
)
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
    "helm.sh/chart",
)
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * _UNITS[unit]


def stage_namespace(pipeline: dict) -> str:
    return pipeline.get("kubernetes", {}).get("namespace", KubernetesSettings().namespace)


def stage_service_account(pipeline: dict) -> str:
    return pipeline.get("kubernetes", {}).get("service_account", KubernetesSettings().service_account)


TEMPLATE_TEST_CLASSES = {
    "stage-namespace/stage-namespace-namespace.yaml": "TestStageNamespace",
    "stage-service-account/stage-service-account-serviceaccount.yaml": "TestStageServiceAccount",
    "pod-launcher/pod-launcher-role.yaml": "TestPodLauncherRole",
    "pod-launcher/pod-launcher-rolebinding.yaml": "TestPodLauncherRoleBinding",
    "pipeline-config/pipeline-config-configmap.yaml": "TestPipelineConfigMap",
    "priority-classes/priority-classes-priorityclass.yaml": "TestPriorityClasses",
    "resource-quota/resource-quota-resourcequota.yaml": "TestResourceQuota",
    "limit-range/limit-range-limitrange.yaml": "TestLimitRange",
    "network-policies/network-policies-networkpolicy.yaml": "TestNetworkPolicies",
    "karpenter-node-pool/karpenter-node-pool-nodepool.yaml": "TestKarpenterNodePool",
    "artifact-check/artifact-check-pod.yaml": "TestArtifactCheckPod",
    "check-values.yaml": "TestCheckValues",  # tests/chart/test_check_values.py
    "NOTES.txt": "TestNotes",
}


class TestEveryTemplateHasATestClass:
    def test_each_template_file_is_covered_by_one_class(self):
        templates = {
            p.relative_to(CHART / "templates").as_posix()
            for p in (CHART / "templates").rglob("*")
            if p.is_file() and p.suffix in (".yaml", ".txt")
        }
        assert templates == set(TEMPLATE_TEST_CLASSES), "add the new template and its test class to the table"
        from tests.chart import test_check_values

        for template, name in TEMPLATE_TEST_CLASSES.items():
            assert name in globals() or hasattr(test_check_values, name), f"{template}: no class {name}"

    def test_templates_follow_component_slash_component_kind(self):
        for template in TEMPLATE_TEST_CLASSES:
            if "/" in template:
                component, file = template.split("/")
                assert file.startswith(component + "-"), template


class TestStandardLabels:
    @pytest.mark.parametrize("target", TARGETS)
    def test_every_object_carries_the_standard_labels(self, target, rendered):
        for obj in rendered[target]:
            labels = obj["metadata"].get("labels", {})
            missing = [label for label in STANDARD_LABELS if label not in labels]
            assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"

    @pytest.mark.parametrize("target", TARGETS)
    def test_every_namespaced_object_names_its_namespace(self, target, rendered):
        cluster_scoped = {"Namespace", "PriorityClass", "NodePool"}
        for obj in rendered[target]:
            if obj["kind"] not in cluster_scoped:
                assert obj["metadata"].get("namespace"), f"{obj['kind']}/{obj['metadata']['name']} has no namespace"


class TestStageNamespace:
    @pytest.mark.parametrize("target", TARGETS)
    def test_is_named_by_the_pipeline_config(self, target, rendered, pipeline_configs):
        namespace = only(rendered[target], "Namespace")
        assert namespace["metadata"]["name"] == stage_namespace(pipeline_configs[target])

    def test_enforces_the_restricted_pod_security_standard(self, rendered):
        labels = only(rendered["gke"], "Namespace")["metadata"]["labels"]
        for mode in ("enforce", "warn", "audit"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"

    def test_survives_helm_uninstall(self, rendered):
        assert only(rendered["eks"], "Namespace")["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    def test_is_not_rendered_when_it_exists_already(self, render):
        assert not find(render("gke", {"stageNamespace": {"create": False}}), "Namespace")

    def test_chart_defaults_match_the_dag_settings_defaults(self, render):
        """With no kubernetes section, the chart and the DAGs (settings.KubernetesSettings) agree on names."""
        objects = render("gke", pipeline_config="runtime: kubernetes\nartifact_root: gs://b/r\n")
        defaults = KubernetesSettings()
        assert only(objects, "Namespace")["metadata"]["name"] == defaults.namespace
        assert only(objects, "ServiceAccount")["metadata"]["name"] == defaults.service_account
        pod = only(objects, "Pod")
        assert pod["spec"]["containers"][0]["image"] == f"{defaults.image.repository}/trainer:{defaults.image.tag}"
        assert pod["spec"]["containers"][0]["imagePullPolicy"] == defaults.image.pull_policy
        assert pod["spec"]["securityContext"]["runAsUser"] == defaults.run_as_user
        quota = only(objects, "ResourceQuota")["spec"]["hard"]
        assert f"requests.{defaults.gpu_resource}" in quota


class TestStageServiceAccount:
    EXPECTED: ClassVar[dict] = {
        "local": {},
        "gke": {"iam.gke.io/gcp-service-account": "genai-stages@my-project.iam.gserviceaccount.com"},
        "eks": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/genai-stage-runner"},
        "aks": {"azure.workload.identity/client-id": "00000000-0000-0000-0000-000000000000"},
    }

    @pytest.mark.parametrize("target", TARGETS)
    def test_carries_the_workload_identity_annotation_of_its_cloud(self, target, rendered):
        account = only(rendered[target], "ServiceAccount")
        assert account["metadata"].get("annotations", {}) == self.EXPECTED[target]

    @pytest.mark.parametrize("target", TARGETS)
    def test_is_named_and_placed_by_the_pipeline_config(self, target, rendered, pipeline_configs):
        account = only(rendered[target], "ServiceAccount")
        assert account["metadata"]["name"] == stage_service_account(pipeline_configs[target])
        assert account["metadata"]["namespace"] == stage_namespace(pipeline_configs[target])

    def test_does_not_mount_an_api_token(self, rendered):
        for target in TARGETS:
            assert only(rendered[target], "ServiceAccount")["automountServiceAccountToken"] is False

    def test_eks_pod_identity_needs_no_annotation(self, render):
        objects = render("eks", {"workloadIdentity": {"awsMode": "pod-identity", "awsRoleArn": ""}})
        assert "annotations" not in only(objects, "ServiceAccount")["metadata"]

    def test_aks_tenant_and_extra_annotations_are_added(self, render):
        tenant = "22222222-2222-2222-2222-222222222222"
        objects = render(
            "aks",
            {"workloadIdentity": {"azureTenantId": tenant}, "stageServiceAccount": {"annotations": {"team": "ml"}}},
        )
        annotations = only(objects, "ServiceAccount")["metadata"]["annotations"]
        assert annotations["azure.workload.identity/tenant-id"] == tenant
        assert annotations["team"] == "ml"


class TestPodLauncherRole:
    EXACT_RULES: ClassVar[dict] = {
        ("", "pods"): {"create", "get", "list", "watch", "delete", "patch"},
        ("", "pods/log"): {"get", "list"},
        ("", "pods/exec"): {"create", "get"},
        ("", "events"): {"list", "watch"},
    }

    @pytest.mark.parametrize("target", TARGETS)
    def test_grants_exactly_the_verbs_the_pod_operator_needs(self, target, rendered):
        role = only(rendered[target], "Role")
        granted = {}
        for rule in role["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs expected"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
        assert granted == self.EXACT_RULES

    def test_lives_in_the_stage_namespace_and_nothing_is_cluster_wide(self, rendered, pipeline_configs):
        for target in TARGETS:
            assert only(rendered[target], "Role")["metadata"]["namespace"] == stage_namespace(pipeline_configs[target])
            kinds = {o["kind"] for o in rendered[target]}
            assert not kinds & {"ClusterRole", "ClusterRoleBinding"}

    def test_exec_is_granted_because_the_provider_reads_xcom_through_exec(self):
        source = PROVIDER_POD_MANAGER.read_text()
        extract = source.split("def extract_xcom_json", 1)[1].split("\n    def ", 1)[0]
        assert "connect_get_namespaced_pod_exec" in extract, (
            "the XCom sidecar is no longer read via exec: drop pods/exec"
        )

    def test_is_not_rendered_when_disabled(self, render):
        objects = render("gke", {"podLauncherRbac": {"enabled": False}})
        assert not find(objects, "Role") and not find(objects, "RoleBinding")


class TestPodLauncherRoleBinding:
    @pytest.mark.parametrize("target", TARGETS)
    def test_binds_the_airflow_worker_service_account_of_the_airflow_values(self, target, rendered, airflow_values):
        binding = only(rendered[target], "RoleBinding")
        worker = airflow_values[target]["workers"]["kubernetes"]["serviceAccount"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": worker, "namespace": "airflow"}]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": only(rendered[target], "Role")["metadata"]["name"],
        }

    def test_extra_service_accounts_and_another_airflow_namespace(self, render):
        objects = render(
            "gke", {"airflow": {"namespace": "orchestration", "extraServiceAccounts": ["airflow-triggerer"]}}
        )
        subjects = only(objects, "RoleBinding")["subjects"]
        assert [(s["name"], s["namespace"]) for s in subjects] == [
            ("airflow-worker", "orchestration"),
            ("airflow-triggerer", "orchestration"),
        ]
        assert only(objects, "ConfigMap")["metadata"]["namespace"] == "orchestration"


class TestPipelineConfigMap:
    @pytest.mark.parametrize("target", TARGETS)
    def test_holds_the_pipeline_yaml_byte_for_byte(self, target, rendered):
        config_map = only(rendered[target], "ConfigMap")
        assert config_map["data"] == {"pipeline.yaml": (VALUES / target / "pipeline.yaml").read_text()}

    def test_lives_in_airflows_namespace_with_a_content_checksum(self, rendered):
        import hashlib

        config_map = only(rendered["eks"], "ConfigMap", "genai-pipeline-config")
        assert config_map["metadata"]["namespace"] == "airflow"
        expected = hashlib.sha256((VALUES / "eks" / "pipeline.yaml").read_bytes()).hexdigest()
        assert config_map["metadata"]["annotations"]["genai-pipelines.io/pipeline-config-sha256"] == expected


class TestPriorityClasses:
    def test_training_yields_to_inference_and_never_preempts(self, rendered):
        classes = {o["metadata"]["name"]: o for o in find(rendered["gke"], "PriorityClass")}
        training, inference = classes["genai-training"], classes["genai-inference"]
        assert training["value"] < inference["value"]
        assert training["preemptionPolicy"] == "Never"
        assert not training["globalDefault"] and not inference["globalDefault"]

    def test_are_not_rendered_when_disabled(self, rendered):
        assert not find(rendered["local"], "PriorityClass")

    def test_the_pipeline_may_name_them_on_its_node_pools(self, render, pipeline_configs):
        config = pipeline_with("gke", {"kubernetes.node_pools.gpu-spot.priority_class": "genai-training"})
        render("gke", pipeline_config=config)  # renders: the class exists


class TestResourceQuota:
    def test_keys_the_gpu_quota_by_the_pipelines_gpu_resource(self, rendered, render):
        assert only(rendered["gke"], "ResourceQuota")["spec"]["hard"]["requests.nvidia.com/gpu"] == "4"
        config = pipeline_with("gke", {"kubernetes.gpu_resource": "amd.com/gpu"})
        hard = only(render("gke", pipeline_config=config), "ResourceQuota")["spec"]["hard"]
        assert "requests.amd.com/gpu" in hard and "requests.nvidia.com/gpu" not in hard

    @pytest.mark.parametrize("target", CLOUDS)
    def test_admits_the_largest_stage(self, target, rendered):
        hard = only(rendered[target], "ResourceQuota")["spec"]["hard"]
        for spec in STAGES.values():
            assert quantity(spec.cpu) <= quantity(hard["requests.cpu"]), spec.name
            assert quantity(spec.memory) <= quantity(hard["requests.memory"]), spec.name
            assert spec.gpu <= int(hard["requests.nvidia.com/gpu"]), spec.name


class TestLimitRange:
    @pytest.mark.parametrize("target", TARGETS)
    def test_lets_every_stage_container_through(self, target, rendered):
        limits = only(rendered[target], "LimitRange")["spec"]["limits"][0]
        for spec in STAGES.values():
            assert quantity(spec.cpu) <= quantity(limits["max"]["cpu"]), spec.name
            assert quantity(spec.memory) <= quantity(limits["max"]["memory"]), spec.name

    def test_defaults_memory_limits_but_never_a_cpu_limit(self, rendered):
        limits = only(rendered["aks"], "LimitRange")["spec"]["limits"][0]
        assert limits["type"] == "Container"
        assert set(limits["default"]) == {"memory"}, "a default CPU limit would throttle stages"
        assert set(limits["defaultRequest"]) == {"cpu", "memory"}


class TestNetworkPolicies:
    IDENTITY: ClassVar[dict] = {
        "local": set(),
        "aks": set(),
        "eks": set(),
        "gke": {("169.254.169.254/32", 80), ("169.254.169.252/32", 988)},
    }

    def policies(self, objects):
        return {o["metadata"]["name"].removeprefix("genai-"): o["spec"] for o in find(objects, "NetworkPolicy")}

    @pytest.mark.parametrize("target", TARGETS)
    def test_deny_everything_by_default_in_the_stage_namespace(self, target, rendered, pipeline_configs):
        policies = self.policies(rendered[target])
        assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
        for obj in find(rendered[target], "NetworkPolicy"):
            assert obj["metadata"]["namespace"] == stage_namespace(pipeline_configs[target])
            assert "ingress" not in obj["spec"], "stage pods serve nothing: no ingress rule"

    @pytest.mark.parametrize("target", TARGETS)
    def test_allow_only_dns_https_and_the_clouds_identity_endpoint(self, target, rendered):
        policies = self.policies(rendered[target])
        dns = policies["allow-dns"]["egress"]
        assert dns[0]["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
        https = policies["allow-https"]["egress"]
        assert https[0]["ports"] == [{"protocol": "TCP", "port": 443}]
        identity = {
            (rule["to"][0]["ipBlock"]["cidr"], rule["ports"][0]["port"])
            for rule in policies.get("allow-workload-identity", {}).get("egress", [])
        }
        assert identity == self.IDENTITY[target]
        assert set(policies) <= {"default-deny", "allow-dns", "allow-https", "allow-workload-identity"}

    def test_eks_pod_identity_reaches_the_node_agent(self, render):
        objects = render("eks", {"workloadIdentity": {"awsMode": "pod-identity", "awsRoleArn": ""}})
        rules = self.policies(objects)["allow-workload-identity"]["egress"]
        assert [(r["to"][0]["ipBlock"]["cidr"], r["ports"][0]["port"]) for r in rules] == [("169.254.170.23/32", 80)]

    def test_https_can_be_narrowed_and_extra_egress_added(self, render):
        objects = render(
            "aks",
            {
                "networkPolicies": {
                    "https": {"cidrs": ["10.0.0.0/8"], "except": ["10.1.0.0/16"]},
                    "extraEgress": [
                        {"to": [{"ipBlock": {"cidr": "10.2.0.10/32"}}], "ports": [{"protocol": "TCP", "port": 3128}]}
                    ],
                }
            },
        )
        policies = self.policies(objects)
        assert policies["allow-https"]["egress"][0]["to"] == [
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}
        ]
        assert policies["allow-extra-egress"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 3128}]

    def test_are_not_rendered_when_disabled(self, render):
        assert not find(render("gke", {"networkPolicies": {"enabled": False}}), "NetworkPolicy")


class TestKarpenterNodePool:
    # Hand-written from the Karpenter v1 API (karpenter.sh/v1 NodePool) for the fields this chart sets:
    # no CRD schema is available offline. It catches structural mistakes, not every CRD rule.
    SCHEMA: ClassVar[dict] = {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "karpenter.sh/v1"},
            "kind": {"const": "NodePool"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["template"],
                "additionalProperties": False,
                "properties": {
                    "template": {
                        "type": "object",
                        "required": ["spec"],
                        "additionalProperties": False,
                        "properties": {
                            "metadata": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"labels": {"type": "object"}, "annotations": {"type": "object"}},
                            },
                            "spec": {
                                "type": "object",
                                "required": ["nodeClassRef", "requirements"],
                                "additionalProperties": False,
                                "properties": {
                                    "nodeClassRef": {
                                        "type": "object",
                                        "required": ["group", "kind", "name"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "group": {"type": "string"},
                                            "kind": {"type": "string"},
                                            "name": {"type": "string"},
                                        },
                                    },
                                    "requirements": {
                                        "type": "array",
                                        "maxItems": 100,
                                        "items": {
                                            "type": "object",
                                            "required": ["key", "operator"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "key": {"type": "string"},
                                                "operator": {
                                                    "enum": ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
                                                },
                                                "values": {"type": "array", "items": {"type": "string"}},
                                                "minValues": {"type": "integer"},
                                            },
                                        },
                                    },
                                    "taints": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["key", "effect"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "key": {"type": "string"},
                                                "value": {"type": "string"},
                                                "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                                            },
                                        },
                                    },
                                    "startupTaints": {"type": "array"},
                                    "expireAfter": {"type": "string", "pattern": r"^(([0-9]+(s|m|h))+|Never)$"},
                                    "terminationGracePeriod": {"type": "string"},
                                },
                            },
                        },
                    },
                    "limits": {"type": "object", "additionalProperties": {"type": "string"}},
                    "weight": {"type": "integer", "minimum": 1, "maximum": 100},
                    "disruption": {
                        "type": "object",
                        "required": ["consolidateAfter"],
                        "additionalProperties": False,
                        "properties": {
                            "consolidationPolicy": {"enum": ["WhenEmpty", "WhenEmptyOrUnderutilized"]},
                            "consolidateAfter": {"type": "string", "pattern": r"^(([0-9]+(s|m|h))+|Never)$"},
                            "budgets": {"type": "array"},
                        },
                    },
                },
            },
        },
    }

    def node_pool(self, rendered):
        return only(rendered["eks"], "NodePool")

    def test_is_rendered_only_on_eks(self, rendered):
        for target in TARGETS:
            assert bool(find(rendered[target], "NodePool")) == (target == "eks")

    def test_matches_the_karpenter_v1_nodepool_structure(self, rendered):
        jsonschema.Draft7Validator(self.SCHEMA).validate(self.node_pool(rendered))

    def test_serves_both_gpu_node_pools_of_the_pipeline_config(self, rendered, pipeline_configs):
        node_pool = self.node_pool(rendered)
        pools = pipeline_configs["eks"]["kubernetes"]["node_pools"]
        requirements = {r["key"]: r for r in node_pool["spec"]["template"]["spec"]["requirements"]}
        for pool in ("gpu-spot", "gpu-on-demand"):
            selector = pools[pool]["node_selector"]
            assert selector["karpenter.sh/nodepool"] == node_pool["metadata"]["name"]
            assert selector["karpenter.sh/capacity-type"] in requirements["karpenter.sh/capacity-type"]["values"]

    def test_every_taint_is_tolerated_by_both_gpu_node_pools(self, rendered, pipeline_configs):
        taints = self.node_pool(rendered)["spec"]["template"]["spec"]["taints"]
        assert taints, "GPU nodes must be tainted so that CPU stages stay off them"
        for pool in ("gpu-spot", "gpu-on-demand"):
            tolerations = pipeline_configs["eks"]["kubernetes"]["node_pools"][pool]["tolerations"]
            for taint in taints:
                assert any(tolerates(t, taint) for t in tolerations), f"{pool} does not tolerate {taint}"

    def test_limits_gpus_and_never_consolidates_a_busy_node(self, rendered):
        spec = self.node_pool(rendered)["spec"]
        assert spec["limits"] == {"nvidia.com/gpu": "8"}
        assert spec["disruption"]["consolidationPolicy"] == "WhenEmpty"


def tolerates(toleration: dict, taint: dict) -> bool:
    """Kubernetes' rule: same key (or an empty key with Exists), same effect (or none), Exists or equal value."""
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    if toleration.get("key") and toleration["key"] != taint["key"]:
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return True
    return toleration.get("value", "") == taint.get("value", "")


class TestArtifactCheckPod:
    def pod(self, rendered, target):
        return only(rendered[target], "Pod")

    @pytest.mark.parametrize("target", CLOUDS)
    def test_is_a_helm_test_hook_run_with_the_stage_identity_and_image(self, target, rendered, pipeline_configs):
        pod = self.pod(rendered, target)
        k = pipeline_configs[target]["kubernetes"]
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert pod["metadata"]["namespace"] == k["namespace"]
        assert pod["spec"]["serviceAccountName"] == k["service_account"]
        assert pod["spec"]["containers"][0]["image"] == f"{k['image']['repository']}/trainer:{k['image']['tag']}"
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
        assert env["ARTIFACT_ROOT"] == pipeline_configs[target]["artifact_root"]

    @pytest.mark.parametrize("target", CLOUDS)
    def test_runs_non_root_read_only_without_capabilities(self, target, rendered):
        pod = self.pod(rendered, target)
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["spec"]["automountServiceAccountToken"] is False
        for container in pod["spec"]["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] > 0
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "limits" in container["resources"] and "requests" in container["resources"]

    def test_carries_the_aks_workload_identity_pod_label(self, rendered):
        assert self.pod(rendered, "aks")["metadata"]["labels"]["azure.workload.identity/use"] == "true"
        assert "azure.workload.identity/use" not in self.pod(rendered, "gke")["metadata"]["labels"]

    def test_runs_on_the_cpu_node_pool(self, rendered, pipeline_configs):
        for target in CLOUDS:
            expected = pipeline_configs[target]["kubernetes"]["node_pools"]["cpu"]["node_selector"]
            assert self.pod(rendered, target)["spec"]["nodeSelector"] == expected

    def test_is_not_rendered_for_a_local_artifact_root(self, rendered):
        assert not find(rendered["local"], "Pod")

    @pytest.mark.parametrize("write_probe", ["true", "false"])
    def test_its_probe_lists_writes_and_cleans_up_an_fsspec_root(self, rendered, tmp_path, write_probe):
        """Run the pod's exact script here against a local fsspec root (the cloud stores need the cloud)."""
        container = self.pod(rendered, "gke")["spec"]["containers"][0]
        root = tmp_path / "root"
        root.mkdir()
        (root / "runs").mkdir()
        env = {
            **os.environ,
            "ARTIFACT_ROOT": f"file://{root}",
            "STAGE_SERVICE_ACCOUNT": "test",
            "WRITE_PROBE": write_probe,
            "HOSTNAME": "probe",
        }
        proc = subprocess.run(
            [sys.executable, *container["command"][1:], *container["args"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "artifact root reachable" in proc.stdout
        assert ("wrote, read back and deleted" in proc.stdout) == (write_probe == "true")
        assert not list((root / "_healthchecks").iterdir()) if write_probe == "true" else True


class TestNotes:
    @pytest.mark.parametrize("target", TARGETS)
    def test_tell_the_user_how_to_trigger_a_dag_with_a_conf(self, helm, target, pipeline_configs):
        out = helm_run(
            helm,
            "install",
            "genai",
            str(CHART),
            "--namespace",
            "airflow",
            "--dry-run=client",
            "-f",
            str(VALUES / target / "genai.yaml"),
            "--set-file",
            f"pipelineConfig={VALUES / target / 'pipeline.yaml'}",
        )
        notes = out.split("NOTES:", 1)[1]
        assert "airflow dags trigger genai_finetune --conf" in notes
        assert f"docs/deploy-{target}.md" in notes
        assert ("helm test genai" in notes) == (target != "local")
        assert stage_namespace(pipeline_configs[target]) in notes
