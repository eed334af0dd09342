"""GPU benchmark: LoRA training throughput and MFU, and batch-inference tokens/s vs per-prompt generate.

    python bench/gpu_lora_mfu.py                       # on an H100 / H200 (about 3 minutes)
    python bench/gpu_lora_mfu.py --seq 1024 --batch 16  # other shapes; --help lists them
    python bench/gpu_lora_mfu.py --smoke               # toy size on CPU: proves the script runs

Needs only torch, transformers and peft (plus numpy, fsspec, PyYAML, which transformers brings): no
model hub, no data set. The model is Llama-style, built from a config with random weights (throughput
does not depend on what the weights learned): by default 16 layers x 2048, grouped-query attention
(16 query / 8 key-value heads), MLP 5632, vocabulary 32000, untied head: about 0.85B parameters.

Training runs the same steps as ``stages.train_lora`` (its ``wrap_with_lora``: LoRA r=16 on every
linear projection; bf16 weights as ``precision=auto`` picks on a GPU, PEFT's fp32 adapter weights;
AdamW; gradient clipping) on fixed-length blocks of random tokens (packed data has no padding), SDPA
attention, once without activation checkpointing and once with it (``gradient_checkpointing=auto`` on a
GPU: non-reentrant, the forward pass recomputed in the backward, which MFU does not count as useful
work). MFU counts, per trained token,

    4 x (parameters of every matmul: all linear layers and the output head, not the embedding lookup)
        (frozen weights: forward 2, gradient w.r.t. activations 2; no weight gradients)
  + 6 x (LoRA parameters)                 (trainable: forward 2, both gradients 4)
  + 6 x layers x seq x hidden              (causal attention: QK^T and PV, forward 2 x 2 x seq x hidden / 2
                                            for the causal half, backward twice the forward)

against the card's dense bf16 peak (989 TFLOP/s for H100 SXM and H200; --peak-tflops overrides).
The full-square attention count (PaLM's 12 x layers x seq x hidden) is reported too.

Each training run also reports the memory plan's estimate (``dags/genai_dags/memory_plan.py``, what the
``plan`` task checks before scheduling) against ``torch.cuda.max_memory_allocated``: the plan's peak
without its fixed CUDA-context term and margin, which the allocator does not see, is the comparable
figure. A third run trains QLoRA (the base in 4-bit NF4, with checkpointing) when bitsandbytes imports.

Batch inference: ``stages.core.generation.generate_completions`` (length-sorted, left-padded batches of 64,
``torch.inference_mode``) on the trained model with the adapter merged, vs ``model.generate`` per
prompt on the PEFT model as trained (the per-prompt loop runs a subset of the prompts: its rate per
token does not depend on how many). Greedy; outputs of the subset are compared.

Writes the results as JSON to stdout and to ``$OUT/gpu_lora_mfu.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages package, run from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dags"))  # the memory plan

import torch

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy model on CPU in fp32: checks the script, not the speed")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048, help="training sequence length (1024-2048 for the target)")
    p.add_argument("--batch", type=int, default=8, help="sequences per training step")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--steps", type=int, default=15, help="timed training steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first (adds compile time)")
    p.add_argument("--prompts", type=int, default=256, help="prompts for batch inference")
    p.add_argument("--loop-prompts", type=int, default=16, help="of which the per-prompt loop runs")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--infer-batch", type=int, default=64)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak; 0 picks by the card's name")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab = 64, 2, 4, 2, 172, 512
        args.seq, args.batch, args.rank, args.warmup, args.steps = 64, 2, 4, 1, 2
        args.prompts, args.loop_prompts, args.new_tokens, args.infer_batch = 8, 3, 4, 4
    return args


def build_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 4096),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def build_tokenizer(vocab: int):
    """A word-level tokenizer over the model's vocabulary: generate_completions pads with it."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")


def flops_per_token(model, args: argparse.Namespace) -> dict[str, float]:
    linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n
    )
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    causal_attention = 6 * args.layers * args.seq * args.hidden
    return {
        "matmul_parameters": linear,
        "lora_parameters": lora,
        "counted": 4 * linear + 6 * lora + causal_attention,
        "full_square_attention": 4 * linear + 6 * lora + 2 * causal_attention,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_qlora_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, folder: Path):
    """The same model saved, then loaded with its linear layers in 4-bit as train_lora loads it."""
    from peft import prepare_model_for_kbit_training

    from stages.core import models

    build_model(args, dtype, torch.device("cpu")).save_pretrained(folder)
    model = models.load_model(str(folder), dtype, device, "sdpa", quantization="nf4")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def planned(model, args: argparse.Namespace, checkpointing: bool, quantization: str) -> dict:
    """The memory plan's estimate for this run, in GiB: its peak, and the peak the allocator can see."""
    from genai_dags import memory_plan

    train = {"batch_size": args.batch, "rank": args.rank, "gradient_checkpointing": "on" if checkpointing else "off",
             "quantization": quantization, "attn_implementation": "sdpa"}  # fmt: skip
    settings = memory_plan.TrainSettings.from_conf(train, args.seq, gpus=1)
    estimate = memory_plan.estimate(memory_plan.Architecture.from_config(model.config.to_dict()), settings)
    allocated = (estimate.peak - estimate.margin) - estimate.overhead
    return {"plan_peak_gib": estimate.peak / 2**30, "plan_allocated_gib": allocated / 2**30}


