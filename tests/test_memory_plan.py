"""The memory plan: its counts, what the plan task refuses, chooses and skips, and its calibration against the
measured peak memory of real LoRA training steps.

    .venv/bin/python -m pytest tests/test_memory_plan.py -q

Calibration (CPU): ``tests/memory_probe.py`` runs one train_lora step of a small random Llama in a fresh
process and reports the peak resident memory the step adds to the loaded model (weights resident, after a
warm-up step). The matching terms of the estimate, for the CPU, are what a step adds: the activations saved
for the backward pass, the larger of the logits/loss and one layer's backward, and the LoRA gradients (the
adapters and AdamW's moments exist before the step). They agree within 20% in every configuration below, in
fp32, in bf16 and with a 4-bit base (within 5% where the logits phase or all layers' activations make the
peak; about +10% where one recomputed layer does). The parameter counts of the weights and the adapters
are checked exactly against transformers models of each family.

Not measured here: the 1-byte CUDA dropout mask (a 4-byte float on CPU), CUDA's SDPA kernels (they save
the same q, k, v, output and log-sum-exp as the CPU flash kernel), the bytes of the weights themselves
(their counts are exact), FSDP sharding and gathering, the CUDA context and the margin: those terms come
from the code and the papers the module docstring cites, not from a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genai_dags import memory_plan, planner, settings
from genai_dags.memory_plan import GIB, Architecture, TrainSettings

ROOT = Path(__file__).resolve().parents[1]

LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
LLAMA3_70B = {
    **LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}

# (id, probe settings): each a different phase or branch of the estimate at the peak.
CALIBRATION = {
    # every layer's activations, then the logits phase
    "fp32-no-checkpointing": dict(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376, vocab=8192,
                                  batch_size=2, seq_len=256, checkpointing=0, dropout=0.05),
    # layer inputs only; the logits phase is the peak
    "fp32-checkpointing-logits": dict(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376, vocab=8192,
                                      batch_size=2, seq_len=512, checkpointing=1, dropout=0.05),
    # layer inputs only; a small vocabulary: the recomputed layer is the peak (GQA, no dropout: shared inputs)
    "fp32-checkpointing-recompute": dict(hidden=768, layers=4, heads=12, kv_heads=4, intermediate=2048, vocab=512,
                                         batch_size=4, seq_len=256, checkpointing=1, dropout=0.0),
    # bf16 weights: fp32 norm inputs, fp32 copies of the adapter inputs, logits upcast for the loss
    "bf16-no-checkpointing": dict(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376, vocab=8192,
                                  batch_size=2, seq_len=256, checkpointing=0, dropout=0.05, bf16=1),
    # bf16 without dropout: one fp32 copy per adapter; GQA
    "bf16-no-dropout-gqa": dict(hidden=768, layers=6, heads=12, kv_heads=4, intermediate=2048, vocab=4096,
                                batch_size=2, seq_len=384, checkpointing=0, dropout=0.0, bf16=1),
    # a 4-bit base with bf16 compute, prepared as QLoRA trains it: the activations flow in fp32
    "nf4-no-checkpointing": dict(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376, vocab=8192,
                                 batch_size=2, seq_len=256, checkpointing=0, dropout=0.05, bf16=1, nf4=1),
}  # fmt: skip
PROBE_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",  # glibc: every block over 64 KiB is mapped, and unmapped when freed
    "MKL_DISABLE_FAST_MM": "1",  # MKL: no buffer cache of its own
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, dict]:
    """Every calibration step and the families' counts, each in a fresh process, all at once."""
    folder = tmp_path_factory.mktemp("memory_probe")
    commands = {"families": ["families"]}
    for name, probe in CALIBRATION.items():
        commands[name] = ["step", str(folder / name), *(f"{k}={v}" for k, v in probe.items())]
    env = {**os.environ, **PROBE_ENV}
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tests.memory_probe", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    results = {}
    for name, proc in running.items():
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"memory probe {name} exited {proc.returncode}\n{err[-4000:]}")
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def cpu_settings(probe: dict) -> TrainSettings:
    train = {
        "batch_size": probe["batch_size"],
        "dropout": probe["dropout"],
        "gradient_checkpointing": "on" if probe["checkpointing"] else "off",
        "precision": "bf16" if probe.get("bf16") else "fp32",
        "quantization": "nf4" if probe.get("nf4") else "none",
    }
    return TrainSettings.from_conf(train, probe["seq_len"], gpus=1, device="cpu")


