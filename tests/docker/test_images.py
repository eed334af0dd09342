"""The built stage images: non-root, the right entry point, no Airflow, no pip, labelled, small enough.

make test-docker        (or: .venv/bin/python -m pytest -m docker tests/docker/test_images.py)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from genai_dags.stage_specs import STAGES
from tests.docker.conftest import ROOT, build_env, docker

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
    # Each image's entry point is a stage that names that image in the stage table.
    assert all(STAGES[stage].image == image for image, stage in ENTRY_STAGE.items())


@pytest.mark.parametrize("name", sorted(ENTRY_STAGE))
def test_stage_image_runs_its_stage_as_a_non_root_user(stage_images, name):
    config = inspect(stage_images[name])["Config"]
    assert config["Entrypoint"] == ["dumb-init", "--", "python", "-m", f"stages.{ENTRY_STAGE[name]}"]
    assert config["User"] == "10001:10001"
    labels = config["Labels"]
    for key in ("source", "revision", "version", "title"):
        assert labels[f"org.opencontainers.image.{key}"], key
    assert labels["org.opencontainers.image.title"] == f"genai-pipelines {name}"
    assert labels["org.opencontainers.image.description"].startswith(f"python -m stages.{ENTRY_STAGE[name]}: ")
    assert labels["io.genai-pipelines.stage"] == ENTRY_STAGE[name]
    # The entry point works on a read-only root filesystem: --help parses the stage's whole config.
    done = docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none", stage_images[name], "--help",
                  check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "artifact_root" in done.stdout


def test_a_stage_without_a_signal_handler_yet_still_stops_on_sigterm(stage_images):
    """The container's init forwards SIGTERM: a process that has not installed a handler yet (Python still
    starting) gets the default action and exits 143. As PID 1 it would ignore the signal until SIGKILL (137)."""
    from genai_dags.stage_specs import CONTAINER_INIT

    started = docker(
        "run", "--detach", "--user", "12345:12345", "--read-only", "--cap-drop", "ALL", "--network", "none",
        "--entrypoint", CONTAINER_INIT[0], stage_images["trainer"], *CONTAINER_INIT[1:],
        "python", "-c", "import time; time.sleep(300)",
    )  # fmt: skip
    container = started.stdout.strip()
    try:
        docker("stop", "--time", "60", container)
        assert inspect_container(container)["State"]["ExitCode"] == 128 + 15
    finally:
        docker("rm", "--force", container, check=False)


def inspect_container(container: str) -> dict:
    return json.loads(docker("container", "inspect", container).stdout)[0]


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


PROBE_REGISTRY = "genai-probe.local/ci"


def probe_context(tmp_path: Path) -> Path:
    """A copy of the build context (the same Dockerfiles, code and wheels) that a test may change."""
    context = tmp_path / "ctx"
    for rel in ("stages", "images"):
        shutil.copytree(ROOT / rel, context / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("pyproject.toml", ".dockerignore"):
        shutil.copy(ROOT / rel, context / rel)
    (context / "build/wheels").mkdir(parents=True)
    for wheel in (ROOT / "build/wheels").glob("*.whl"):  # hard links: the same content, no 200 MB copy
        os.link(wheel, context / "build/wheels" / wheel.name)
    return context


def probe_build(context: Path, tag: str, **env: str) -> subprocess.CompletedProcess:
    """Build the base and the trainer image from ``context`` under a throw-away registry name."""
    return subprocess.run(
        [context / "images/build.sh", "build"], cwd=context, capture_output=True, text=True,
        env=build_env(IMAGES="stage-base trainer", TAG=tag, REGISTRY=PROBE_REGISTRY, **env),
    )  # fmt: skip


def remove_probe(tag: str) -> None:
    for ref in (f"{PROBE_REGISTRY}/stages/trainer", f"{PROBE_REGISTRY}/stages"):
        docker("image", "rm", f"{ref}:{tag}", f"{ref}:latest", check=False)


def saved_image_holds(ref: str, needles: list[bytes], tmp_path: Path) -> list[bytes]:
    """The needles found anywhere in ``docker save`` of ``ref``: every layer, the config and its history."""
    archive = tmp_path / "image.tar"
    docker("save", "--output", str(archive), ref)
    found: set[bytes] = set()
    overlap = max(map(len, needles)) - 1
    try:
        with archive.open("rb") as fh:  # layers are stored uncompressed: their files' bytes appear as they are
            tail = b""
            while block := fh.read(16 << 20):
                window = tail + block
                found.update(n for n in needles if n in window)
                tail = window[-overlap:]
    finally:
        archive.unlink()
    return sorted(found)


def test_a_code_only_change_rebuilds_only_the_code_layers(stage_images, tmp_path):
    """Layer order: a change to stages/ reuses every dependency layer from the cache, whatever the clock says."""
    context = probe_context(tmp_path)
    (context / "stages" / "_code_change_probe.py").write_text("MARKER = 1\n")
    start = time.monotonic()
    done = probe_build(context, "code-change-probe")
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"\ncode-only rebuild of the base and one stage image: {time.monotonic() - start:.1f} s")
    try:
        probe = run(f"{PROBE_REGISTRY}/stages/trainer:code-change-probe", "-c", "import stages._code_change_probe")
        assert probe.returncode == 0, probe.stderr
        before = inspect(stage_images["stage-base"])["RootFS"]["Layers"]
        after = inspect(f"{PROBE_REGISTRY}/stages:code-change-probe")["RootFS"]["Layers"]
    finally:
        remove_probe("code-change-probe")
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    # Only the code layers change: the copy of stages/ and its byte-compilation, the last two.
    assert changed == [len(after) - 2, len(after) - 1], changed


def test_no_planted_secret_reaches_an_image_layer(stage_images, tmp_path):
    """Secrets near a build (in the environment, in files beside the code, in the extra CA certificates
    handed to pip) never land in a layer, the image config or its history; nor do the build host's CAs."""
    planted = f"planted-{secrets.token_hex(16)}"
    context = probe_context(tmp_path)
    (context / ".env").write_text(f"AWS_SECRET_ACCESS_KEY={planted}\n")
    ca = tmp_path / "corporate-ca.pem"
    ca.write_text(f"-----BEGIN CERTIFICATE-----\n{planted}ca\n-----END CERTIFICATE-----\n")
    (context / "stages" / "_secret_probe.py").write_text("MARKER = 2\n")  # the code layer is rebuilt
    done = probe_build(context, "secret-probe", AWS_SECRET_ACCESS_KEY=planted, EXTRA_CA_CERTS=str(ca))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trusting extra CA certificates" in done.stdout  # the planted CA was handed to the build
    try:
        leaked = saved_image_holds(f"{PROBE_REGISTRY}/stages/trainer:secret-probe", [planted.encode()], tmp_path)
    finally:
        remove_probe("secret-probe")
    assert leaked == []
    # The session's own images were built from scratch with this host's extra CAs as a build secret (that
    # RUN step is cached above): no certificate body of theirs is in any layer of the shared base.
    host_ca = ROOT / "build/secrets/extra-ca.pem"
    lines = host_ca.read_bytes().splitlines() if host_ca.exists() else []
    bodies = [line for line in lines if len(line) >= 60 and b"-----" not in line][1:21]  # past the serial number
    if bodies:
        assert saved_image_holds(stage_images["stage-base"], bodies, tmp_path) == []
