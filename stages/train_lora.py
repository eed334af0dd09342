"""LoRA fine-tuning of a causal LM with ``peft``, preemption-safe.

    python -m stages.train_lora base_model=s3://bucket/models/base run_id=exp1 rank=8 max_steps=200

Reads the packed blocks that ``tokenize`` wrote for this run, trains a LoRA adapter, and saves it in
PEFT's standard format (``adapter/adapter_config.json`` + ``adapter/adapter_model.safetensors``), so
plain ``PeftModel.from_pretrained(base, adapter_dir)`` loads it.

Spot capacity disappears without asking: the trainer checkpoints (adapter, optimizer, scheduler,
RNG states, data position) to the artifact store every ``checkpoint_every`` steps and when SIGTERM
arrives, then exits 143. Restarted, it resumes from the newest complete checkpoint; on CPU with a
fixed seed the resumed run ends with bitwise the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from stages.core import checkpoints, downloads, layout, models, store, uris
from stages.core.config import SEED_BOUNDS, check, help_field
from stages.core.errors import UserError
from stages.core.runner import Preempted, StageConfig, StageRun, run_stage

log = logging.getLogger("stages.train_lora")
# PEFT's rule: every linear layer (and GPT-2's Conv1D) except the output head, whatever each family names
# them: q_proj...down_proj in Llama, Qwen, Mistral and Gemma; qkv_proj and gate_up_proj in Phi-3; c_attn in GPT-2.
ALL_LINEAR = "all-linear"


@dataclass(kw_only=True)
class TrainLoraConfig(StageConfig):
    base_model: str = help_field("", "Base model: URI of a save_pretrained folder, or a hub model id.")
    dataset_uri: str = help_field("", "Output of tokenize; empty means this run's tokenize stage.")
    rank: int = help_field(8, "LoRA rank r.", bounds=(1, 1024))
    alpha: float = help_field(16.0, "LoRA alpha (scaling = alpha / rank).")
    dropout: float = help_field(0.05, "Dropout on the LoRA path.")
    target_modules: list[str] = help_field(
        [ALL_LINEAR], "Module names that get adapters (comma-separated); all-linear: every linear layer but the head."
    )
    learning_rate: float = help_field(5e-4, "Peak AdamW learning rate.")
    lr_schedule: Literal["cosine", "linear", "constant"] = help_field("cosine", "Decay after warmup.")
    warmup_steps: int = help_field(10, "Linear warmup steps.")
    weight_decay: float = help_field(0.0, "AdamW weight decay.")
    max_grad_norm: float = help_field(1.0, "Gradient clipping norm (0 disables).")
    batch_size: int = help_field(8, "Blocks per micro-batch.", bounds=(1, 4096))
    grad_accum_steps: int = help_field(1, "Micro-batches per optimizer step.", bounds=(1, 4096))
    max_steps: int = help_field(0, "Optimizer steps; 0 means epochs x steps per epoch.")
    epochs: int = help_field(1, "Passes over the training blocks (when max_steps is 0).")
    precision: Literal["auto", "fp32", "bf16"] = help_field("auto", "auto: bf16 on a GPU that has it, else fp32.")
    device: Literal["auto", "cpu", "cuda"] = help_field("auto", "Where to train.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = help_field(
        "auto",
        "Attention kernel: auto (transformers' choice: sdpa where the model has it), sdpa, eager, or "
        "flash_attention_2 (the flash-attn package and a CUDA GPU).",
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = help_field(
        "auto", "Recompute activations in the backward pass instead of keeping them (less memory); auto: on a GPU."
    )
    seed: int = help_field(0, "Seed for LoRA init, dropout and data order.", bounds=SEED_BOUNDS)
    checkpoint_every: int = help_field(50, "Save a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = help_field(2, "Complete checkpoints to keep (older ones are deleted).")
    log_every: int = help_field(10, "Log loss and tokens/s every N steps.")

    # Recomputing activations changes memory and time, not one value of the result (the RNG is replayed).
    OPERATIONAL = frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "device", "gradient_checkpointing"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.base_model = models.check_base_model(self.base_model)
        self.resolve_input("dataset_uri", layout.TOKENIZE)
        check(self.alpha > 0, f"alpha={self.alpha} must be > 0")
        check(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        check(bool(self.target_modules), "target_modules must name at least one module")
        check(0 < self.learning_rate <= 1, f"learning_rate={self.learning_rate} must be in (0, 1]")
        check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        check(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        check(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} must be >= 0")
        for name in ("epochs", "checkpoint_every", "log_every"):
            check(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0")
        check(0 <= self.max_steps <= 10_000_000, f"max_steps={self.max_steps} must be in [0, 10000000]")
        check(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")


def inputs(config: TrainLoraConfig) -> dict[str, str]:
    return {"base_model": config.base_model, "dataset_uri": config.dataset_uri}


class PreemptionNotice:
    """SIGTERM (the spot notice, or a pod deletion) only raises a flag; the loop checkpoints at the next step."""

    def __enter__(self) -> PreemptionNotice:
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM received: checkpointing at the end of this step")
        self.received = True


# The columns of a tokenized train split that train_lora reads: task=causal_lm writes input_ids alone (every
# token is a label), task=sft adds labels (-100 where no loss) and position_ids (restarting per packed example).
BLOCK_COLUMNS = ("input_ids", "labels", "position_ids")


def load_blocks(dataset_uri: str) -> dict[str, np.ndarray]:
    import datasets

    with downloads.local_copy(uris.join(dataset_uri, layout.DATASET)) as path:
        try:
            train = datasets.load_from_disk(str(path))["train"]
        except (FileNotFoundError, KeyError) as exc:
            raise UserError(f"dataset_uri={dataset_uri!r} holds no tokenized train split: {exc}") from None
        columns = [c for c in BLOCK_COLUMNS if c in train.column_names]
        # [:] reads the columns as arrays; indexing a column alone iterates it row by row in Python
        table = train.with_format("numpy", columns=columns)[:]
        blocks = {c: np.asarray(table[c], dtype=np.int64) for c in columns}
    if "input_ids" not in blocks or blocks["input_ids"].ndim != 2 or len(blocks["input_ids"]) == 0:
        raise UserError(f"dataset_uri={dataset_uri!r} has no training blocks")
    return blocks


def wrap_with_lora(model, config: TrainLoraConfig):
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = ALL_LINEAR if config.target_modules == [ALL_LINEAR] else list(config.target_modules)
    missing = sorted(set(config.target_modules) - names) if targets != ALL_LINEAR else []
    if missing:
        raise UserError(
            f"target_modules={config.target_modules} includes {missing}, which the base model "
            f"does not have (it has e.g. {sorted(n for n in names if 'proj' in n)[:8]})"
        )
    width = getattr(getattr(model.config, "text_config", None) or model.config, "hidden_size", None)
    if width is not None and config.rank > width:
        raise UserError(f"rank={config.rank} is larger than base_model's hidden size of {width}")
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
    )
    return get_peft_model(model, lora)


def check_attention(implementation: str, device: torch.device) -> None:
    """flash_attention_2 needs its package and a CUDA GPU: say so before any weights load."""
    if implementation != "flash_attention_2":
        return
    import importlib.util

    if device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
        where = "no CUDA GPU" if device.type != "cuda" else "no flash-attn package in this image"
        raise UserError(f"attn_implementation=flash_attention_2 cannot run here ({where}): use sdpa")


def batch_indices(step: int, n_blocks: int, blocks_per_step: int, steps_per_epoch: int, seed: int) -> torch.Tensor:
    """The blocks of optimizer step ``step``: a pure function of the step, so resuming needs no sampler state."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[index * blocks_per_step : (index + 1) * blocks_per_step]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(config: TrainLoraConfig, run: StageRun) -> dict:
    with PreemptionNotice() as notice:
        return LoRARecipe(config, run, notice).train()


