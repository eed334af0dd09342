"""LoRA fine-tuning of a causal LM with ``peft``, preemption-safe.

    python -m stages.train_lora base_model=s3://bucket/models/base run_id=exp1 rank=8 max_steps=200

Reads the packed blocks that ``tokenize`` wrote for this run, trains a LoRA adapter, and saves it in
PEFT's standard format (``adapter/adapter_config.json`` + ``adapter/adapter_model.safetensors``), so
plain ``PeftModel.from_pretrained(base, adapter_dir)`` loads it.

Spot capacity disappears without asking: the trainer checkpoints (adapter, optimizer, scheduler,
RNG states, data position) to the artifact store every ``checkpoint_every`` steps and when SIGTERM
arrives, then exits 143. Restarted, it resumes from the newest complete checkpoint; on CPU with a
fixed seed the resumed run ends with bitwise the same adapter as an uninterrupted one.

Big models: gradient checkpointing, 4-bit QLoRA (``quantization=nf4``), and several GPUs in one pod
(``processes``, one rank per GPU; ``stages.core.distributed``): DDP, each GPU holding the base model,
or FSDP2, the base sharded over the GPUs. The global batch is ``batch_size x grad_accum_steps`` blocks
whatever the number of processes (each rank takes its share of every step), so the same config trains
the same model on 1 or 8 GPUs, within floating-point summation order. Checkpoints hold the full LoRA
state (adapter and optimizer, gathered by rank 0, the one writer; LoRA's trainable state is a small
fraction of the model) plus every rank's RNG state, so a run resumes on any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stages.core import checkpoints, distributed, layout, models, store, telemetry, token_blocks, uris
from stages.core.config import SEED_BOUNDS, check, help_field
from stages.core.distributed import SINGLE, Ranks
from stages.core.errors import UserError
from stages.core.runner import Preempted, StageConfig, StageRun, run_stage

log = logging.getLogger("stages.train_lora")
# PEFT's rule: every linear layer (and GPT-2's Conv1D) except the output head, whatever each family names
# them: q_proj...down_proj in Llama, Qwen, Mistral and Gemma; qkv_proj and gate_up_proj in Phi-3; c_attn in GPT-2.
ALL_LINEAR = "all-linear"
MAX_PROCESSES = 64


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
    quantization: Literal["none", "nf4"] = help_field(
        "none", "nf4: QLoRA, the frozen base in 4-bit NormalFloat (bitsandbytes, double quantisation)."
    )
    processes: int = help_field(
        0, "Training processes, one per GPU; 0: one per visible GPU (1 on CPU).", bounds=(0, MAX_PROCESSES)
    )
    strategy: Literal["auto", "ddp", "fsdp"] = help_field(
        "auto",
        "With several processes: ddp (every GPU holds the base model) or fsdp (FSDP2: the base sharded over "
        "the GPUs); auto: ddp.",
    )
    seed: int = help_field(0, "Seed for LoRA init, dropout and data order.", bounds=SEED_BOUNDS)
    checkpoint_every: int = help_field(50, "Save a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = help_field(2, "Complete checkpoints to keep (older ones are deleted).")
    log_every: int = help_field(10, "Log loss and tokens/s every N steps.")

    # Recomputing activations changes memory and time, not one value of the result (the RNG is replayed).
    # So does the number of processes: the global batch is the same, only float summation order differs.
    OPERATIONAL = frozenset(
        {"checkpoint_every", "keep_checkpoints", "log_every", "device", "gradient_checkpointing", "processes"}
    )

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
        check(
            not (self.quantization == "nf4" and self.strategy == "fsdp"),
            "quantization=nf4 with strategy=fsdp is not supported: use strategy=ddp (a 4-bit 70B model fits one "
            "80 GB GPU) or quantization=none with fsdp",
        )


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
    """Train in this process, or in one process per GPU; the checkpoints go once the manifest is committed."""
    device = models.pick_device(config.device)
    models.check_quantization(config.quantization)
    check_attention(config.attn_implementation, device)
    world = distributed.resolve_processes(config.processes, device.type)
    if world == 1:
        metrics = train_rank(SINGLE, config, run)
    else:
        log.info("training in %d processes (%s)", world, "fsdp" if config.strategy == "fsdp" else "ddp")
        ranks_run = dataclasses.replace(run, attempt=None)  # the attempt's record stays with the stage process
        cuda = device.type == "cuda"
        metrics = distributed.launch(train_rank, (config, ranks_run), world, name=layout.TRAIN_LORA, cuda=cuda)
    run.remove_after_commit.append(run.output(layout.CHECKPOINTS))
    return metrics


def train_rank(ranks: Ranks, config: TrainLoraConfig, run: StageRun) -> dict | None:
    """One rank's training; rank 0 returns the metrics."""
    with PreemptionNotice() as notice:
        return LoRARecipe(config, run, notice, ranks).train()


