"""Measure one LoRA training step of a small random Llama on CPU: the peak memory it adds to the loaded model.

    MALLOC_MMAP_THRESHOLD_=65536 MKL_DISABLE_FAST_MM=1 OMP_NUM_THREADS=1 \\
        python -m tests.memory_probe step /tmp/probe hidden=512 layers=4 heads=8 kv_heads=8 \\
        intermediate=1376 vocab=8192 batch_size=2 seq_len=256 checkpointing=0 dropout=0.05 [bf16=1] [nf4=1]
    python -m tests.memory_probe families

``tests/test_memory_plan.py`` runs it in fresh processes and compares its numbers with
``genai_dags.memory_plan``. The step is train_lora's: the model loaded by ``stages.core.models.load_model``,
checkpointing enabled as ``LoRARecipe._setup_model`` does, wrapped by ``stages.train_lora.wrap_with_lora``,
``model(input_ids=ids, labels=ids).loss``, backward, clipping, AdamW.

What is measured is the process's peak resident memory during the step (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``) minus its resident memory before, after a warm-up step on one short block
(libraries, threads, AdamW's moments) and with every weight made resident (safetensors weights are mmapped:
an embedding row read for the first time would count as growth). The environment keeps the allocators
honest: glibc returns every block over 64 KiB to the system when freed (a fixed mmap threshold), and MKL
keeps no buffer cache. The result is one JSON line.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from types import SimpleNamespace


def status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


def step(folder: Path, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
         batch_size: int, seq_len: int, checkpointing: int, dropout: float, bf16: int = 0,
         nf4: int = 0) -> dict:  # fmt: skip
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.core import models
    from stages.core.errors import UserError
    from stages.train_lora import TrainLoraConfig, wrap_with_lora

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    # bf16 on CPU is not what train_lora runs, but it saves the same tensors as bf16 on a GPU (the dropout
    # mask aside): the RMSNorms' fp32 upcasts, PEFT's fp32 copies of the adapter inputs, the fp32 logits.
    dtype = torch.bfloat16 if bf16 else torch.float32
    if nf4:
        try:
            models.check_quantization("nf4")
        except UserError as exc:  # no bitsandbytes here: nothing to measure
            return {"error": str(exc)}
    model = models.load_model(str(folder), dtype, torch.device("cpu"), quantization="nf4" if nf4 else "none")
    if nf4:  # as train_lora prepares a 4-bit base: everything not quantised in fp32
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    defaults = {f: TrainLoraConfig.__dataclass_fields__[f].default for f in ("rank", "alpha")}
    model = wrap_with_lora(model, SimpleNamespace(target_modules=["all-linear"], dropout=dropout, **defaults))
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # resident now: the baseline holds every weight
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def train_step(ids: torch.Tensor) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    train_step(ids[:1, :16])
    gc.collect()
    before = status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        return {"error": f"cannot reset the peak resident memory: {exc}"}
    train_step(ids)
    return {
        "growth": status("VmHWM") - before,
        "parameters": sum(
            p.numel() * (2 if nf4 and p.dtype == torch.uint8 else 1) for p in model.parameters() if not p.requires_grad
        ),
        "lora_parameters": sum(p.numel() for p in trainable),
    }


def families() -> dict:
    """For each family of tests/families.py: its config.json, its parameters and its all-linear LoRA's."""
    import torch
    import transformers

    from stages.train_lora import TrainLoraConfig, wrap_with_lora
    from tests.families import FAMILIES

    rank = TrainLoraConfig.__dataclass_fields__["rank"].default
    out = {}
    for name, family in FAMILIES.items():
        ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # within the small vocabulary
        config = getattr(transformers, family.config_class)(vocab_size=400, **ids, **family.config)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        parameters = sum(p.numel() for p in model.parameters())
        lora = wrap_with_lora(model, SimpleNamespace(target_modules=["all-linear"], rank=rank, alpha=16, dropout=0))
        out[name] = {
            "config": json.loads(config.to_json_string()),  # what save_pretrained writes as config.json
            "parameters": parameters,
            "lora_parameters": sum(p.numel() for p in lora.parameters() if p.requires_grad),
        }
    return out


def main(argv: list[str]) -> int:
    if argv[0] == "families":
        result = families()
    else:
        options = dict(a.split("=", 1) for a in argv[2:])
        numbers = {k: (float(v) if k == "dropout" else int(v)) for k, v in options.items()}
        result = step(Path(argv[1]), **numbers)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
