"""SIGKILL every stage but train_lora in the middle of a write, then rerun it: nothing half-written is
ever taken as committed, and the rerun completes with outputs that match their manifest and removes
the temp file of the atomic write that was cut short (``.<name>.tmp-*`` on local disk).

Each stage runs through ``die_at_write.py`` (the real stage, its store writes counted), which kills it
in its first write, in a middle one and in its last one (``manifest.json``, the commit itself) and
leaves that write torn. train_lora's kills are in ``test_preemption.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core import manifest
from tests.conftest import ROOT, run_stage_cli
from tests.faults.conftest import lost_outputs, tree_hashes

pytestmark = pytest.mark.faults
WRAPPER = Path(__file__).with_name("die_at_write.py")


def run_dying(stage: str, kill_at: int, args: list[str], record: Path) -> subprocess.CompletedProcess:
    record.unlink(missing_ok=True)
    return subprocess.run(
        [sys.executable, str(WRAPPER), stage, str(kill_at), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "FAULT_RECORD": str(record), "PYTHONPATH": str(ROOT)},
        timeout=600,
    )


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    lines = (ROOT / "examples/prompts/folio-prompts.jsonl").read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("kill-prompts") / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


EVALUATE = ["max_eval_docs=16", "num_samples=1", "sample_max_new_tokens=4", "min_relative_improvement=-1"]


def common_args(finetune_run) -> tuple[str, list[str], list[str]]:
    root = finetune_run["artifact_root"]
    return (
        root,
        [f"artifact_root={root}", f"base_model={finetune_run['base_model']}"],
        [f"adapter_uri={root}/runs/ft/train_lora"],
    )


@pytest.fixture(scope="module")
def upstream(finetune_run, prompts) -> str:
    """evaluate and two batch_infer shards, committed once: the inputs of publish and merge_predictions."""
    root, common, adapter = common_args(finetune_run)
    run_stage_cli(
        "evaluate", *common, "run_id=kill-upstream", f"dataset_uri={root}/runs/ft/tokenize", *adapter, *EVALUATE
    )
    for shard in (0, 1):
        run_stage_cli(
            "batch_infer",
            *common,
            "run_id=kill-upstream",
            *adapter,
            f"prompts_uri={prompts}",
            "max_new_tokens=6",
            f"shard_index={shard}",
            "num_shards=2",
        )
    return f"{root}/runs/kill-upstream"


@pytest.fixture
def stage_args(request, finetune_run, folio_corpus, base_corpus, prompts):
    """The arguments of each stage for a given run id, upstream outputs taken from the session's run."""
    root, common, adapter = common_args(finetune_run)
    ft = f"{root}/runs/ft"
    evaluate = EVALUATE
    infer = [*adapter, f"prompts_uri={prompts}", "max_new_tokens=6"]
    needs_upstream = request.node.callspec.params["stage"] in ("publish", "merge_predictions")
    upstream = request.getfixturevalue("upstream") if needs_upstream else ""
    return {
        "tokenize": lambda run_id: [*common, f"run_id={run_id}", f"input_uri={folio_corpus}", "min_chars=20"],
        "evaluate": lambda run_id: [*common, f"run_id={run_id}", f"dataset_uri={ft}/tokenize", *adapter, *evaluate],
        "batch_infer": lambda run_id: [*common, f"run_id={run_id}", *infer],
        "publish": lambda run_id: [
            f"artifact_root={root}",
            f"run_id={run_id}",
            "model_name=killed",
            f"version={run_id}",
            *adapter,
            f"evaluation_uri={upstream}/evaluate",
            "predictions_uri=none",
        ],
        "merge_predictions": lambda run_id: [
            f"artifact_root={root}",
            f"run_id={run_id}",
            f"predictions_uri={upstream}/batch_infer",
            "num_shards=2",
        ],
        "base_model": lambda run_id: [
            f"artifact_root={root}",
            f"run_id={run_id}",
            f"corpus_uri={base_corpus}",
            "vocab_size=300",
            "hidden_size=32",
            "num_layers=1",
            "num_heads=2",
            "context_length=32",
            "seq_len=32",
            "steps=3",
            "batch_size=2",
        ],
    }


def output_dir(root: str, stage: str, run_id: str) -> Path:
    if stage == "publish":
        return Path(root) / "models" / "killed" / run_id
    return Path(root) / "runs" / run_id / stage


FAST = {"tokenize"}


@pytest.mark.parametrize(
    "stage",
    [
        pytest.param(s, marks=[] if s in FAST else [pytest.mark.slow])
        for s in ["tokenize", "evaluate", "batch_infer", "publish", "merge_predictions", "base_model"]
    ],
)
def test_a_stage_killed_mid_write_commits_nothing_and_its_rerun_completes(
    finetune_run, stage_args, tmp_path, tally, stage
):
    root = finetune_run["artifact_root"]
    record = tmp_path / "record.json"
    counted = run_dying(stage, 0, stage_args[stage](f"kill-{stage}-count"), record)
    assert counted.returncode == 0, counted.stderr[-3000:]
    writes = json.loads(record.read_text())["writes"]
    reference = json.loads((output_dir(root, stage, f"kill-{stage}-count") / "manifest.json").read_text())

    problems = []
    for kill_at in sorted({1, (writes + 1) // 2, writes}):
        run_id = f"kill-{stage}-at-{kill_at}"
        out = output_dir(root, stage, run_id)
        killed = run_dying(stage, kill_at, stage_args[stage](run_id), record)
        torn = json.loads(record.read_text()) if record.exists() else {}
        not_committed = killed.returncode == -9 and manifest.read(f"file://{out}") is None
        rerun = run_stage_cli(stage, *stage_args[stage](run_id), check=False)
        result = json.loads(rerun.stdout.strip().splitlines()[-1]) if rerun.returncode == 0 else {}
        files = tree_hashes(out)
        committed = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
        torn_rel = torn.get("uri", "").removeprefix(f"file://{out}/")
        ok = (
            not_committed
            and rerun.returncode == 0
            and result.get("cache_hit") is False
            and set(committed.get("outputs", {})) == set(reference["outputs"])
            and files.get(torn_rel) != torn.get("sha256")  # the torn bytes were replaced, not committed
            and not [rel for rel in committed.get("outputs", {}) if "/." in f"/{rel}"]  # no temp file committed
            and not list(out.glob("**/.*.tmp-*"))  # nor left behind
        )
        data_lost = lost_outputs(out)
        tally.fault("other stages: SIGKILL mid-write + rerun", survived=ok, data_lost=data_lost)
        if not ok or data_lost:
            problems.append(
                f"kill in write {kill_at}/{writes} ({torn.get('uri')}): exit {killed.returncode}, "
                f"committed while killed: {not not_committed}, rerun exit {rerun.returncode} "
                f"{rerun.stderr[-1500:] if rerun.returncode else ''}, files {sorted(files)}"
            )
    assert not problems, "\n".join(problems)
