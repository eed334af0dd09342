"""train_lora: a loadable PEFT adapter, and preemption that loses no work (real SIGTERM / SIGKILL)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_stage_cli

TRAIN = ["max_steps=24", "checkpoint_every=4", "learning_rate=2e-3", "batch_size=4", "log_every=4"]


def common(run_id: str, run: dict) -> list[str]:
    """The arguments of a train_lora run on the session's tokenized data."""
    root = run["artifact_root"]
    return [f"artifact_root={root}", f"run_id={run_id}", f"base_model={run['base_model']}",
            f"dataset_uri={root}/runs/ft/tokenize"]  # fmt: skip


def train_args(run: dict, run_id: str, *extra: str) -> list[str]:
    return [*common(run_id, run), *TRAIN, *extra]


def stage_dir(run: dict, run_id: str) -> Path:
    return Path(run["artifact_root"]) / "runs" / run_id / "train_lora"


def complete_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoints/step-*/COMPLETE.json"))


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train_lora", *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, at_least: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(s >= at_least for s in complete_steps(out)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint >= {at_least} appeared (exit {proc.poll()})")


@pytest.fixture(scope="module")
def reference_adapter(finetune_run) -> bytes:
    """The adapter of an uninterrupted run with the same seed and config."""
    run_stage_cli("train_lora", *train_args(finetune_run, "resume-reference"))
    return (stage_dir(finetune_run, "resume-reference") / "adapter/adapter_model.safetensors").read_bytes()


def test_adapter_loads_with_plain_peft_and_changes_the_model(finetune_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = Path(finetune_run["artifact_root"]) / "runs/ft/train_lora"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    base_path = finetune_run["base_model"].removeprefix("file://")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    before = base(ids).logits
    adapted = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert not torch.allclose(adapted(ids).logits, before)
    # The adapter alone names a base that from_pretrained can open (it recorded the file:// URI before).
    from peft import AutoPeftModelForCausalLM

    reopened = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter"))
    assert torch.equal(reopened(ids).logits, adapted(ids).logits)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 41))
    assert not (out / "checkpoints").exists(), "checkpoints are removed once the adapter is committed"


def test_rerun_is_a_cache_hit(finetune_run):
    args = [f"{k}={v}" for k, v in finetune_run.items()]
    proc = run_stage_cli("train_lora", *args, "max_steps=40", "learning_rate=2e-3", "checkpoint_every=20")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["cache_hit"] is True
    assert "cache hit" in proc.stderr


@pytest.mark.integration
def test_sigkill_then_restart_gives_the_bitwise_same_adapter(finetune_run, reference_adapter):
    out = stage_dir(finetune_run, "resume-sigkill")
    proc = start(train_args(finetune_run, "resume-sigkill"))
    wait_for_checkpoint(out, proc, at_least=8)
    proc.send_signal(signal.SIGKILL)  # no grace: whatever was mid-upload stays half-written
    proc.wait()
    assert not (out / "manifest.json").exists()
    killed_at = max(complete_steps(out))
    rerun = run_stage_cli("train_lora", *train_args(finetune_run, "resume-sigkill"))
    assert f"resumed from checkpoint at step {killed_at}" in rerun.stderr
    assert (out / "adapter/adapter_model.safetensors").read_bytes() == reference_adapter


@pytest.mark.integration
def test_sigterm_checkpoints_exits_143_and_resumes(finetune_run, reference_adapter):
    out = stage_dir(finetune_run, "resume-sigterm")
    proc = start(train_args(finetune_run, "resume-sigterm"))
    wait_for_checkpoint(out, proc, at_least=4)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM received" in stderr
    stopped_at = max(complete_steps(out))
    assert f"stopped at step {stopped_at}" in stderr
    rerun = run_stage_cli("train_lora", *train_args(finetune_run, "resume-sigterm"))
    assert f"resumed from checkpoint at step {stopped_at}" in rerun.stderr
    assert (out / "adapter/adapter_model.safetensors").read_bytes() == reference_adapter
    # The whole adapter, its config too: PEFT's set of target modules is written in one order.
    reference_config = stage_dir(finetune_run, "resume-reference") / "adapter/adapter_config.json"
    assert (out / "adapter/adapter_config.json").read_bytes() == reference_config.read_bytes()


@pytest.mark.integration
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(finetune_run, reference_adapter):
    out = stage_dir(finetune_run, "resume-corrupt")
    proc = start(train_args(finetune_run, "resume-corrupt"))
    wait_for_checkpoint(out, proc, at_least=12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest, previous = complete_steps(out)[-1], complete_steps(out)[-2]
    weights = out / f"checkpoints/step-{newest:08d}/optimizer.pt"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated object
    rerun = run_stage_cli("train_lora", *train_args(finetune_run, "resume-corrupt"))
    assert f"step-{newest:08d} is corrupt" in rerun.stderr
    assert f"resumed from checkpoint at step {previous}" in rerun.stderr
    assert (out / "adapter/adapter_model.safetensors").read_bytes() == reference_adapter


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rank=0", "rank=0 must be in [1, 1024]"),
        ("learning_rate=-0.001", "learning_rate=-0.001 must be in (0, 1]"),
        ("target_modules=q_proj,attn_c", "includes ['attn_c'], which the base model does not have"),
        ("precision=fp16", "precision='fp16' is not one of"),
        ("batch_size=eight", "batch_size='eight' must be an integer"),
        ("lora_rank=8", "unknown config key 'lora_rank'"),
    ],
)
def test_bad_config_exits_2_without_traceback(finetune_run, override, message, capsys):
    from stages import train_lora

    assert train_lora.main([*train_args(finetune_run, "bad-config"), override]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr
    assert "Traceback" not in stderr
    assert not (stage_dir(finetune_run, "bad-config") / "manifest.json").exists()


def test_missing_dataset_is_a_user_error(finetune_run):
    proc = run_stage_cli(
        "train_lora",
        *train_args(finetune_run, "no-data"),
        f"dataset_uri={finetune_run['artifact_root']}/runs/nothing/tokenize",
        check=False,
    )
    assert proc.returncode == 2
    assert "dataset_uri=" in proc.stderr and "does not exist" in proc.stderr


def test_gradient_checkpointing_changes_memory_not_the_adapter(finetune_run, capsys):
    """Activations recomputed in the backward pass (dropout's RNG replayed): bitwise the same adapter."""
    from stages import train_lora

    def train(run_id: str, checkpointing: str) -> dict:
        args = [*common(run_id, finetune_run), "max_steps=3", "batch_size=4", f"gradient_checkpointing={checkpointing}"]
        assert train_lora.main(args) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]

    assert train("gc-on", "on")["gradient_checkpointing"] is True
    assert train("gc-off", "off")["gradient_checkpointing"] is False
    on, off = (stage_dir(finetune_run, r) / "adapter/adapter_model.safetensors" for r in ("gc-on", "gc-off"))
    assert on.read_bytes() == off.read_bytes()


def test_flash_attention_is_refused_where_it_cannot_run(finetune_run, capsys):
    from stages import train_lora

    args = [*common("fa2", finetune_run), "attn_implementation=flash_attention_2", "device=cpu"]
    assert train_lora.main(args) == 2
    err = capsys.readouterr().err
    assert "error: train_lora: attn_implementation=flash_attention_2 cannot run here (no CUDA GPU): use sdpa" in err