def probe_architecture(probe: dict) -> Architecture:
    return Architecture.from_config(
        {
            "model_type": "llama",
            "hidden_size": probe["hidden"],
            "intermediate_size": probe["intermediate"],
            "num_hidden_layers": probe["layers"],
            "num_attention_heads": probe["heads"],
            "num_key_value_heads": probe["kv_heads"],
            "vocab_size": probe["vocab"],
            "tie_word_embeddings": False,
        }
    )


# ---------------------------------------------------------------------------------------------
# Calibration


@pytest.mark.parametrize("case", CALIBRATION)
def test_the_estimate_is_within_20_percent_of_the_measured_peak_of_a_lora_step(probes, case):
    measured = probes[case]
    if "error" in measured:
        pytest.skip(measured["error"])
    probe = CALIBRATION[case]
    arch = probe_architecture(probe)
    e = memory_plan.estimate(arch, cpu_settings(probe))
    assert arch.params == measured["parameters"]
    assert e.lora_params == measured["lora_parameters"]
    # What the step adds over the loaded model: the adapters' weights and AdamW's moments exist before it.
    estimated = e.activations + e.transient + 4 * e.lora_params
    ratio = estimated / measured["growth"]
    report = (
        f"{case}: estimate {estimated / 2**20:.1f} MiB (activations {e.activations / 2**20:.1f}, logits "
        f"{e.logits / 2**20:.1f}, layer backward {e.layer_backward / 2**20:.1f}), measured "
        f"{measured['growth'] / 2**20:.1f} MiB, ratio {ratio:.3f}"
    )
    print(report)
    assert 0.8 <= ratio <= 1.2, report


def test_parameter_counts_match_the_transformers_models_of_each_family(probes):
    """Exact for Llama, Mistral and Phi-3; Qwen2's attention biases and Gemma 2's extra norms are not counted."""
    for name, found in probes["families"].items():
        if name in ("gpt2", "qwen2_moe"):
            with pytest.raises(memory_plan.UnsupportedModel):
                Architecture.from_config(found["config"])
            continue
        arch = Architecture.from_config(found["config"])
        assert arch.params == pytest.approx(found["parameters"], rel=0.01), name
        if name in ("llama", "mistral", "phi3"):
            assert arch.params == found["parameters"], name
        rank = memory_plan.TRAIN_DEFAULTS["rank"]
        lora = arch.layers * sum(rank * (lin.inputs + lin.outputs) for lin in arch.linears)
        assert lora == found["lora_parameters"], name


def test_llama_3_8b_has_its_published_parameter_counts():
    arch = Architecture.from_config(LLAMA3_8B)
    assert arch.params == 8_030_261_248
    e = memory_plan.estimate(arch, TrainSettings.from_conf({}, 2048, gpus=1))
    assert e.lora_params == 20_971_520  # r=8 on the seven projections of 32 layers, as PEFT reports it


def test_the_defaults_it_reads_are_the_stages_own():
    from stages.tokenize import TokenizeConfig
    from stages.train_lora import TrainLoraConfig

    fields = TrainLoraConfig.__dataclass_fields__
    for name, value in memory_plan.TRAIN_DEFAULTS.items():
        field = fields[name]
        default = field.default_factory() if callable(field.default_factory) else field.default
        assert default == value, name
    assert TokenizeConfig.__dataclass_fields__["block_size"].default == memory_plan.BLOCK_SIZE_DEFAULT


# ---------------------------------------------------------------------------------------------
# The estimate's shape


