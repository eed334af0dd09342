"""Make a small real base model where no model hub can be reached (the demo, the tests, air-gapped clusters).

    python -m stages.base_model corpus_uri='/data/texts/*.txt' run_id=base-tiny

Trains a byte-level BPE tokenizer on the corpus (with ChatML's turn markers as special tokens and
ChatML as its chat template, so that the model can be fine-tuned on conversations), then pretrains a
tiny Llama-style causal LM on it for a fixed number of steps on CPU, and saves both with
``save_pretrained`` under ``<artifact_root>/runs/<run_id>/base_model/model/``. Production users skip
this stage and name a hub model id or the URI of a saved model as ``base_model``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass

import torch

from stages.core import chat, store, uris
from stages.core.config import SEED_BOUNDS, check, help_field
from stages.core.errors import UserError
from stages.core.runner import StageConfig, StageRun, run_stage

log = logging.getLogger("stages.base_model")
EOS = "<|endoftext|>"


MAX_PARAMETERS = 200_000_000


@dataclass(kw_only=True)
class BaseModelConfig(StageConfig):
    corpus_uri: str = help_field("", "Plain-text files to learn from: a file, a folder or a glob URI.")
    vocab_size: int = help_field(2048, "Byte-level BPE vocabulary size.", bounds=(300, 65_536))
    hidden_size: int = help_field(128, "Model width.", bounds=(8, 2048))
    num_layers: int = help_field(4, "Transformer blocks.", bounds=(1, 48))
    num_heads: int = help_field(4, "Attention heads (must divide hidden_size).", bounds=(1, 64))
    context_length: int = help_field(
        256, "max_position_embeddings: the longest sequence the model sees.", bounds=(16, 32_768)
    )
    steps: int = help_field(300, "Pretraining optimizer steps.", bounds=(1, 1_000_000))
    batch_size: int = help_field(16, "Sequences per step.", bounds=(1, 1024))
    seq_len: int = help_field(128, "Tokens per training sequence.", bounds=(2, 32_768))
    learning_rate: float = help_field(3e-3, "Peak AdamW learning rate (cosine decay, 5% warmup).")
    seed: int = help_field(0, "Seed for initialisation and batch sampling.", bounds=SEED_BOUNDS)

    OPERATIONAL = frozenset()

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.corpus_uri), "corpus_uri is required: the text files to pretrain on")
        self.corpus_uri = uris.normalize_uri(self.corpus_uri, "corpus_uri")
        # A small model for demos and tests, built on CPU: a size past this is a typo, refused before allocating.
        parameters = 2 * self.vocab_size * self.hidden_size + 12 * self.num_layers * self.hidden_size**2
        check(
            parameters <= MAX_PARAMETERS,
            f"vocab_size={self.vocab_size}, hidden_size={self.hidden_size} and num_layers={self.num_layers} make "
            f"about {parameters / 1e6:.0f}M parameters; base_model builds small models (at most "
            f"{MAX_PARAMETERS // 1_000_000}M): for a real one, give the other stages a saved model or a hub id",
        )
        check(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}",
        )
        check(
            self.seq_len <= self.context_length,
            f"seq_len={self.seq_len} must be <= context_length={self.context_length}",
        )
        check(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")


def inputs(config: BaseModelConfig) -> dict[str, str]:
    return {"corpus_uri": config.corpus_uri}


def read_corpus(uri: str) -> list[str]:
    texts = []
    for file in store.expand(uri, "corpus_uri"):
        text = store.read_bytes(file).decode("utf-8", errors="replace").strip()
        if text:
            texts.append(text)
    if not texts:
        raise UserError(f"corpus_uri={uri!r} holds no text")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, context_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, *chat.CHATML_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=context_length
    )
    tokenizer.chat_template = chat.CHATML
    return tokenizer


def build(config: BaseModelConfig, run: StageRun) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

    torch.manual_seed(config.seed)
    texts = read_corpus(config.corpus_uri)
    started = time.time()
    tokenizer = train_tokenizer(texts, config.vocab_size, config.context_length)
    ids = [i for text in texts for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    data = torch.tensor(ids, dtype=torch.long)
    log.info(
        "tokenizer: %d tokens of vocabulary, corpus %d tokens (%.1fs)", len(tokenizer), len(data), time.time() - started
    )
    if len(data) <= config.seq_len + 1:
        raise UserError(
            f"corpus_uri={config.corpus_uri!r} is too small: {len(data)} tokens for seq_len={config.seq_len}"
        )

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.hidden_size * 8 // 3,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=config.context_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    )
    params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", params / 1e6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    # The scheduler train_lora uses: linear warmup over 5% of the steps (none under 20), then cosine decay.
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=config.steps // 20, num_training_steps=config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(1, config.steps + 1):
        starts = torch.randint(0, len(data) - config.seq_len - 1, (config.batch_size,), generator=generator)
        batch = torch.stack([data[s : s + config.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == config.steps:
            log.info("step %d/%d loss %.3f", step, config.steps, loss.item())

    final_loss = loss.item()
    if not math.isfinite(final_loss):
        raise RuntimeError(f"pretraining diverged: loss {final_loss}")
    model_dir = run.scratch / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    store.upload_dir(model_dir, run.output("model"))
    log.info("base model: final loss %.3f, saved to %s", final_loss, run.output("model"))
    return {
        "parameters": params,
        "corpus_tokens": len(data),
        "final_loss": round(final_loss, 4),
        "pretrain_seconds": round(time.time() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    return run_stage("base_model", BaseModelConfig, inputs, build, argv)


if __name__ == "__main__":
    sys.exit(main())
