"""Each stage image run exactly as its Kubernetes pod would run it, chained, against the local runtime.

The pods come from the DAG itself (``genai_dags.render_pods``: the kubernetes runtime's operators,
templates rendered, ``build_pod_request_obj(dry_run=True)``) under a GKE-style pipeline config whose
image repository and tag are the images just built. From each pod's main container this test takes
the image, command, args, environment, user, read-only root and capability drop, and turns its
``emptyDir`` mounts into tmpfs; nothing of it is retyped. The one translation is the artifact root:
``gs://<bucket>/root`` in the pod's args is a local folder mounted in the container at ``/artifacts``
(what workload identity and the bucket give a real pod). The containers get no network.

The same four stages then run with the local runtime's command on the host, and the outputs must
agree: the same files in every stage folder, tokenized data byte for byte, and every numeric metric
within a relative tolerance of 1e-3 (the image's Python and libraries are built differently from the
host's, so the last bits of a float may differ; the torch wheel is the same).

    make test-docker
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genai_dags import render_pods
from genai_dags.settings import load_file
from genai_dags.stage_specs import CONTAINER_INIT
from tests.docker.conftest import ROOT, docker, numbers

pytestmark = pytest.mark.docker

BUCKET_ROOT = "gs://genai-docker-tier/root"
MOUNT = "/artifacts"
CHAIN = ["tokenize", "train_lora", "evaluate", "batch_infer"]
REL_TOL = 1e-3


@pytest.fixture(scope="module")
def pipeline_config(stage_images, tmp_path_factory) -> Path:
    """values/gke/pipeline.yaml with the built images and a base model under the artifact root."""
    repository, tag = stage_images["stage-base"].rsplit(":", 1)
    data = yaml.safe_load((ROOT / "values/gke/pipeline.yaml").read_text())
    data["artifact_root"] = BUCKET_ROOT
    data["kubernetes"]["image"].update({"repository": repository, "tag": tag})
    data["base_models"] = {"tiny": "{artifact_root}/base/model"}
    path = tmp_path_factory.mktemp("docker-tier") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def conf() -> dict:
    return {
        "model_name": "folio-docker",
        "base_model": "tiny",
        "train_data_uri": f"{BUCKET_ROOT}/data/folio",
        "prompts_uri": f"{BUCKET_ROOT}/data/prompts.jsonl",
        "tokenize": {"block_size": 64},
        "train": {"rank": 4, "max_steps": 8, "batch_size": 8, "learning_rate": 0.003},
        "evaluate": {"max_eval_docs": 30, "min_relative_improvement": -1, "num_samples": 1, "sample_max_new_tokens": 8},
        "inference": {"max_new_tokens": 8},
    }


@pytest.fixture(scope="module")
def pods(pipeline_config, conf) -> dict[str, dict]:
    """{stage: the pod the genai_finetune DAG builds for it} under the kubernetes runtime."""
    settings = load_file(pipeline_config)
    dag = render_pods.load_dags(pipeline_config)["genai_finetune"]
    out = {}
    for _task_id, op in render_pods.stage_tasks(dag, settings, conf):
        if op.stage in CHAIN:
            out[op.stage] = render_pods.render_pod(op, dag)
    assert sorted(out) == sorted(CHAIN)
    return out


def seed_root(root: Path, tiny_base_model: str, folio_corpus: Path) -> None:
    """The inputs every run starts from: the base model and the data, inside the artifact root."""
    shutil.copytree(tiny_base_model.removeprefix("file://"), root / "base/model")
    shutil.copytree(folio_corpus, root / "data/folio")
    prompts = (ROOT / "examples/prompts/folio-prompts.jsonl").read_text().splitlines()[:4]
    (root / "data/prompts.jsonl").write_text("\n".join(prompts) + "\n")
    for path in [root, *root.rglob("*")]:  # the pod's uid must be able to write where the stages write
        path.chmod(0o777 if path.is_dir() else 0o666)


def main_container(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "base")


def docker_run_args(pod: dict, artifacts: Path, xcom: Path) -> list[str]:
    """`docker run` arguments that reproduce the pod's main container (see the module docstring)."""
    container = main_container(pod)
    sc = {**pod["spec"].get("securityContext", {}), **container.get("securityContext", {})}
    empty_dirs = {v["name"] for v in pod["spec"].get("volumes", []) if "emptyDir" in v}
    args = ["run", "--rm", "--network", "none", "--user", f"{sc['runAsUser']}:{sc['runAsGroup']}"]
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for cap in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == "/airflow/xcom":  # the XCom sidecar's folder: kept to read the result
            args += ["-v", f"{xcom}:{mount['mountPath']}"]
        elif mount["name"] in empty_dirs:
            args += ["--tmpfs", f"{mount['mountPath']}:exec"]
    for env in container.get("env", []):
        args += ["-e", f"{env['name']}={env['value']}"]
    args += ["-v", f"{artifacts}:{MOUNT}"]
    command = container["command"]
    return [*args, "--entrypoint", command[0], container["image"], *command[1:], *pod_args(pod, MOUNT)]


