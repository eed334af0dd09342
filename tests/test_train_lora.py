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


# ---- Several processes (one per GPU in a pod; two gloo ranks on CPU here) ----------------------------

# No dropout: one process and two draw different dropout masks (each rank has its own stream); without it the
# math is the same. The global batch is batch_size x grad_accum_steps whatever the number of processes.
RANKS = ["max_steps=16", "checkpoint_every=4", "learning_rate=2e-3", "batch_size=2", "grad_accum_steps=2", "dropout=0"]
# Two ranks sum the same two micro-batch gradients one process accumulates; measured: equal to the last bit.
RANKS_TOLERANCE = 1e-6


def ranks_args(run: dict, run_id: str, *extra: str) -> list[str]:
    return [*common(run_id, run), *RANKS, *extra]


def adapter_tensors(run: dict, run_id: str) -> dict:
    from safetensors.torch import load_file

    return load_file(stage_dir(run, run_id) / "adapter/adapter_model.safetensors")


def assert_same_adapter(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= RANKS_TOLERANCE, f"adapters differ by {worst}"


@pytest.fixture(scope="module")
def one_process_adapter(finetune_run) -> dict:
    run_stage_cli("train_lora", *ranks_args(finetune_run, "ranks-1"), "processes=1")
    return adapter_tensors(finetune_run, "ranks-1")


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_the_adapter_one_process_does(finetune_run, one_process_adapter, strategy):
    run_id = f"ranks-2-{strategy}"
    proc = run_stage_cli("train_lora", *ranks_args(finetune_run, run_id), "processes=2", f"strategy={strategy}")
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])["metrics"]
    assert (metrics["processes"], metrics["strategy"]) == (2, strategy)
    assert "train_lora rank 1]" in proc.stderr  # the second rank really trained
    assert_same_adapter(adapter_tensors(finetune_run, run_id), one_process_adapter)


def child_pids(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.integration
def test_two_processes_sigterm_stop_together_and_resume(finetune_run, one_process_adapter):
    out = stage_dir(finetune_run, "ranks-sigterm")
    proc = start([*ranks_args(finetune_run, "ranks-sigterm"), "processes=2"])
    wait_for_checkpoint(out, proc, at_least=4)
    proc.send_signal(signal.SIGTERM)  # the stage process alone, as a local run gets it: it passes it on
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    stopped_at = max(complete_steps(out))
    assert f"stopped at step {stopped_at}" in stderr
    # Each rank's RNG state is part of the checkpoint.
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in (out / f"checkpoints/step-{stopped_at:08d}").iterdir()}
    rerun = run_stage_cli("train_lora", *ranks_args(finetune_run, "ranks-sigterm"), "processes=2")
    assert f"resumed from checkpoint at step {stopped_at}" in rerun.stderr
    assert_same_adapter(adapter_tensors(finetune_run, "ranks-sigterm"), one_process_adapter)


@pytest.mark.integration
def test_two_processes_sigkill_leave_no_rank_behind_and_resume_on_one(finetune_run, one_process_adapter):
    out = stage_dir(finetune_run, "ranks-sigkill")
    proc = start([*ranks_args(finetune_run, "ranks-sigkill"), "processes=2"])
    wait_for_checkpoint(out, proc, at_least=8)
    ranks = child_pids(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ranks):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks), "training ranks outlived the stage"
    killed_at = max(complete_steps(out))
    # Resuming on another number of processes: the checkpoint holds the full LoRA state.
    rerun = run_stage_cli("train_lora", *ranks_args(finetune_run, "ranks-sigkill"), "processes=1")
    assert f"resumed from checkpoint at step {killed_at}" in rerun.stderr
    assert_same_adapter(adapter_tensors(finetune_run, "ranks-sigkill"), one_process_adapter)


@pytest.mark.integration
def test_sigterm_while_the_ranks_start_is_a_preemption(finetune_run):
    """Whether a rank had its handler yet or died of the signal, the stage exits 143 (retry), not 1."""
    proc = start([*ranks_args(finetune_run, "ranks-early-sigterm"), "processes=2"])
    deadline = time.time() + 60
    while time.time() < deadline and len(child_pids(proc.pid)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr


# ---- QLoRA: the base in 4-bit NF4 (bitsandbytes' CPU backend here) -------------------------------------


def test_qlora_trains_an_adapter_that_loads_with_plain_peft(finetune_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc = run_stage_cli("train_lora", *common("qlora", finetune_run), "max_steps=4", "quantization=nf4")
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])["metrics"]
    assert metrics["quantization"] == "nf4"
    assert metrics["final_loss"] < metrics["first_loss"]
    # The adapter is plain LoRA: it loads on the unquantized base and changes its output.
    base = AutoModelForCausalLM.from_pretrained(finetune_run["base_model"].removeprefix("file://"))
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    before = base(ids).logits
    adapted = PeftModel.from_pretrained(base, str(stage_dir(finetune_run, "qlora") / "adapter"))
    assert not torch.allclose(adapted(ids).logits, before)


def test_qlora_without_bitsandbytes_is_refused_before_loading(finetune_run, capsys, monkeypatch):
    from stages import train_lora

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an image without it
    assert train_lora.main([*common("no-bnb", finetune_run), "quantization=nf4"]) == 2
    err = capsys.readouterr().err
    assert "quantization=nf4 needs the bitsandbytes package, which this image does not have" in err
    assert "Traceback" not in err


def test_qlora_with_fsdp_is_refused(finetune_run, capsys):
    from stages import train_lora

    assert train_lora.main([*common("nf4-fsdp", finetune_run), "quantization=nf4", "strategy=fsdp"]) == 2
    assert "quantization=nf4 with strategy=fsdp is not supported" in capsys.readouterr().err
