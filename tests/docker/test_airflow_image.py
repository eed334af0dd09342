"""The Airflow image: the official Airflow image with our DAGs and the providers they need, pinned alike.

make test-docker        (or: .venv/bin/python -m pytest tests/docker/test_airflow_image.py)
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest

from tests.docker.conftest import ROOT, build_env, docker

REQUIREMENTS = ROOT / "images/airflow/requirements.txt"


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        if match := re.fullmatch(r"\s*([A-Za-z0-9_.\[\]-]+)==([^\s;#]+).*", line):
            found[re.sub(r"\[.*\]", "", match.group(1)).lower()] = match.group(2)
    return found


def test_the_image_pins_what_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    everything = pins(project["dependencies"] + [r for extra in extras.values() for r in extra])
    image = pins(REQUIREMENTS.read_text().splitlines())
    assert {name: everything.get(name) for name in image} == image
    # Every package of the `airflow` extra is in the image: from its base (Airflow and its SDK) or from the file.
    airflow_extra = set(pins(extras["airflow"]))
    assert airflow_extra - set(image) == {"apache-airflow", "apache-airflow-task-sdk"}


@pytest.fixture(scope="module")
def airflow_image(docker_engine) -> str:
    env = build_env(IMAGES="airflow")
    done = subprocess.run([ROOT / "images/build.sh", "build"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:] + done.stdout[-3000:]
    return subprocess.run(
        [ROOT / "images/build.sh", "list"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


PARSE = """
import importlib.util, json
from airflow.dag_processing.dagbag import BundleDagBag
bag = BundleDagBag(dag_folder="/opt/airflow/dags", bundle_path="/opt/airflow/dags", bundle_name="dags-folder")
print(json.dumps({
    "dags": sorted(bag.dags),
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "train_lora": type(bag.dags["genai_finetune"].get_task("train_lora")).__name__ if bag.dags else None,
    "modules": {m: bool(importlib.util.find_spec(m)) for m in ("stages", "torch", "airflow.providers.docker")},
}))
"""


@pytest.mark.docker
def test_the_airflow_image_parses_every_dag_for_a_cluster_without_stage_code(airflow_image):
    config = ROOT / "values/gke/pipeline.yaml"  # what the chart's ConfigMap mounts
    done = docker(
        "run", "--rm", "--network", "none", "-v", f"{config}:/etc/genai/pipeline.yaml:ro",
        "-e", "GENAI_PIPELINE_CONFIG=/etc/genai/pipeline.yaml", airflow_image, "python", "-c", PARSE,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed["errors"] == {}
    assert parsed["dags"] == [
        "genai_batch_inference",
        "genai_finetune",
        "genai_monitor",
        "genai_promote",
        "genai_retrain",
    ]
    assert parsed["train_lora"] == "StagePodOperator"  # the kubernetes runtime, as configured
    assert parsed["modules"] == {"stages": False, "torch": False, "airflow.providers.docker": True}
    user = docker("image", "inspect", "--format", "{{.Config.User}}", airflow_image).stdout.strip()
    assert user in ("airflow", "50000")