def train(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, checkpointing: bool, quantization: str = "none"
) -> tuple[object, dict]:
    import tempfile

    from stages.train_lora import ALL_LINEAR, TrainLoraConfig, wrap_with_lora

    if quantization == "nf4":
        with tempfile.TemporaryDirectory() as folder:
            model = build_qlora_model(args, dtype, device, Path(folder))
    else:
        model = build_model(args, dtype, device)
    if checkpointing:  # as train_lora switches it on
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = TrainLoraConfig(base_model="random-init", dataset_uri="unused", rank=args.rank, alpha=2.0 * args.rank)
    assert lora_config.target_modules == [ALL_LINEAR]
    model = wrap_with_lora(model, lora_config)
    if quantization == "none":
        model = model.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    step_fn = model
    if args.compile:
        step_fn = torch.compile(model)
    generator = torch.Generator(device="cpu").manual_seed(0)
    batches = [
        torch.randint(3, args.vocab, (args.batch, args.seq), generator=generator).to(device)
        for _ in range(min(8, args.warmup + args.steps))
    ]

    def step(i: int) -> float:
        batch = batches[i % len(batches)]
        loss = step_fn(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    final_loss = float(loss)  # syncs
    sync(device)
    seconds = time.perf_counter() - started
    tokens = args.steps * args.batch * args.seq
    flops = flops_per_token(model, args)
    peak = args.peak_tflops or peak_tflops(device)
    achieved = flops["counted"] * tokens / seconds / 1e12
    max_memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    plan = planned(model, args, checkpointing, quantization)
    return model, {
        "gradient_checkpointing": checkpointing,
        "quantization": quantization,
        "max_memory_gib": max_memory,
        **plan,
        "plan_vs_measured": plan["plan_allocated_gib"] / max_memory if max_memory else None,
        "tokens_per_second": tokens / seconds,
        "step_seconds": seconds / args.steps,
        "tokens_per_step": args.batch * args.seq,
        "final_loss": final_loss,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        **flops,
        "achieved_tflops": achieved,
        "achieved_tflops_full_square_attention": flops["full_square_attention"] * tokens / seconds / 1e12,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
    }


def qlora_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def peak_tflops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if all(part in name for part in key.split()):
            return value
    return 0.0


@torch.inference_mode()
def infer(model, args: argparse.Namespace, device: torch.device) -> dict:
    from stages.core.generation import generate_completions

    tokenizer = build_tokenizer(args.vocab)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 257 if not args.smoke else 17, (args.prompts,), generator=generator).tolist()
    prompt_ids = [torch.randint(3, args.vocab, (n,), generator=generator).tolist() for n in lengths]
    model.eval()

    # Baseline: the PEFT model as trained, one generate call per prompt.
    loop_outputs = []
    sync(device)
    started = time.perf_counter()
    for ids in prompt_ids[: args.loop_prompts]:
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        row = out[0, len(ids) :].tolist()
        loop_outputs.append(row[: row.index(2)] if 2 in row else row)
    sync(device)
    loop_seconds = time.perf_counter() - started
    loop_tokens = sum(len(o) for o in loop_outputs)

    # Ours: what stages.batch_infer does (merge_adapter=true, then generate_completions).
    merged = model.merge_and_unload()
    merged.eval()
    generate_completions(merged, tokenizer, prompt_ids[: args.infer_batch], batch_size=args.infer_batch,
                         max_new_tokens=4, device=device)  # fmt: skip
    sync(device)
    started = time.perf_counter()
    outputs, batches = generate_completions(
        merged, tokenizer, prompt_ids, batch_size=args.infer_batch, max_new_tokens=args.new_tokens, device=device
    )
    sync(device)
    ours_seconds = time.perf_counter() - started
    ours_tokens = sum(len(o) for o in outputs)
    same = sum(a == b for a, b in zip(outputs, loop_outputs, strict=False))
    return {
        "ours_tokens_per_second": ours_tokens / ours_seconds,
        "ours_prompts": len(prompt_ids),
        "ours_batches": batches,
        "loop_tokens_per_second": loop_tokens / loop_seconds,
        "loop_prompts": len(loop_outputs),
        "ratio": (ours_tokens / ours_seconds) / (loop_tokens / loop_seconds),
        # in bf16, batched and per-prompt matmuls round differently: near-ties flip more often than in fp32
        "identical_completions": f"{same} of {len(loop_outputs)}",
        "new_tokens": args.new_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU machine, or pass --smoke for the CPU toy run", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 LoRA matmuls
    import transformers

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")},
        "seq": args.seq,
        "batch": args.batch,
        "rank": args.rank,
        "compile": args.compile,
    }
    runs = [("train_qlora", True, "nf4")] if qlora_available() else []
    # The model trained without checkpointing goes on to inference: it runs last.
    runs += [("train_checkpointing", True, "none"), ("train", False, "none")]
    for key, checkpointing, quantization in runs:
        model, run = train(args, device, dtype, checkpointing, quantization)
        result[key] = run
        print(f"{key}: {run['tokens_per_second']:,.0f} tokens/s, MFU {run['mfu']}, peak {run['max_memory_gib']} GiB "
              f"(plan {run['plan_allocated_gib']:.2f})", flush=True)  # fmt: skip
        if key != "train":
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["infer"] = infer(model, args, device)
    text = json.dumps(result, indent=1)
    print(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_lora_mfu.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
