"""Fixtures of the chart tests: a pinned helm, renders of charts/genai-pipelines, strict Kubernetes schemas.

    .venv/bin/pytest tests/chart -q          (or: make test-chart)

helm comes from $HELM, else PATH, else build/bin/helm, which `make helm` fetches (pinned, sha256-checked)
when it is missing. Each shipped target (values/<target>/genai.yaml + values/<target>/pipeline.yaml) is
rendered once per session; tests that need other values render again with an override file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "genai-pipelines"
VALUES = REPO / "values"
TARGETS = ("local", "gke", "eks", "aks")
CLOUDS = ("gke", "eks", "aks")
# The schema range: kubernetes-validate 1.37.0 ships schemas up to 1.37 (1.20 is tested live in tests/cluster).
KUBERNETES_VERSIONS = tuple(f"1.{minor}" for minor in range(30, 38))


class HelmError(RuntimeError):
    """helm exited non-zero; the message is helm's stderr."""


def find_helm() -> str:
    candidates = [os.environ.get("HELM"), shutil.which("helm"), str(REPO / "build" / "bin" / "helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    # Not installed anywhere: fetch the pinned binary exactly as `make helm` does for users.
    subprocess.run(["make", "-s", "helm", f"PY={sys.executable}"], cwd=REPO, check=True)
    return str(REPO / "build" / "bin" / "helm")


@pytest.fixture(scope="session")
def helm() -> str:
    return find_helm()


def helm_run(helm: str, *args: str) -> str:
    proc = subprocess.run([helm, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise HelmError(proc.stderr.strip() or proc.stdout.strip())
    return proc.stdout


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def render(helm, tmp_path_factory):
    """render(target, overrides=None, pipeline_config=None) -> list of objects (helm template output).

    ``overrides`` is a values dict applied after values/<target>/genai.yaml; ``pipeline_config`` is
    pipeline.yaml text replacing values/<target>/pipeline.yaml (None: the shipped file; "": none at all).
    """
    workdir = tmp_path_factory.mktemp("helm-values")
    counter = iter(range(1_000_000))

    def _render(target: str, overrides: dict | None = None, pipeline_config: str | None = None) -> list[dict]:
        args = ["template", "genai", str(CHART), "--namespace", "airflow", "-f", str(VALUES / target / "genai.yaml")]
        if pipeline_config is None:
            args += ["--set-file", f"pipelineConfig={VALUES / target / 'pipeline.yaml'}"]
        elif pipeline_config:
            path = workdir / f"pipeline-{next(counter)}.yaml"
            path.write_text(pipeline_config)
            args += ["--set-file", f"pipelineConfig={path}"]
        if overrides:
            path = workdir / f"overrides-{next(counter)}.yaml"
            path.write_text(yaml.safe_dump(overrides))
            args += ["-f", str(path)]
        return [doc for doc in yaml.safe_load_all(helm_run(helm, *args)) if doc]

    return _render


@pytest.fixture(scope="session")
def rendered(render) -> dict[str, list[dict]]:
    """The objects of every shipped target, rendered once."""
    return {target: render(target) for target in TARGETS}


def pipeline_with(target: str, changes: dict[str, object]) -> str:
    """values/<target>/pipeline.yaml with some keys changed, e.g. {"kubernetes.gpu_resource": "amd.com/gpu"}.

    A value of None deletes the key. Dotted paths; a segment may itself contain a dot when quoted
    with brackets: "kubernetes.labels[azure.workload.identity/use]".
    """
    data = load_yaml(VALUES / target / "pipeline.yaml")
    for path, value in changes.items():
        keys = re.findall(r"\[([^\]]+)\]|([^.\[\]]+)", path)
        keys = [a or b for a, b in keys]
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return yaml.safe_dump(data, sort_keys=False)


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def only(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = find(objects, kind, name)
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="session")
def pipeline_configs() -> dict[str, dict]:
    return {target: load_yaml(VALUES / target / "pipeline.yaml") for target in TARGETS}


@pytest.fixture(scope="session")
def genai_values() -> dict[str, dict]:
    return {target: load_yaml(VALUES / target / "genai.yaml") for target in TARGETS}


@pytest.fixture(scope="session")
def airflow_values() -> dict[str, dict]:
    return {target: load_yaml(VALUES / target / "airflow.yaml") for target in TARGETS}


@pytest.fixture(scope="session")
def chart_defaults() -> dict:
    return load_yaml(CHART / "values.yaml")


@pytest.fixture(scope="session")
def values_schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


class KubernetesSchemas:
    """Strict (additionalProperties: false) JSON schemas of one Kubernetes version, loaded once.

    Same files and resolution as kubernetes_validate.validate(..., strict=True), cached: that call
    re-reads the 1.2 MB definitions file for every object.
    """

    ROOT = Path(__import__("kubernetes_validate").__file__).parent / "kubernetes-json-schema"

    @functools.cache  # noqa: B019 (one instance per session: the cache is the point)
    def _definitions(self, version: str):
        from referencing import Resource

        return Resource.from_contents(json.loads((self._dir(version) / "_definitions.json").read_text()))

    def _dir(self, version: str) -> Path:
        return self.ROOT / f"v{version}.0-local-strict"

    @functools.cache  # noqa: B019 (one instance per session: the cache is the point)
    def validator(self, version: str, kind: str, api_version: str):
        import jsonschema
        from referencing import Registry, Resource

        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        path = self._dir(version) / f"{kind.lower()}-{group_version}.json"
        if not path.exists():
            raise LookupError(f"no Kubernetes {version} schema for {kind} {api_version}")
        schema = json.loads(path.read_text())
        registry = self._definitions(version) @ (Resource.from_contents(schema) @ Registry())
        return jsonschema.Draft202012Validator(schema, registry=registry)

    def errors(self, obj: dict, version: str) -> list[str]:
        validator = self.validator(version, obj["kind"], obj["apiVersion"])
        return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.fixture(scope="session")
def kubernetes_schemas() -> KubernetesSchemas:
    return KubernetesSchemas()