def test_checkpointing_keeps_layer_inputs_and_4_bit_shrinks_the_linear_weights():
    arch = Architecture.from_config(LLAMA3_8B)
    full = memory_plan.estimate(arch, TrainSettings.from_conf({"gradient_checkpointing": "off"}, 2048, gpus=1))
    kept = memory_plan.estimate(arch, TrainSettings.from_conf({"gradient_checkpointing": "on"}, 2048, gpus=1))
    nf4 = memory_plan.estimate(arch, TrainSettings.from_conf({"quantization": "nf4"}, 2048, gpus=1))
    assert kept.activations == 8 * 2048 * (32 * 4096 * 2 + 4 * 4096)  # bf16 layer inputs + the final norm's
    assert full.activations > 20 * kept.activations
    assert kept.logits == 12 * 8 * 2048 * 128256  # three fp32 copies
    # 6.98B linear weights at 0.516 bytes, the embeddings, head and norms (1.05B) in fp32 as QLoRA prepares them
    assert nf4.weights / GIB == pytest.approx((6_979_321_856 * memory_plan.NF4_BYTES + 1_050_939_392 * 4) / GIB)
    assert nf4.weights < 0.5 * kept.weights


def test_fsdp_shards_the_weights_and_adapters_over_the_processes():
    arch = Architecture.from_config(LLAMA3_70B)
    ddp = memory_plan.estimate(arch, TrainSettings.from_conf({"strategy": "ddp"}, 2048, gpus=8))
    fsdp = memory_plan.estimate(arch, TrainSettings.from_conf({"strategy": "fsdp"}, 2048, gpus=8))
    assert ddp.weights / GIB == pytest.approx(131.4, abs=0.1)  # 70.55B x 2 bytes
    assert fsdp.weights < ddp.weights / 8 + 8 * GIB  # a shard, the root unit and two layers gathered
    assert fsdp.lora == pytest.approx(ddp.lora * 16 / 20 / 8)  # no DDP buckets, sharded


# ---------------------------------------------------------------------------------------------
# The plan task: refusals, the fsdp choice, skips


def cluster(tmp_path: Path, gib: float | None = 22, gpus: int = 1, on_demand_gib: float | None = None):
    """Kubernetes settings with GPU pools of ``gib`` and the base models below in the catalog."""
    models = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "moe": {**LLAMA3_8B, "num_local_experts": 8}}
    for name, config in models.items():
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    catalog = {name: f"file://{tmp_path / name}" for name in models}
    catalog |= {"hub": "meta-llama/Llama-3.1-8B", "missing": f"file://{tmp_path}/missing"}
    spot = {"node_selector": {"pool": "spot"}, "gpu_memory_gib": gib}
    on_demand = {"node_selector": {"pool": "on-demand"}, "gpu_memory_gib": on_demand_gib or gib}
    data = {
        "runtime": "kubernetes",
        "artifact_root": "gs://bucket/genai",
        "allowed_uri_schemes": ["gs"],
        "base_models": catalog,
        "stages": {"train_lora": {"gpu": gpus}},
        "kubernetes": {"node_pools": {"gpu-spot": spot, "gpu-on-demand": on_demand}},
    }
    return settings.parse(data, "test")


def conf(base_model: str, train: dict | None = None, block_size: int | None = None) -> dict:
    """A resolved run conf, as the plan task holds it."""
    return {
        "model_name": "folio",
        "base_model": base_model,
        "train_data_uri": "gs://bucket/data",
        "prompts_uri": "gs://bucket/prompts.jsonl",
        "run_id": "r1",
        "version": None,
        "tokenize": {} if block_size is None else {"block_size": block_size},
        "train": train or {},
        "evaluate": {},
        "inference": {},
    }