def pod_args(pod: dict, root: str) -> list[str]:
    return [a.replace(BUCKET_ROOT, root) for a in main_container(pod)["args"]]


@pytest.fixture(scope="module")
def chained(pods, tiny_base_model, folio_corpus, tmp_path_factory) -> dict:
    """Both runs: the four stages in containers (as pods) and with the local runtime's command."""
    base = tmp_path_factory.mktemp("chain")
    in_docker, local = base / "docker", base / "local"
    for root in (in_docker, local):
        root.mkdir()
        seed_root(root, tiny_base_model, folio_corpus)
    results: dict[str, dict] = {"docker": {}, "local": {}}
    for stage in CHAIN:
        pod = pods[stage]
        xcom = base / f"xcom-{stage}"
        xcom.mkdir(mode=0o777)
        xcom.chmod(0o777)
        done = docker(*docker_run_args(pod, in_docker, xcom), check=False, timeout=600)
        assert done.returncode == 0, f"{stage} in its image:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        results["docker"][stage] = json.loads((xcom / "return.json").read_text())

        # The local runtime's command: the same stage module and arguments, on the host's interpreter.
        result_path = base / f"local-{stage}.json"
        env = {**os.environ, "STAGE_RESULT_PATH": str(result_path), "PYTHONPATH": str(ROOT)}
        python_m = main_container(pod)["command"][len(CONTAINER_INIT) + 1 :]  # the init and "python" left out
        command = [sys.executable, *python_m, *pod_args(pod, str(local))]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{stage} locally:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        results["local"][stage] = json.loads(result_path.read_text())
    return {"docker_root": in_docker, "local_root": local, "results": results}


def stage_dir(result: dict, root: Path, mounted_as: str) -> Path:
    return Path(result["output_uri"].removeprefix("file://").replace(mounted_as, str(root), 1))


def files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_stage_ran_in_its_image_with_the_pod_command(pods, stage_images):
    for stage, pod in pods.items():
        container = main_container(pod)
        assert container["command"] == ["dumb-init", "--", "python", "-m", f"stages.{stage}"]
        assert container["image"] in stage_images.values()
        assert main_container(pod)["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_chained_stages_write_the_same_files_as_the_local_runtime(chained):
    for stage in CHAIN:
        in_docker = stage_dir(chained["results"]["docker"][stage], chained["docker_root"], MOUNT)
        local = stage_dir(chained["results"]["local"][stage], chained["local_root"], str(chained["local_root"]))
        assert set(files(in_docker)) == set(files(local)), stage
        assert not any(r["cache_hit"] for r in chained["results"]["docker"].values())


def test_tokenized_data_is_identical(chained):
    in_docker = stage_dir(chained["results"]["docker"]["tokenize"], chained["docker_root"], MOUNT)
    local = stage_dir(chained["results"]["local"]["tokenize"], chained["local_root"], str(chained["local_root"]))
    compared = 0
    for rel, path in files(in_docker).items():
        if rel.endswith("manifest.json") or rel.endswith("config.yaml") or rel.endswith("config.json"):
            continue  # they name the artifact root, the image and the timings
        assert path.read_bytes() == (local / rel).read_bytes(), rel
        compared += 1
    assert compared >= 2


def test_metrics_agree_within_the_stated_tolerance(chained):
    for stage in CHAIN:
        in_docker = numbers(chained["results"]["docker"][stage]["metrics"])
        local = numbers(chained["results"]["local"][stage]["metrics"])
        keys = {k for k in in_docker if "second" not in k and "time" not in k and "per_s" not in k}
        assert keys, stage
        for key in sorted(keys):
            assert math.isclose(in_docker[key], local[key], rel_tol=REL_TOL, abs_tol=1e-9), (stage, key)


def test_manifests_record_the_image_that_ran(chained):
    for stage in CHAIN:
        result = chained["results"]["docker"][stage]
        manifest = json.loads(Path(stage_dir(result, chained["docker_root"], MOUNT) / "manifest.json").read_text())
        assert manifest["code"]["image"].rsplit("/", 1)[-1].split(":")[0] in {
            "tokenizer", "trainer", "evaluator", "inferencer"
        }  # fmt: skip