class LoRARecipe:
    """LoRA fine-tuning as a recipe: ``setup``, ``resume``, then ``train_step`` until done, with
    ``save_checkpoint`` every ``checkpoint_every`` steps and on SIGTERM, and ``save_adapter`` at the end.

    All training state lives in attributes, so a checkpoint is exactly what ``save_checkpoint`` writes
    and ``resume`` reads back: adapter weights, optimizer, scheduler, RNG states and the loss history.
    The data position needs no state: it is a pure function of the step (``batch_indices``).
    """

    def __init__(self, config: TrainLoraConfig, run: StageRun, notice: PreemptionNotice) -> None:
        self.config = config
        self.run = run
        self.notice = notice
        self.checkpoints_uri = run.output(layout.CHECKPOINTS)
        self.step = 0  # optimizer steps done
        self.history: list[dict] = []  # one {"step", "loss", "lr"} per step, the train_log
        self.resumed_from: int | None = None
        self.saved_step = -1  # the step of the newest checkpoint, so that a step is never saved twice
        self.trained_tokens = 0  # in this attempt (since the process started)
        self.loss_tokens = 0  # of those, the ones that carried loss (all but the first of each block, or the labels)

    # -- setup and resume ------------------------------------------------------------------------

    def setup(self) -> None:
        """Data, the base model wrapped with LoRA, optimizer and scheduler: a fresh run at step 0."""
        config = self.config
        self.device = models.pick_device(config.device)
        self.dtype = models.pick_dtype(config.precision, self.device)
        check_attention(config.attn_implementation, self.device)
        self.checkpointing = config.gradient_checkpointing == "on" or (
            config.gradient_checkpointing == "auto" and self.device.type == "cuda"
        )
        self._setup_data()
        # Seeded right before the model: the LoRA init and then dropout draw from these generators.
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self._setup_model()
        self._setup_optimizer()

    def _setup_data(self) -> None:
        config = self.config
        blocks = load_blocks(config.dataset_uri)
        self.n_blocks, self.block_size = blocks["input_ids"].shape
        self.data = {name: torch.from_numpy(column) for name, column in blocks.items()}
        self.labelled = "labels" in self.data
        self.blocks_per_step = config.batch_size * config.grad_accum_steps
        self.steps_per_epoch = math.ceil(self.n_blocks / self.blocks_per_step)
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs

    def _setup_model(self) -> None:
        config = self.config
        with models.model_dir(config.base_model) as base_path:
            base = models.load_model(base_path, self.dtype, self.device, config.attn_implementation)
        if self.checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and replays dropout's RNG
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        context = models.context_length(base.config)
        if context is not None and self.block_size > context:  # unknown: the blocks are taken as they are
            raise UserError(
                f"dataset blocks have {self.block_size} tokens, more than base_model's context of {context}"
            )
        self.model = wrap_with_lora(base, config)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trainable)
        self.n_total = sum(p.numel() for p in self.model.parameters())
        log.info(
            "LoRA r=%d on %s: %d trainable of %d parameters (%.2f%%); %d blocks x %d tokens; %d steps on %s/%s",
            config.rank,
            ",".join(sorted(self.model.peft_config["default"].target_modules)),  # all-linear resolved to names
            self.n_trainable,
            self.n_total,
            100 * self.n_trainable / self.n_total,
            self.n_blocks,
            self.block_size,
            self.total_steps,
            self.device,
            self.dtype,
        )

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        config = self.config
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(
            config.lr_schedule,
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=self.total_steps,
        )

    def resume(self) -> None:
        """Continue from the newest complete checkpoint made for this run's inputs and config, if any."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        found = checkpoints.newest_complete(self.checkpoints_uri, self.run.cache_key, self.run.scratch / "resume")
        if not found:
            return
        step, path = found
        set_peft_model_state_dict(self.model, load_file(path / "adapter_model.safetensors", device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        self.history = json.loads((path / "state.json").read_text())["history"]
        self.step = self.resumed_from = self.saved_step = step
        log.info("resumed from checkpoint at step %d of %d", step, self.total_steps)

    # -- the loop --------------------------------------------------------------------------------

    def train(self) -> dict:
        """Set up, resume, train to ``total_steps`` (or checkpoint and stop on SIGTERM), save the adapter."""
        from tqdm import tqdm

        self.setup()
        self.resume()
        self.model.train()
        started = time.time()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=not sys.stderr.isatty())
        while self.step < self.total_steps:
            if self.notice.received:
                self.save_checkpoint()
                raise Preempted(f"stopped at step {self.step} of {self.total_steps}; rerun to resume")
            loss = self.train_step()
            tokens_per_s = self.trained_tokens / max(time.time() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
            self.log_step(loss, tokens_per_s)
            if self.step % self.config.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()

        self.save_adapter()
        sanity_check(self.model, self.history)
        return self.metrics(seconds=time.time() - started)

    def train_step(self) -> float:
        """One optimizer step on the blocks of step ``self.step``, over micro-batches; returns its loss."""
        config = self.config
        indices = batch_indices(self.step, self.n_blocks, self.blocks_per_step, self.steps_per_epoch, config.seed)
        step_loss = 0.0
        if self.labelled:
            # The loss is the mean over the step's labelled tokens, however they fall into micro-batches. The
            # model shifts labels by one: a block's first label is never predicted.
            loss_tokens = int((self.data["labels"][indices, 1:] != -100).sum())
        else:
            loss_tokens = len(indices) * (self.block_size - 1)
        for micro in indices.split(config.batch_size):
            batch = {name: column[micro].to(self.device) for name, column in self.data.items()}
            if self.labelled:
                # No attention mask: the model builds a block-diagonal one from the restarting position ids.
                loss = self.model(**batch, num_items_in_batch=loss_tokens, use_cache=False).loss
            else:
                ids = batch["input_ids"]
                loss = self.model(input_ids=ids, labels=ids).loss * (len(micro) / len(indices))
            loss.backward()
            step_loss += loss.item()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.trained_tokens += len(indices) * self.block_size
        self.loss_tokens += loss_tokens
        if not math.isfinite(step_loss):
            raise RuntimeError(f"loss is {step_loss} at step {self.step}: training diverged (lower learning_rate?)")
        self.history.append({"step": self.step, "loss": round(step_loss, 6), "lr": self.scheduler.get_last_lr()[0]})
        return step_loss

    def log_step(self, loss: float, tokens_per_s: float) -> None:
        if self.step % self.config.log_every == 0 or self.step == self.total_steps:
            log.info(
                "step %d/%d loss %.4f lr %.2e %.0f tokens/s",
                self.step,
                self.total_steps,
                loss,
                self.scheduler.get_last_lr()[0],
                tokens_per_s,
            )

    # -- saving ----------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Upload adapter, optimizer, scheduler, RNG states and history as ``step-<step>``; keep the newest few."""
        if self.saved_step == self.step:
            return
        self.saved_step = self.step
        local = self.run.scratch / "checkpoint"
        local.mkdir(exist_ok=True)
        self.model.save_pretrained(local)  # adapter_model.safetensors + adapter_config.json
        torch.save(self.optimizer.state_dict(), local / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), local / "scheduler.pt")
        torch.save(rng_state(), local / "rng.pt")
        (local / "state.json").write_text(json.dumps({"step": self.step, "history": self.history}))
        uri = checkpoints.save(local, self.checkpoints_uri, self.step, self.run.cache_key)
        checkpoints.prune(self.checkpoints_uri, self.config.keep_checkpoints)
        log.info("checkpoint saved at step %d: %s", self.step, uri)

    def save_adapter(self) -> None:
        """The stage's outputs: the adapter in PEFT's format (plus its base model's identity) and the train log.

        The checkpoints are working state, deleted once the manifest is committed.
        """
        config, run = self.config, self.run
        adapter_dir = run.scratch / layout.ADAPTER
        # What from_pretrained accepts (AutoPeftModelForCausalLM opens the base from here): a local path or a
        # hub id. A remote URI stays as it is; the URI itself is in training_base.json and the lineage.
        name = config.base_model
        self.model.peft_config["default"].base_model_name_or_path = (
            str(uris.local_path(name)) if uris.is_local(name) else name
        )
        self.model.save_pretrained(adapter_dir)
        # PEFT keeps target_modules as a set, so its order in the JSON changes with each process's hash
        # seed: sorted, the same training writes the same bytes (a resumed run equals an uninterrupted one).
        config_file = adapter_dir / layout.ADAPTER_CONFIG
        adapter_config = json.loads(config_file.read_text())
        if isinstance(adapter_config.get("target_modules"), list):
            adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
        config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        template = uris.join(config.dataset_uri, layout.CHAT_TEMPLATE)
        if store.exists(template):  # task=sft: the template the adapter learned, for evaluate and batch_infer
            (adapter_dir / layout.CHAT_TEMPLATE).write_text(store.read_text(template))
        (adapter_dir / layout.TRAINING_BASE).write_text(
            json.dumps({"base_model": config.base_model, "sha256": run.inputs["base_model"]["sha256"]}, indent=2)
        )
        store.upload_dir(adapter_dir, run.output(layout.ADAPTER))
        store.write_text(run.output(layout.TRAIN_LOG), "".join(json.dumps(h) + "\n" for h in self.history))
        run.remove_after_commit.append(self.checkpoints_uri)

    def metrics(self, seconds: float) -> dict:
        """What the manifest records of this training, logged in one line."""
        history = self.history
        metrics = {
            "steps": self.step,
            "resumed_from_step": self.resumed_from,
            "final_loss": history[-1]["loss"] if history else None,
            "first_loss": history[0]["loss"] if history else None,
            "trained_tokens_this_attempt": self.trained_tokens,
            "tokens_per_second": round(self.trained_tokens / max(seconds, 1e-9), 1),
            "loss_tokens_per_second": round(self.loss_tokens / max(seconds, 1e-9), 1),
            "loss_token_share": round(self.loss_tokens / max(self.trained_tokens, 1), 4),
            "trainable_parameters": self.n_trainable,
            "total_parameters": self.n_total,
            "device": str(self.device),
            "precision": str(self.dtype).removeprefix("torch."),
            "attn_implementation": self.config.attn_implementation,
            "gradient_checkpointing": self.checkpointing,
        }
        log.info(
            "trained %d steps: loss %s -> %s, %.0f tokens/s",
            self.step,
            metrics["first_loss"],
            metrics["final_loss"],
            metrics["tokens_per_second"],
        )
        return metrics


def sanity_check(model, history: list[dict]) -> None:
    """The adapter must have moved away from its zero init, or nothing was learned."""
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    if history and all(float(p.detach().abs().max()) == 0.0 for p in lora_b):
        raise RuntimeError("LoRA B matrices are still zero after training: no update was applied")


def main(argv: list[str] | None = None) -> int:
    return run_stage(layout.TRAIN_LORA, TrainLoraConfig, inputs, train, argv)


if __name__ == "__main__":
    sys.exit(main())