def test_a_run_that_cannot_fit_fails_the_plan_with_its_numbers_and_what_would_fit(tmp_path):
    s = cluster(tmp_path, gib=22)
    bad = conf("llama3-8b", {"batch_size": 4, "gradient_checkpointing": "off"}, block_size=2048)
    with pytest.raises(planner.PlanError) as refused:
        planner.train_memory_plan(bad, s)
    message = str(refused.value)
    print(message)
    lines = message.splitlines()
    assert lines[0].startswith("train_lora needs about 120.7 GiB per GPU, more than the 22 GiB of a GPU in node pool")
    assert "kubernetes.node_pools.gpu-spot.gpu_memory_gib" in lines[0]
    for term in ("base weights: 8.03B parameters, bf16", "activations: 32 layers x", "logits and loss", "margin"):
        assert any(term in line for line in lines), term
    tried = lines[lines.index("What would fit (changes to the run conf, tried in this order):") + 1 :]
    assert tried == [
        "  train.gradient_checkpointing=on would need 33.2 GiB: still too much",
        "  train.gradient_checkpointing=on train.quantization=nf4 would need 26.9 GiB: still too much",
        "  train.gradient_checkpointing=on train.quantization=nf4 train.batch_size=2 train.grad_accum_steps=2 "
        "would need 18.2 GiB: fits",
    ]


def test_the_smaller_gpu_of_the_two_pools_counts_the_last_retry_runs_on_on_demand(tmp_path):
    s = cluster(tmp_path, gib=79, on_demand_gib=22)
    with pytest.raises(planner.PlanError, match=r"more than the 22 GiB of a GPU in node pool gpu-on-demand"):
        planner.train_memory_plan(conf("llama3-8b", {"batch_size": 16}, block_size=2048), s)


def test_suggestions_try_checkpointing_then_4_bit_or_fsdp_then_smaller_micro_batches(tmp_path):
    """nf4 and fsdp are alternatives (train_lora refuses the two together); the micro-batches shrink on the
    better of them, with more accumulation steps for the same blocks per step (a fourth of them per GPU)."""
    s = cluster(tmp_path, gib=22, gpus=4)
    train = {"batch_size": 16, "gradient_checkpointing": "off", "strategy": "ddp"}
    with pytest.raises(planner.PlanError) as refused:
        planner.train_memory_plan(conf("llama3-8b", train, block_size=4096), s)
    message = str(refused.value)
    assert "batch_size=16 (4 per forward pass on each GPU)" in message
    tried = [line.split(" would need")[0].strip() for line in message.splitlines() if "would need" in line]
    assert tried == [
        "train.gradient_checkpointing=on",
        "train.gradient_checkpointing=on train.quantization=nf4",
        "train.gradient_checkpointing=on train.strategy=fsdp",
        "train.gradient_checkpointing=on train.strategy=fsdp train.batch_size=2 train.grad_accum_steps=8",
        "train.gradient_checkpointing=on train.strategy=fsdp train.batch_size=1 train.grad_accum_steps=16",
    ]


def test_the_processes_of_a_pod_share_each_steps_blocks(tmp_path):
    arch = Architecture.from_config(LLAMA3_8B)
    one = memory_plan.estimate(arch, TrainSettings.from_conf({"batch_size": 8}, 2048, gpus=1))
    eight = memory_plan.estimate(arch, TrainSettings.from_conf({"batch_size": 8}, 2048, gpus=8))
    accumulated = TrainSettings.from_conf({"batch_size": 8, "grad_accum_steps": 4}, 2048, gpus=8)
    assert eight.settings.micro_batch == 1 and accumulated.micro_batch == 4
    assert eight.logits == one.logits / 8 and eight.activations == one.activations / 8


def test_a_4_bit_base_is_never_sharded(tmp_path):
    s = cluster(tmp_path, gib=22, gpus=8)
    with pytest.raises(planner.PlanError) as refused:
        planner.train_memory_plan(conf("llama3-70b", {"quantization": "nf4", "batch_size": 8}, block_size=2048), s)
    message = str(refused.value)
    assert "8 GPUs per pod, ddp" in message  # strategy=auto did not take fsdp
    assert "train.quantization=none train.strategy=fsdp would need" in message


