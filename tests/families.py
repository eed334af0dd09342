"""Tiny random-init models of the major open model families, each with a tokenizer in that family's format.

No hub is reachable here, so each family is rebuilt small from its ``transformers`` config class: the
same architecture code (attention, MLP, norms, Conv1D for GPT-2, experts for the mixture-of-experts
family) at a few hundred thousand parameters, with a byte-level or SentencePiece-style BPE tokenizer
carrying the family's special tokens, BOS habit and chat template (its turn markup and end-of-turn
token). What the SFT path must get right per family (templates, label spans, stop tokens, LoRA target
modules) depends on exactly these, not on the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }}"
    " [/INST]{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3 = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
# GPT-2 has no chat template and no turn tokens: a plain-text format given as a template file.
PLAIN = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    config: dict[str, Any]
    template: str | None  # the tokenizer's own chat template; None: none (a template file is given)
    specials: dict[str, str]  # bos/eos/pad -> token
    extra_tokens: tuple[str, ...]  # turn markup, as special tokens
    end_of_turn: str  # the token that ends an assistant turn
    sentencepiece: bool = False  # Metaspace pre-tokenizer (Llama 2, Mistral, Gemma) instead of byte-level
    template_file: str | None = None  # the template given by URI (tokenize chat_template=<file>)
    targets: tuple[str, ...] = field(default=())  # module names LoRA's default must find


SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}

FAMILIES = {
    f.name: f
    for f in (
        Family(
            "llama", "LlamaConfig", {**SMALL, "intermediate_size": 64, "num_key_value_heads": 2}, LLAMA3,
            {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>"},
            ("<|start_header_id|>", "<|end_header_id|>"), "<|eot_id|>", targets=("q_proj", "down_proj"),
        ),
        Family(
            "qwen2", "Qwen2Config", {**SMALL, "intermediate_size": 64, "num_key_value_heads": 2}, CHATML,
            {"eos": "<|im_end|>", "pad": "<|endoftext|>"}, ("<|im_start|>",), "<|im_end|>",
            targets=("q_proj", "down_proj"),
        ),
        Family(
            "mistral", "MistralConfig", {**SMALL, "intermediate_size": 64, "num_key_value_heads": 2}, MISTRAL,
            {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}, ("[INST]", "[/INST]"), "</s>", sentencepiece=True,
            targets=("q_proj", "down_proj"),
        ),
        Family(
            "gemma2", "Gemma2Config",
            {**SMALL, "intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 16},
            GEMMA, {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}, ("<start_of_turn>", "<end_of_turn>"),
            "<end_of_turn>", sentencepiece=True, targets=("q_proj", "down_proj"),
        ),
        Family(
            "phi3", "Phi3Config", {**SMALL, "intermediate_size": 64, "num_key_value_heads": 4}, PHI3,
            {"eos": "<|endoftext|>", "pad": "<|endoftext|>"},
            ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>", targets=("qkv_proj", "gate_up_proj"),
        ),
        Family(
            "gpt2", "GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}, None,
            {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"}, (), "<|endoftext|>",
            template_file=PLAIN, targets=("c_attn", "c_fc"),
        ),
        Family(
            "qwen2_moe", "Qwen2MoeConfig",
            {**SMALL, "intermediate_size": 64, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
             "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1},
            CHATML, {"eos": "<|im_end|>", "pad": "<|endoftext|>"}, ("<|im_start|>",), "<|im_end|>",
            targets=("q_proj", "o_proj"),
        ),
    )
}  # fmt: skip


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Small multi-turn conversations (no system turn: Gemma's and Mistral's templates refuse one)."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo"]
    records = []
    for i in range(n):
        a, b = rng.sample(words, 2)
        turns = [
            {"role": "user", "content": f"Card {i}: spell {a} backwards, please."},
            {"role": "assistant", "content": a[::-1]},
        ]
        if i % 3 == 0:  # every third conversation has a second exchange
            turns += [{"role": "user", "content": f"And {b}?"}, {"role": "assistant", "content": f"{b[::-1]} it is."}]
        records.append({"messages": turns})
    return records


def build(family: Family, folder: Path, corpus: list[str]) -> Path:
    """Save the family's tiny model and tokenizer with ``save_pretrained`` under ``folder``; return it."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(dict.fromkeys([*family.specials.values(), *family.extra_tokens]))
    tok = Tokenizer(models.BPE())
    if family.sentencepiece:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = ["\n", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'-"]
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{f"{role}_token": token for role, token in family.specials.items()},
        additional_special_tokens=list(family.extra_tokens),
        model_max_length=256,
    )
    if family.template:
        tokenizer.chat_template = family.template
    ids = {f"{role}_token_id": tokenizer.convert_tokens_to_ids(t) for role, t in family.specials.items()}
    config = getattr(transformers, family.config_class)(vocab_size=len(tokenizer), **family.config, **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