class LoRARecipe:
    """LoRA fine-tuning as a recipe: ``setup`` (resuming from the newest checkpoint), then ``train_step``
    until done, with ``save_checkpoint`` every ``checkpoint_every`` steps and on SIGTERM, and
    ``save_adapter`` at the end.

    All training state lives in attributes, so a checkpoint is exactly what ``save_checkpoint`` writes
    and ``setup`` reads back: adapter weights, optimizer, scheduler, each rank's RNG states and the loss
    history. The data position needs no state: it is a pure function of the step (``batch_indices``).
    With several ranks, every rank runs the same recipe on its share of each step; rank 0 writes.
    """

    def __init__(self, config: TrainLoraConfig, run: StageRun, notice: PreemptionNotice, ranks: Ranks = SINGLE):
        self.config = config
        self.run = run
        self.notice = notice
        self.ranks = ranks
        self.checkpoints_uri = run.output(layout.CHECKPOINTS)
        self.step = 0  # optimizer steps done
        self.history: list[dict] = []  # one {"step", "loss", "lr"} per step, the train_log
        self.resumed_from: int | None = None
        self.saved_step = -1  # the step of the newest checkpoint, so that a step is never saved twice
        self.trained_tokens = 0  # in this attempt (since the process started), over all ranks
        self.loss_tokens = 0  # of those, the ones that carried loss (all but the first of each block, or the labels)

    # -- setup and resume ------------------------------------------------------------------------

    def setup(self) -> None:
        """Data, the base model wrapped with LoRA (and spread over the ranks), optimizer and scheduler, at
        step 0 or where the newest complete checkpoint left off."""
        config, ranks = self.config, self.ranks
        self.device = models.pick_device(config.device)
        if self.device.type == "cuda" and ranks.distributed:
            self.device = torch.device("cuda", ranks.rank)
        self.dtype = models.pick_dtype(config.precision, self.device)
        self.checkpointing = config.gradient_checkpointing == "on" or (
            config.gradient_checkpointing == "auto" and self.device.type == "cuda"
        )
        self.strategy = ("fsdp" if config.strategy == "fsdp" else "ddp") if ranks.distributed else "single"
        self._setup_data()
        # Seeded right before the model: the LoRA init draws from these generators, the same on every rank.
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self._setup_model()
        checkpoint = self._download_checkpoint()
        if checkpoint:
            self._load_adapter(checkpoint)
        self._distribute()
        self._setup_optimizer()
        if checkpoint:
            self._load_training_state(checkpoint)
        elif ranks.rank:  # dropout masks: rank 0 keeps the single-process stream, the others their own
            torch.manual_seed(config.seed + 1_000_003 * ranks.rank)

    def _setup_data(self) -> None:
        config = self.config
        blocks = token_blocks.load_blocks(config.dataset_uri)
        self.n_blocks, self.block_size = blocks["input_ids"].shape
        self.data = {name: torch.from_numpy(column) for name, column in blocks.items()}
        self.labelled = "labels" in self.data
        self.blocks_per_step = config.batch_size * config.grad_accum_steps  # over all ranks
        self.steps_per_epoch = math.ceil(self.n_blocks / self.blocks_per_step)
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs

    def _setup_model(self) -> None:
        config = self.config
        # FSDP shards from the CPU copy onto the GPUs; otherwise every rank loads straight onto its device.
        load_to = torch.device("cpu") if self.strategy == "fsdp" else self.device
        with models.model_dir(config.base_model) as base_path:
            base = models.load_model(base_path, self.dtype, load_to, config.attn_implementation, config.quantization)
        if config.quantization != "none":
            from peft import prepare_model_for_kbit_training

            # Norms in fp32 and input gradients on, as QLoRA trains; checkpointing is switched on below.
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        if self.checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and replays dropout's RNG
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        context = models.context_length(base.config)
        if context is not None and self.block_size > context:  # unknown: the blocks are taken as they are
            raise UserError(
                f"dataset blocks have {self.block_size} tokens, more than base_model's context of {context}"
            )
        self.peft_model = wrap_with_lora(base, config)
        self.n_trainable = sum(p.numel() for p in self.peft_model.parameters() if p.requires_grad)
        self.n_total = sum(p.numel() for p in self.peft_model.parameters())
        if self.ranks.main:
            log.info(
                "LoRA r=%d on %s: %d trainable of %d parameters (%.2f%%); %d blocks x %d tokens; %d steps on "
                "%s/%s%s, %d process(es)%s",
                config.rank,
                ",".join(sorted(self.peft_model.peft_config["default"].target_modules)),  # all-linear resolved
                self.n_trainable,
                self.n_total,
                100 * self.n_trainable / self.n_total,
                self.n_blocks,
                self.block_size,
                self.total_steps,
                self.device.type,
                self.dtype,
                ", base in nf4" if config.quantization == "nf4" else "",
                self.ranks.world,
                f" ({self.strategy})" if self.ranks.distributed else "",
            )

    def _distribute(self) -> None:
        """``self.model``, what the loop calls: the PEFT model itself, wrapped in DDP, or sharded by FSDP2."""
        self.model = self.peft_model
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.peft_model, device_ids=ids)
        elif self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(self.device.type, (self.ranks.world,))
            # Low-precision weights gathered for compute, gradients reduced in fp32 (LoRA's are fp32).
            precision = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
            # Each decoder layer is one shard unit (transformers names them: Llama's LlamaDecoderLayer...).
            layers = set(getattr(self.peft_model.get_base_model(), "_no_split_modules", None) or ())
            for module in self.peft_model.modules():
                if type(module).__name__ in layers:
                    fully_shard(module, mesh=mesh, mp_policy=precision)
            fully_shard(self.peft_model, mesh=mesh, mp_policy=precision)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

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

    def _download_checkpoint(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint for this run's inputs and config: rank 0 finds and downloads it into
        the pod's scratch folder, where every rank reads it."""
        found = None
        if self.ranks.main:
            found = checkpoints.newest_complete(self.checkpoints_uri, self.run.cache_key, self.run.scratch / "resume")
        return distributed.broadcast(found, self.ranks)

    def _load_adapter(self, checkpoint: tuple[int, Path]) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = checkpoint[1]
        set_peft_model_state_dict(self.peft_model, load_file(path / "adapter_model.safetensors"))

    def _load_training_state(self, checkpoint: tuple[int, Path]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        step, path = checkpoint
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if self.config.strategy == "fsdp":
            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state, options=self._state_options())
        else:
            self.optimizer.load_state_dict(state)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng_file = path / f"rng-rank{self.ranks.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:  # more ranks than the checkpoint's: this one starts its own dropout stream
            log.warning("checkpoint has no RNG state of rank %d: seeding it afresh", self.ranks.rank)
            torch.manual_seed(self.config.seed + 1_000_003 * self.ranks.rank + step)
        self.history = json.loads((path / "state.json").read_text())["history"]
        self.step = self.resumed_from = self.saved_step = step
        if self.ranks.main:
            log.info("resumed from checkpoint at step %d of %d", step, self.total_steps)

    def _state_options(self, **options):
        """How FSDP's optimizer and adapter state are read and written: full tensors keyed by parameter name,
        gathered from the shards, so a checkpoint is the same file whatever the number of ranks. (Without
        FSDP every rank holds the whole state already, and the optimizer's own state_dict is the format.)"""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if self.strategy == "fsdp":
            options.update(full_state_dict=True, cpu_offload=True)
        return StateDictOptions(**options)

    # -- the loop --------------------------------------------------------------------------------

    def train(self) -> dict | None:
        """Set up, train to ``total_steps`` (or checkpoint and stop on SIGTERM), save the adapter."""
        from tqdm import tqdm

        self.setup()
        self.model.train()
        started = time.time()
        show = self.ranks.main and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=not show)
        while self.step < self.total_steps:
            if distributed.any_rank(self.notice.received, self.ranks, self.device):  # all ranks stop together
                self.save_checkpoint()
                raise Preempted(f"stopped at step {self.step} of {self.total_steps}; rerun to resume")
            step_started = time.time()
            loss = self.train_step()
            step_seconds = time.time() - step_started
            tokens_per_s = self.trained_tokens / max(time.time() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
            self.log_step(loss, tokens_per_s, step_seconds)
            if self.step % self.config.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()

        adapter = self.adapter_state()
        if not self.ranks.main:
            return None
        self.save_adapter(adapter)
        sanity_check(adapter, self.history)
        return self.metrics(seconds=time.time() - started)

    def train_step(self) -> float:
        """One optimizer step on the blocks of step ``self.step``, this rank's share of them in micro-batches;
        returns the step's loss (over all ranks)."""
        config, ranks = self.config, self.ranks
        indices = batch_indices(self.step, self.n_blocks, self.blocks_per_step, self.steps_per_epoch, config.seed)
        if self.labelled:
            # The loss is the mean over the step's labelled tokens, however they fall into micro-batches and
            # ranks. The model shifts labels by one: a block's first label is never predicted.
            loss_tokens = int((self.data["labels"][indices, 1:] != -100).sum())
        else:
            loss_tokens = len(indices) * (self.block_size - 1)
        share = indices.tensor_split(ranks.world)[ranks.rank]
        # A rank whose share of a short last step is empty still joins the gradient exchange, with weight 0.
        micros, weight = (share.split(config.batch_size), 1.0) if len(share) else ((indices[:1],), 0.0)
        # DDP and FSDP average the ranks' gradients; the loss is a sum over ranks, hence x world.
        weight *= ranks.world
        step_loss = 0.0
        for i, micro in enumerate(micros):
            with self._gradient_sync(last=i == len(micros) - 1):
                batch = {name: column[micro].to(self.device) for name, column in self.data.items()}
                if self.labelled:
                    # No attention mask: the model builds a block-diagonal one from the restarting position ids.
                    loss = self.model(**batch, num_items_in_batch=loss_tokens, use_cache=False).loss
                else:
                    ids = batch["input_ids"]
                    loss = self.model(input_ids=ids, labels=ids).loss * (len(micro) / len(indices))
                (loss * weight).backward()
            step_loss += loss.item() * weight / ranks.world
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = distributed.total(step_loss, ranks, self.device)
        self.step += 1
        self.trained_tokens += len(indices) * self.block_size
        self.loss_tokens += loss_tokens
        if not math.isfinite(step_loss):
            raise RuntimeError(f"loss is {step_loss} at step {self.step}: training diverged (lower learning_rate?)")
        self.history.append({"step": self.step, "loss": round(step_loss, 6), "lr": self.scheduler.get_last_lr()[0]})
        return step_loss

    def _gradient_sync(self, last: bool):
        """Accumulating micro-batches: the ranks exchange gradients once per step, after the last one."""
        if self.strategy == "ddp" and not last:
            return self.model.no_sync()
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def log_step(self, loss: float, tokens_per_s: float, step_seconds: float) -> None:
        """Every ``log_every`` steps and at the last: a log line, and the same numbers as metrics (telemetry)."""
        if self.ranks.main and (self.step % self.config.log_every == 0 or self.step == self.total_steps):
            lr = self.scheduler.get_last_lr()[0]
            log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s", self.step, self.total_steps, loss, lr, tokens_per_s)
            values = {
                "genai_train_step": self.step,
                "genai_train_loss": loss,
                "genai_train_learning_rate": lr,
                "genai_train_tokens_per_second": tokens_per_s,
                "genai_train_step_seconds": step_seconds,
            }
            if self.device.type == "cuda":
                values["genai_train_gpu_memory_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
                if (busy := telemetry.gpu_utilization(self.device)) is not None:
                    values["genai_train_gpu_utilization_percent"] = busy
            telemetry.push(telemetry.labels(layout.TRAIN_LORA, self.config), values)

    # -- saving ----------------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights, whole, on every rank's CPU (collective under FSDP: gathered from the shards)."""
        if self.config.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(self.model, options=self._state_options(ignore_frozen_params=True))
        return {name: p.detach().cpu() for name, p in self.peft_model.named_parameters() if p.requires_grad}

    def optimizer_state(self) -> dict:
        """AdamW's state, whole (collective under FSDP)."""
        if self.config.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer, options=self._state_options())
        return self.optimizer.state_dict()

    def save_checkpoint(self) -> None:
        """Upload adapter, optimizer, scheduler, every rank's RNG states and history as ``step-<step>``; keep
        the newest few. Collective: every rank writes its RNG state into the pod's scratch folder, rank 0 the
        rest, and rank 0 uploads the folder once every rank's part is in it."""
        if self.saved_step == self.step:
            return
        self.saved_step = self.step
        adapter, optimizer = self.adapter_state(), self.optimizer_state()
        local = self.run.scratch / "checkpoint"
        local.mkdir(exist_ok=True)
        torch.save(rng_state(), local / f"rng-rank{self.ranks.rank}.pt")
        if self.ranks.main:
            self.peft_model.save_pretrained(local, state_dict=adapter)  # adapter_model.safetensors + config
            torch.save(optimizer, local / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), local / "scheduler.pt")
            (local / "state.json").write_text(json.dumps({"step": self.step, "history": self.history}))
        distributed.barrier(self.ranks)  # every rank's RNG file is written
        if self.ranks.main:
            uri = checkpoints.save(local, self.checkpoints_uri, self.step, self.run.cache_key)
            checkpoints.prune(self.checkpoints_uri, self.config.keep_checkpoints)
            log.info("checkpoint saved at step %d: %s", self.step, uri)
        distributed.barrier(self.ranks)  # no rank goes on (or exits) before the checkpoint is complete

    def save_adapter(self, adapter: dict[str, torch.Tensor]) -> None:
        """The stage's outputs: the adapter in PEFT's format (plus its base model's identity) and the train log.

        The checkpoints are working state, deleted once the manifest is committed.
        """
        config, run = self.config, self.run
        adapter_dir = run.scratch / layout.ADAPTER
        # What from_pretrained accepts (AutoPeftModelForCausalLM opens the base from here): a local path or a
        # hub id. A remote URI stays as it is; the URI itself is in training_base.json and the lineage.
        name = config.base_model
        self.peft_model.peft_config["default"].base_model_name_or_path = (
            str(uris.local_path(name)) if uris.is_local(name) else name
        )
        self.peft_model.save_pretrained(adapter_dir, state_dict=adapter)
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
            "device": self.device.type,
            "processes": self.ranks.world,
            "strategy": self.strategy,
            "precision": str(self.dtype).removeprefix("torch."),
            "quantization": self.config.quantization,
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


def sanity_check(adapter: dict[str, torch.Tensor], history: list[dict]) -> None:
    """The adapter must have moved away from its zero init, or nothing was learned."""
    lora_b = [p for n, p in adapter.items() if "lora_B" in n]
    if history and all(float(p.abs().max()) == 0.0 for p in lora_b):
        raise RuntimeError("LoRA B matrices are still zero after training: no update was applied")


def main(argv: list[str] | None = None) -> int:
    return run_stage(layout.TRAIN_LORA, TrainLoraConfig, inputs, train, argv)


if __name__ == "__main__":
    sys.exit(main())