def test_nothing_that_fits_says_what_else_would(tmp_path):
    s = cluster(tmp_path, gib=22)
    with pytest.raises(planner.PlanError, match="nothing a run conf sets makes it fit one GPU of 22 GiB"):
        planner.train_memory_plan(conf("llama3-70b", {}, block_size=2048), s)


def test_strategy_auto_takes_fsdp_where_ddp_does_not_fit_and_says_so(tmp_path):
    s = cluster(tmp_path, gib=79, gpus=8)
    run = conf("llama3-70b", {"batch_size": 1, "strategy": "auto"}, block_size=2048)
    memory, note = planner.train_memory_plan(run, s)
    assert memory is not None and memory.chose_fsdp and memory.fits
    assert "strategy=auto: ddp would need 153.8 GiB per GPU, more than 79 GiB; train_lora runs with" in note
    assert "strategy=fsdp (the base sharded over 8 GPUs)" in note
    args = planner.finetune_plan(run, s, {}, memory)["train_lora"]
    assert args[-1] == "strategy=fsdp" and "strategy=auto" not in args
    # Given explicitly, ddp stays ddp: the plan refuses it.
    with pytest.raises(planner.PlanError, match=r"8 GPUs per pod, ddp"):
        planner.train_memory_plan(conf("llama3-70b", {"batch_size": 1, "strategy": "ddp"}, block_size=2048), s)


def test_a_run_that_fits_logs_the_table_and_keeps_its_arguments(tmp_path):
    s = cluster(tmp_path, gib=79)
    run = conf("llama3-8b", {"batch_size": 8}, block_size=2048)
    memory, note = planner.train_memory_plan(run, s)
    assert memory is not None and not memory.chose_fsdp
    assert "48.4 GiB per GPU: fits the 79 GiB GPUs of gpu-spot" in note
    assert "logits and loss: 3 fp32 copies of 8 x 2048 tokens x 128256 vocab" in note
    assert planner.finetune_plan(run, s, {}, memory) == planner.finetune_plan(run, s, {})


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("local", "the local runtime has no node pools"),
        ("no-gpu-memory", "no kubernetes.node_pools.<pool>.gpu_memory_gib"),
        ("no-gpu", "train_lora runs without a GPU"),
        ("hub", "base_model='meta-llama/Llama-3.1-8B' is a hub id"),
        ("missing", "/missing/config.json"),
        ("moe", "is a mixture of experts"),
    ],
)
def test_where_there_is_nothing_to_check_the_plan_says_why_in_one_line(tmp_path, case, reason):
    s = {
        "local": settings.parse({"artifact_root": str(tmp_path)}, "test"),
        "no-gpu-memory": cluster(tmp_path, gib=None),
        "no-gpu": cluster(tmp_path, gpus=0),
    }.get(case) or cluster(tmp_path)
    base_model = case if case in ("hub", "missing", "moe") else "llama3-70b"
    memory, note = planner.train_memory_plan(conf(base_model, {"batch_size": 64}), s)
    assert memory is None
    assert note.startswith("memory plan skipped: ") and reason in note and "\n" not in note


def test_the_shipped_gpu_pools_name_their_gpu_memory():
    for cloud in ("gke", "eks", "aks"):
        pools = settings.load_file(ROOT / f"values/{cloud}/pipeline.yaml").kubernetes.node_pools
        assert pools["gpu-spot"].gpu_memory_gib == pools["gpu-on-demand"].gpu_memory_gib == 22, cloud
        assert pools["cpu"].gpu_memory_gib is None


def test_the_command_line_prints_the_plan_or_the_refusal(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA3_8B))
    assert memory_plan.main([str(config), "batch_size=8", "block_size=2048", "gpu_memory_gib=79"]) == 0
    assert "fits the 79 GiB GPUs" in capsys.readouterr().out
    assert memory_plan.main([str(config), "block_size=2048", "gradient_checkpointing=off", "gpu_memory_gib=22"]) == 1
    assert "What would fit" in capsys.readouterr().out
