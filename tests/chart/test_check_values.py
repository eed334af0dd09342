"""Bad values fail at render time with a message that names the value to change.

    .venv/bin/pytest tests/chart/test_check_values.py -q

Two layers: values.schema.json (types, enums, patterns, unknown keys; helm reports the key path) and
templates/check-values.yaml (combinations a schema cannot express, e.g. settings of another cloud).
"""

from __future__ import annotations

import pytest

from tests.chart.conftest import VALUES, HelmError, pipeline_with

GKE_PIPELINE = (VALUES / "gke" / "pipeline.yaml").read_text()

# (id, target, overrides, pipeline config (None: the target's own), fragments the error must contain)
BAD_VALUES = [
    # wrong type
    ("cloud-not-a-string", "gke", {"cloud": 3}, None, ["cloud", "string"]),
    (
        "quota-gpus-as-text",
        "gke",
        {"resourceQuota": {"hard": {"gpus": "four"}}},
        None,
        ["/resourceQuota/hard/gpus", "integer"],
    ),
    (
        "dns-peers-not-a-list",
        "gke",
        {"networkPolicies": {"dns": {"peers": {"k8s-app": "kube-dns"}}}},
        None,
        ["/networkPolicies/dns/peers", "array"],
    ),
    # unknown key (a typo must not be silently ignored)
    ("typo-top-level", "gke", {"workloadIdentiy": {"gcpServiceAccount": "x"}}, None, ["workloadIdentiy"]),
    ("typo-nested", "eks", {"karpenterNodePool": {"gpuLimits": 4}}, None, ["karpenterNodePool", "gpuLimits"]),
    # enum / pattern
    ("unknown-cloud", "gke", {"cloud": "openshift"}, None, ["/cloud", "must be one of"]),
    (
        "malformed-role-arn",
        "eks",
        {"workloadIdentity": {"awsRoleArn": "genai-stage-runner"}},
        None,
        ["/workloadIdentity/awsRoleArn", "does not match pattern"],
    ),
    ("zero-gpu-quota", "gke", {"resourceQuota": {"hard": {"gpus": 0}}}, None, ["/resourceQuota/hard/gpus", "minimum"]),
    # missing required
    ("no-pipeline-config", "gke", None, "", ["pipelineConfig is empty", "--set-file pipelineConfig=values/"]),
    (
        "gke-without-gcp-service-account",
        "gke",
        {"workloadIdentity": {"gcpServiceAccount": ""}},
        None,
        ["cloud=gke needs workloadIdentity.gcpServiceAccount"],
    ),
    (
        "irsa-without-role",
        "eks",
        {"workloadIdentity": {"awsRoleArn": ""}},
        None,
        ["awsMode=irsa needs workloadIdentity.awsRoleArn"],
    ),
    (
        "aks-without-client-id",
        "aks",
        {"workloadIdentity": {"azureClientId": ""}},
        None,
        ["cloud=aks needs workloadIdentity.azureClientId"],
    ),
    ("worker-service-account-null", "gke", {"airflow": {"workerServiceAccount": None}}, None, ["airflow"]),
    # conflicting options
    (
        "pod-identity-with-role-arn",
        "eks",
        {"workloadIdentity": {"awsMode": "pod-identity"}},
        None,
        ["awsMode=pod-identity and awsRoleArn conflict"],
    ),
    (
        "settings-of-another-cloud",
        "gke",
        {"workloadIdentity": {"azureClientId": "00000000-0000-0000-0000-000000000000"}},
        None,
        ["AKS settings but cloud=gke"],
    ),
    (
        "karpenter-off-eks",
        "gke",
        {"karpenterNodePool": {"enabled": True}},
        None,
        ["karpenterNodePool.enabled=true needs cloud=eks"],
    ),
    ("pipeline-of-another-cloud", "eks", None, GKE_PIPELINE, ["cloud=eks needs an artifact_root starting with s3://"]),
    (
        "local-runtime-on-a-cloud",
        "gke",
        None,
        (VALUES / "local" / "pipeline.yaml").read_text(),
        ["cloud=gke but pipelineConfig runtime=local"],
    ),
    (
        "aks-pods-without-the-identity-label",
        "aks",
        None,
        pipeline_with("aks", {"kubernetes.labels": {"team": "ml"}}),
        ["azure.workload.identity/use"],
    ),
    (
        "stages-in-airflows-namespace",
        "gke",
        {"airflow": {"namespace": "genai-stages"}},
        None,
        ["must not be Airflow's namespace"],
    ),
    (
        "unknown-priority-class",
        "gke",
        {"priorityClasses": {"enabled": False}},
        pipeline_with("gke", {"kubernetes.node_pools.cpu.priority_class": "genai-training"}),
        ["node_pools.cpu.priority_class=genai-training is not created by this chart"],
    ),
    (
        "unknown-stage-priority-class",
        "gke",
        None,
        pipeline_with("gke", {"stages.train_lora.priority_class": "genai-batch"}),
        [
            "stages.train_lora.priority_class=genai-batch is not created by this chart",
            "names: genai-training, genai-inference",
        ],
    ),
    (
        "artifact-check-on-a-local-root",
        "local",
        {"artifactCheck": {"enabled": True}},
        None,
        ["artifactCheck.enabled=true needs an object-storage artifact_root"],
    ),
    (
        "pipeline-config-not-yaml-mapping",
        "gke",
        None,
        "runtime: [kubernetes\n",
        ["pipelineConfig is not a YAML mapping"],
    ),
]


class TestCheckValues:
    def test_the_table_covers_each_kind_of_mistake(self):
        assert len(BAD_VALUES) >= 8

    @pytest.mark.parametrize(
        ("target", "overrides", "pipeline_config", "expected"),
        [case[1:] for case in BAD_VALUES],
        ids=[case[0] for case in BAD_VALUES],
    )
    def test_bad_values_fail_with_a_clear_message(self, render, target, overrides, pipeline_config, expected):
        with pytest.raises(HelmError) as failure:
            render(target, overrides, pipeline_config)
        message = str(failure.value)
        for fragment in expected:
            # helm 4 names a schema path /a/b, helm 3 a.b: accept either (a helm on PATH may be 3.x)
            forms = {fragment, fragment.strip("/").replace("/", ".")} if fragment.startswith("/") else {fragment}
            assert any(form in message for form in forms), f"{fragment!r} not in helm's error:\n{message}"

    def test_the_shipped_values_render(self, rendered):
        assert all(rendered.values())
