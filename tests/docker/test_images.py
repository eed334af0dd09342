"""The built stage images: non-root, the right entry point, no Airflow, no pip, labelled, small enough.

make test-docker        (or: .venv/bin/python -m pytest -m docker tests/docker/test_images.py)
"""

from __future__ import annotations

import json

import pytest

from genai_dags.stage_specs import STAGES
from tests.docker.conftest import docker

pytestmark = pytest.mark.docker

ENTRY_STAGE = {"tokenizer": "tokenize", "trainer": "train_lora", "evaluator": "evaluate", "inferencer": "batch_infer"}
MAX_CPU_IMAGE_BYTES = 2 * 1000**3


def inspect(ref: str) -> dict:
    return json.loads(docker("image", "inspect", ref).stdout)[0]


def run(ref: str, *args: str, entrypoint: str = "python"):
    """A container as a pod runs it: another non-root uid, read-only root, no capabilities, no network."""
    return docker(
        "run", "--rm", "--user", "12345:12345", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--network", "none", "--entrypoint", entrypoint, ref, *args,
        check=False,
    )  # fmt: skip


def test_every_stage_names_an_image_that_is_built(stage_images):
    assert {spec.image for spec in STAGES.values()} <= set(stage_images)


@pytest.mark.parametrize("name", sorted(ENTRY_STAGE))
def test_stage_image_runs_its_stage_as_a_non_root_user(stage_images, name):
    config = inspect(stage_images[name])["Config"]
    assert config["Entrypoint"] == ["python", "-m", f"stages.{ENTRY_STAGE[name]}"]
    assert config["User"] == "10001:10001"
    labels = config["Labels"]
    for key in ("source", "revision", "version", "title"):
        assert labels[f"org.opencontainers.image.{key}"], key
    # The entry point works on a read-only root filesystem: --help parses the stage's whole config.
    done = docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none", stage_images[name], "--help",
                  check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "artifact_root" in done.stdout


@pytest.mark.parametrize("name", sorted(ENTRY_STAGE))
def test_stage_image_has_no_airflow_no_pip_and_no_compiler(stage_images, name):
    probe = (
        "import importlib.util as u, shutil, sys, stages;"
        "found = [m for m in ('airflow', 'pip', 'torch', 'transformers', 'peft') if u.find_spec(m)];"
        "tools = [t for t in ('gcc', 'cc', 'make', 'git') if shutil.which(t)];"
        "print(' '.join(found) + '|' + ' '.join(tools))"
    )
    done = run(stage_images[name], "-c", probe)
    assert done.returncode == 0, done.stderr
    modules, tools = done.stdout.strip().split("|")
    assert modules.split() == ["torch", "transformers", "peft"]
    assert tools == ""


def test_stage_images_are_well_under_two_gigabytes(stage_images):
    sizes = {name: inspect(ref)["Size"] for name, ref in stage_images.items()}
    print("\nimage sizes: " + ", ".join(f"{stage_images[n]} {s / 1e6:.0f} MB" for n, s in sizes.items()))
    assert all(size < MAX_CPU_IMAGE_BYTES for size in sizes.values()), sizes
    # The four stage images are metadata on top of the shared base: they add no layers of their own size.
    base = sizes["stage-base"]
    assert all(abs(size - base) < 1e6 for size in sizes.values()), sizes


def test_a_code_only_change_rebuilds_in_seconds(stage_images, tmp_path):
    """Only the code layer and what follows is rebuilt: the dependency layers come from the cache."""
    import os
    import shutil
    import subprocess
    import time

    from tests.docker.conftest import ROOT, build_env

    # A copy of the build context with one extra module in stages/: the same Dockerfile, a code change.
    context = tmp_path / "ctx"
    for rel in ("stages", "images"):
        shutil.copytree(ROOT / rel, context / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("pyproject.toml", ".dockerignore"):
        shutil.copy(ROOT / rel, context / rel)
    (context / "build/wheels").mkdir(parents=True)
    for wheel in (ROOT / "build/wheels").glob("*.whl"):  # hard links: the same content, no 200 MB copy
        os.link(wheel, context / "build/wheels" / wheel.name)
    (context / "stages" / "_code_change_probe.py").write_text("MARKER = 1\n")
    start = time.monotonic()
    done = subprocess.run(
        [context / "images/build.sh", "build"], cwd=context, capture_output=True, text=True,
        env=build_env(IMAGES="stage-base trainer", TAG="code-change-probe", REGISTRY="genai-probe.local/ci"),
    )  # fmt: skip
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"\ncode-only rebuild of the base and one stage image: {seconds:.1f} s")
    assert seconds < 60, done.stdout[-3000:]
    assert (
        run(
            "genai-probe.local/ci/stages/trainer:code-change-probe", "-c", "import stages._code_change_probe"
        ).returncode
        == 0
    )
    for ref in ("genai-probe.local/ci/stages/trainer", "genai-probe.local/ci/stages"):
        docker("image", "rm", f"{ref}:code-change-probe", f"{ref}:latest", check=False)
