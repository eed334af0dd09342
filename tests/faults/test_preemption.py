"""Spot preemption of train_lora: SIGTERM (with a grace period) and SIGKILL (none) at many points of one
run, a restart after each, and at the end the bitwise same adapter as an uninterrupted run.

    .venv/bin/python -m pytest -m faults tests/faults/test_preemption.py

Steps redone after a kill = the last step the killed process logged minus the step the next process
resumed from: what the kill cost. It must stay within ``checkpoint_every`` (SIGTERM: 0, the trainer
checkpoints before it exits 143). The single-kill cases live in ``tests/test_train_lora.py``; this is
the long series, plus every way the newest checkpoint can be damaged.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
from pathlib import Path

import pytest

from stages.core import checkpoints
from tests.conftest import run_stage_cli
from tests.test_train_lora import TRAIN, complete_steps, reference_adapter, stage_dir, start, train_args

pytestmark = pytest.mark.faults
__all__ = ["reference_adapter"]  # the fixture, imported for use here

CHECKPOINT_EVERY = int(next(a for a in TRAIN if a.startswith("checkpoint_every=")).split("=")[1])
MAX_STEPS = int(next(a for a in TRAIN if a.startswith("max_steps=")).split("=")[1])
GRACE_SECONDS = 30  # what Kubernetes gives a pod between SIGTERM and SIGKILL (terminationGracePeriodSeconds)
STEP = re.compile(r"step (\d+)/\d+ loss")
RESUMED = re.compile(r"resumed from checkpoint at step (\d+)")

# Kill points over the 24 steps: between checkpoints, right on a checkpoint step (the kill lands in the
# middle of its upload), at the first and the last steps.
SERIES = {
    "sigkill-2": (signal.SIGKILL, [5, 16]),
    "sigkill-10": (signal.SIGKILL, [1, 3, 4, 6, 8, 11, 12, 16, 19, 22]),
    "sigterm-10": (signal.SIGTERM, [1, 3, 5, 7, 8, 10, 13, 16, 20, 23]),
}


def kill_at(args: list[str], sig: int, target: int) -> tuple[int | None, int, int, str]:
    """Start train_lora, send ``sig`` once it logged step ``target``: (exit code, resumed from, last step, log)."""
    proc = start(args)
    lines, signalled = [], False
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        lines.append(line)
        if not signalled and (m := STEP.search(line)) and int(m.group(1)) >= target:
            proc.send_signal(sig)
            signalled = True
            break
    # What Kubernetes does once the grace period is over; the rest of the log is read through the same
    # buffered pipe object (communicate() would skip what the line iterator has read ahead).
    deadline = threading.Timer(GRACE_SECONDS, proc.kill)
    deadline.start()
    rest = proc.stderr.read()
    proc.wait()
    deadline.cancel()
    proc.stdout.read()
    log = "".join(lines) + (rest or "")
    resumed = [int(m) for m in RESUMED.findall(log)]
    steps = [int(m) for m in STEP.findall(log)]
    code = proc.returncode if signalled else None
    return code, (resumed[0] if resumed else 0), max(steps, default=0), log


@pytest.mark.parametrize(
    "series", [pytest.param(s, marks=[pytest.mark.slow] if s != "sigkill-2" else []) for s in SERIES]
)
def test_a_series_of_preemptions_loses_no_work_and_ends_with_the_same_adapter(
    finetune_run, reference_adapter, tally, series
):
    sig, targets = SERIES[series]
    kind = f"train_lora {signal.Signals(sig).name} + restart"
    run_id = f"preempt-{series}"
    out = stage_dir(finetune_run, run_id)
    shutil.rmtree(out, ignore_errors=True)
    args = train_args(finetune_run, run_id, "log_every=1")

    pending = None  # (last step logged, newest complete checkpoint, exit code) of the previous kill
    problems = []
    for target in [*targets, None]:
        if target is None:
            proc = run_stage_cli("train_lora", *args, check=False)
            code, log = proc.returncode, proc.stderr
            resumed = int(m.group(1)) if (m := RESUMED.search(log)) else 0
        else:
            code, resumed, last_step, log = kill_at(args, sig, target)
        if pending is not None:
            previous_last, newest, previous_code = pending
            redone = previous_last - resumed
            ok = resumed == newest and 0 <= redone <= CHECKPOINT_EVERY
            if sig == signal.SIGTERM:  # checkpointed within its grace period, nothing redone
                ok = ok and previous_code == 143 and redone == 0
            tally.fault(kind, survived=ok, steps_redone=redone)
            if not ok:
                problems.append(
                    f"kill at step {previous_last} (exit {previous_code}): resumed from {resumed}, "
                    f"newest complete checkpoint was {newest}"
                )
        if target is not None and code == 0:  # the notice came during the last step: it finished and committed
            tally.fault(kind, survived=sig == signal.SIGTERM, steps_redone=0)
            break
        if target is not None:
            assert code is not None, f"finished before step {target}:\n{log[-2000:]}"
            assert not (out / "manifest.json").exists(), "a killed run committed"
            pending = (last_step, max(complete_steps(out), default=0), code)

    assert code == 0, log[-3000:]
    adapter = (out / "adapter/adapter_model.safetensors").read_bytes()
    tally.rows[kind].data_lost += adapter != reference_adapter
    assert not problems, problems
    assert adapter == reference_adapter, "the resumed adapter differs from the uninterrupted one"
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["steps"] == MAX_STEPS


# ---------------------------------------------------------------------------------------------
# A damaged newest checkpoint: found out, and the one before it used.


@pytest.fixture(scope="module")
def two_checkpoints(finetune_run) -> Path:
    """The checkpoints folder of a run killed after its checkpoints at steps 8 and 12 were complete."""
    out = stage_dir(finetune_run, "preempt-damaged")
    shutil.rmtree(out, ignore_errors=True)
    code, _, _, log = kill_at(train_args(finetune_run, "preempt-damaged", "log_every=1"), signal.SIGKILL, 14)
    assert code == -signal.SIGKILL, log[-2000:]
    assert complete_steps(out)[-2:] == [8, 12], complete_steps(out)
    return out / "checkpoints"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-adapter": ("adapter_model.safetensors", truncate),
    "truncated-optimizer": ("optimizer.pt", truncate),
    "truncated-rng": ("rng-rank0.pt", truncate),
    "empty-state": ("state.json", lambda p: p.write_bytes(b"")),
    "flipped-byte-in-scheduler": ("scheduler.pt", flip_a_byte),
    "missing-adapter-config": ("adapter_config.json", Path.unlink),
    "truncated-marker": (checkpoints.MARKER, truncate),
    "missing-marker": (checkpoints.MARKER, Path.unlink),
    "marker-lists-a-path-outside": (
        checkpoints.MARKER,
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "files": {"../../x": "0" * 64}})),
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(two_checkpoints, tmp_path, tally, damage):
    name, spoil = DAMAGE[damage]
    folder = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, folder)
    fingerprint = json.loads((folder / f"step-00000012/{checkpoints.MARKER}").read_text())["fingerprint"]
    spoil(folder / "step-00000012" / name)

    found = checkpoints.newest_complete(f"file://{folder}", fingerprint, tmp_path / "download")

    tally.fault("newest checkpoint damaged", survived=found is not None and found[0] == 8)
    assert found is not None and found[0] == 8
    assert (found[1] / "optimizer.pt").read_bytes() == (folder / "step-00000008/optimizer.pt").read_bytes()


def test_with_every_checkpoint_damaged_training_starts_over(two_checkpoints, tmp_path, tally):
    folder = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, folder)
    fingerprint = json.loads((folder / f"step-00000012/{checkpoints.MARKER}").read_text())["fingerprint"]
    for step in complete_steps(folder.parent):
        truncate(folder / f"step-{step:08d}/adapter_model.safetensors")
    found = checkpoints.newest_complete(f"file://{folder}", fingerprint, tmp_path / "download")
    tally.fault("newest checkpoint damaged", survived=found is None)
    assert found is None


def test_a_checkpoint_of_other_settings_is_never_resumed(two_checkpoints, tmp_path, tally):
    """Same run id, changed hyperparameters: the old checkpoints are not this run's (fingerprint = cache key)."""
    found = checkpoints.newest_complete(f"file://{two_checkpoints}", "another-cache-key", tmp_path / "download")
    tally.fault("newest checkpoint damaged", survived=found is None)
    assert found is None
