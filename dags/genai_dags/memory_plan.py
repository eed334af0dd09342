"""The memory plan: train_lora's peak memory per GPU, estimated from the base model's config.json.

    PYTHONPATH=dags python -m genai_dags.memory_plan path/to/config.json batch_size=8 block_size=2048 gpu_memory_gib=79

The ``plan`` task of ``genai_finetune`` runs it (``planner.train_memory_plan``) before any GPU node scales
up: a run conf that cannot fit the node pool's GPUs fails there, with this table and the settings that would
fit. Plain arithmetic on the config (no torch: DAG code never imports it), in bytes, per training process:

- **base weights**: every parameter at its dtype's size (bf16 2 bytes, fp32 4). With ``quantization=nf4``
  the decoder layers' linear weights take 4 bits plus their quantisation constants under double
  quantisation (an 8-bit absmax per 64 weights, an fp32 constant per 256 of those: 0.516 bytes per weight;
  Dettmers et al. 2023, "QLoRA", section 3); embeddings, head and norms are not quantised, and train_lora's
  ``prepare_model_for_kbit_training`` casts them to fp32, so the residual stream, every activation below
  and the logits are fp32 too. Under ``strategy=fsdp`` (FSDP2, never with nf4 in train_lora) the weights
  are sharded over the processes, and a process also holds what it gathers: the root unit (embeddings,
  head, final norm) and two decoder layers (one computing, one prefetched).
- **LoRA**: ``rank x (in + out)`` parameters per targeted linear of every layer (``all-linear``: every
  linear layer but the head, PEFT's rule). PEFT keeps adapters in fp32 whatever the base dtype, so each
  costs 16 bytes: weight, gradient and AdamW's two moments (the model-state accounting of Rajbhandari et al.
  2020, "ZeRO", section 3.1, all in fp32 here); DDP adds a 4-byte gradient bucket; FSDP shards all of it.
- **activations**, per token of a forward pass (the processes of a pod share each step's
  ``batch_size x grad_accum_steps`` blocks in passes of at most ``batch_size`` blocks, so a process computes
  ``min(batch_size, ceil(batch_size x grad_accum_steps / processes))`` blocks at once): what autograd saves
  for the backward pass in a decoder layer, counted tensor by tensor as Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models", section 4) do, for a frozen base (a frozen
  weight's matmul saves no input), read off Llama's graph:

  * the two RMSNorms: their input upcast to fp32 (4 x hidden bytes each);
  * attention through SDPA or flash attention (no ``seq x seq`` score matrix): q, k, v and the output,
    ``dtype x (2 q_dim + 2 kv_dim)``; eager attention (``attn_implementation=eager``, and families with no
    SDPA path such as Gemma 2) adds the scores, ``heads x seq x (4 + dtype)`` bytes per token;
  * the gated MLP: gate output, its activation, up output (``3 x intermediate x dtype``);
  * each adapter's input, cast to the adapters' fp32 by PEFT and dropped out: 4 bytes plus the dropout mask
    (a 1-byte bool on CUDA, a 4-byte float on CPU) per input feature. With dropout 0, a bf16 base still
    makes one fp32 copy per adapter, while an fp32 base keeps one tensor per input, shared by the adapters
    on it (the o_proj input is the attention output, counted above); plus each ``lora_A`` output (4 x rank).

  Without gradient checkpointing every layer keeps all of it; with it (non-reentrant, as train_lora
  enables it) a layer keeps only its input (``hidden x dtype``), and the backward pass recomputes one layer
  at a time. The final norm keeps its fp32 input either way.
- **logits and loss**: transformers upcasts the logits to fp32 for the cross-entropy; at the start of the
  backward pass the saved log-softmax, its gradient and the logits' gradient are three fp32 copies of
  ``batch x seq x vocab``, 12 bytes per element.
- **backward of one layer**: the layer recomputed (with checkpointing) plus the gradients in flight (two
  MLP-wide tensors and the fp32 residual's). It is never live at the same time as the logits, which are
  freed when the head's backward ends, so the peak counts the larger of the two.
- **CUDA context and workspaces** (the context with its kernels, cuBLAS workspaces, NCCL buffers): a fixed
  1 GiB, a judgement rather than a measurement; and a **margin** of 10% of everything for the caching
  allocator's fragmentation.

``tests/test_memory_plan.py`` measures real LoRA steps of small Llamas on CPU (fp32, bf16, a 4-bit base)
against the activation, logits, backward and adapter-gradient terms (all within 20%, most within 5%), and
checks the parameter counts exactly against transformers models. Left out: mixture-of-experts and multimodal configs,
and configs without Llama's keys such as GPT-2's (no estimate: the check is skipped); biases and Gemma's
extra norms (under 1% of the weights); the ``batch x seq x seq`` attention mask of packed SFT blocks; the
dequantised weight a 4-bit layer makes while it computes; under fsdp, adapters gathered in bf16 (whose
inputs then need no fp32 copy: an overestimate). ``precision=auto`` is taken as bf16: a GPU without it (a
T4) trains in fp32, with twice the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
CUDA_OVERHEAD_BYTES = 1 * GIB
MARGIN = 0.10
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# Families whose transformers implementation has no SDPA path: attn_implementation=auto runs eager attention.
EAGER_FAMILIES = frozenset({"gemma2"})
# train_lora's and tokenize's defaults for the settings the estimate reads; the planner cannot import the
# stages (no torch in DAG code), so tests/test_memory_plan.py checks these against their dataclasses.
TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 8,
    "grad_accum_steps": 1,
    "rank": 8,
    "dropout": 0.05,
    "target_modules": ["all-linear"],
    "precision": "auto",
    "attn_implementation": "auto",
    "gradient_checkpointing": "auto",
    "quantization": "none",
    "processes": 0,
    "strategy": "auto",
}
BLOCK_SIZE_DEFAULT = 128
ALL_LINEAR = "all-linear"


class UnsupportedModel(ValueError):
    """config.json describes a model this estimate does not cover (the check is skipped, not failed)."""


class DoesNotFit(ValueError):
    """The run needs more memory per GPU than the node pool's GPUs have; the message says what would fit."""


@dataclass(frozen=True)
class Linear:
    name: str  # the module name target_modules matches
    inputs: int
    outputs: int
    source: str  # which tensor feeds it: adapters on the same source share it when nothing copies it


@dataclass(frozen=True)
class Architecture:
    """What the estimate reads of a decoder-only model's config.json."""

    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    linears: tuple[Linear, ...]  # of one decoder layer

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        family = str(config.get("model_type", "?"))
        if any(k in config for k in ("vision_config", "audio_config")):
            raise UnsupportedModel(f"model_type {family} is multimodal: its other towers are not estimated")
        if any((config.get(k) or 1) > 1 for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise UnsupportedModel(f"model_type {family} is a mixture of experts, which the estimate does not cover")
        config = config.get("text_config") or config
        needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in needed if not isinstance(config.get(k), int)]
        if missing:
            raise UnsupportedModel(f"model_type {family}: config.json has no {', '.join(missing)}")
        h, i = config["hidden_size"], config["intermediate_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or h // heads
        q, kv = heads * head_dim, kv_heads * head_dim
        if family == "phi3":  # fused projections
            linears = (
                Linear("qkv_proj", h, q + 2 * kv, "attn_in"),
                Linear("o_proj", q, h, "attn_out"),
                Linear("gate_up_proj", h, 2 * i, "mlp_in"),
                Linear("down_proj", i, h, "mlp_mid"),
            )
        else:  # Llama's names, shared by Mistral, Qwen, Gemma, OLMo, Granite...
            linears = (
                Linear("q_proj", h, q, "attn_in"),
                Linear("k_proj", h, kv, "attn_in"),
                Linear("v_proj", h, kv, "attn_in"),
                Linear("o_proj", q, h, "attn_out"),
                Linear("gate_proj", h, i, "mlp_in"),
                Linear("up_proj", h, i, "mlp_in"),
                Linear("down_proj", i, h, "mlp_mid"),
            )
        return cls(
            family=family,
            hidden=h,
            intermediate=i,
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=config["vocab_size"],
            # A config that does not say is counted untied: the larger of the two.
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            linears=linears,
        )

    @property
    def layer_linear_params(self) -> int:
        return sum(lin.inputs * lin.outputs for lin in self.linears)

    @property
    def other_params(self) -> int:
        """Embeddings, head and norms: what 4-bit quantisation leaves in the compute dtype."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_linear_params + self.other_params

    def targeted(self, target_modules: tuple[str, ...]) -> tuple[Linear, ...]:
        if ALL_LINEAR in target_modules:
            return self.linears
        return tuple(lin for lin in self.linears if lin.name in target_modules)


@dataclass(frozen=True)
class TrainSettings:
    """The train_lora settings the estimate reads, resolved (no ``auto`` left but the strategy's)."""

    batch_size: int
    grad_accum_steps: int
    seq_len: int
    rank: int
    dropout: float
    target_modules: tuple[str, ...]
    precision: str  # bf16 | fp32
    attn_implementation: str
    quantization: str  # none | nf4
    checkpointing: bool
    processes: int
    strategy: str  # auto | ddp | fsdp
    device: str = "cuda"  # cuda | cpu: a dropout mask is a bool on CUDA, a float on CPU

    @classmethod
    def from_conf(cls, train: dict[str, Any], block_size: int, gpus: int, device: str = "cuda") -> TrainSettings:
        """From the conf's ``train`` group over train_lora's defaults, on ``gpus`` GPUs of one pod."""
        s = {**TRAIN_DEFAULTS, **train}
        precision = s["precision"] if s["precision"] != "auto" else ("bf16" if device == "cuda" else "fp32")
        checkpointing = s["gradient_checkpointing"] == "on" or (
            s["gradient_checkpointing"] == "auto" and device == "cuda"
        )
        return cls(
            batch_size=int(s["batch_size"]),
            grad_accum_steps=int(s["grad_accum_steps"]),
            seq_len=int(block_size),
            rank=int(s["rank"]),
            dropout=float(s["dropout"]),
            target_modules=tuple(s["target_modules"]),
            precision=precision,
            attn_implementation=s["attn_implementation"],
            quantization=s["quantization"],
            checkpointing=checkpointing,
            processes=int(s["processes"]) or max(gpus, 1),
            strategy=s["strategy"],
            device=device,
        )

    def changed(self, **changes: Any) -> TrainSettings:
        return dataclasses.replace(self, **changes)

    @property
    def micro_batch(self) -> int:
        """Blocks in one forward pass of one process: the processes share each step's blocks (train_lora)."""
        return min(self.batch_size, math.ceil(self.batch_size * self.grad_accum_steps / self.processes))

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.processes > 1


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one training process, term by term, in bytes."""

    arch: Architecture
    settings: TrainSettings
    weights: float
    lora: float
    lora_params: int
    activations: float  # saved for the backward pass, all layers
    activations_per_token_layer: float  # what one layer saves per token (without checkpointing)
    logits: float  # the loss-gradient phase
    layer_backward: float  # the backward of one layer (recomputed, with checkpointing), never with the logits
    overhead: float

    @property
    def transient(self) -> float:
        return max(self.logits, self.layer_backward)

    @property
    def margin(self) -> float:
        return MARGIN * (self.weights + self.lora + self.activations + self.transient + self.overhead)

    @property
    def peak(self) -> float:
        return self.weights + self.lora + self.activations + self.transient + self.overhead + self.margin

    def rows(self) -> list[tuple[str, float, bool]]:
        """(what, bytes, counted in the peak) for each term."""
        a, s = self.arch, self.settings
        base = "linears in nf4, the rest fp32" if s.quantization == "nf4" else s.precision
        shard = f", sharded over {s.processes}" if s.sharded else ""
        ddp = s.processes > 1 and not s.sharded
        per_param = "20 B (fp32 weight, grad, AdamW, DDP bucket)" if ddp else "16 B (fp32 weight, grad, AdamW)"
        tokens = f"{s.micro_batch} x {s.seq_len} tokens"
        if s.checkpointing:
            kept = f"activations: {a.layers} layer inputs (checkpointing) x {tokens}"
        else:
            kept = f"activations: {a.layers} layers x {self.activations_per_token_layer / 1024:.0f} KiB x {tokens}"
        layer = "one layer recomputed + its gradients" if s.checkpointing else "gradients of one layer"
        logits_counted = self.logits >= self.layer_backward
        return [
            (f"base weights: {a.params / 1e9:.2f}B parameters, {base}{shard}", self.weights, True),
            (f"LoRA: {self.lora_params / 1e6:.1f}M parameters x {per_param}{shard}", self.lora, True),
            (kept, self.activations, True),
            (f"logits and loss: 3 fp32 copies of {tokens} x {a.vocab} vocab", self.logits, logits_counted),
            (f"backward: {layer}", self.layer_backward, not logits_counted),
            ("CUDA context and workspaces" if s.device == "cuda" else "runtime overhead", self.overhead, True),
            (f"margin {MARGIN:.0%} (allocator fragmentation)", self.margin, True),
        ]

    def table(self) -> str:
        lines = [f"  {'term':<72} {'GiB':>8}"]
        for what, size, counted in self.rows():
            shown = f"{size / GIB:8.2f}" if counted else f"({size / GIB:.2f})".rjust(8)
            lines.append(f"  {what:<72} {shown}")
        lines.append(f"  {'peak per GPU':<72} {self.peak / GIB:8.2f}")
        lines.append("  (in parentheses: not counted; the logits and one layer's backward are never live together)")
        return "\n".join(lines)


def estimate(arch: Architecture, s: TrainSettings) -> Estimate:
    """train_lora's peak memory per process for ``s`` on the model ``arch`` (see the module docstring)."""
    d = DTYPE_BYTES[s.precision]
    nf4 = s.quantization == "nf4"
    # A 4-bit base is prepared as QLoRA trains it: what is not quantised is cast to fp32, and so is then
    # the residual stream, every activation and the logits.
    kept, act = (4, 4) if nf4 else (d, d)
    shards = s.processes if s.sharded else 1
    layer_weights = arch.layer_linear_params * (NF4_BYTES if nf4 else d) + 2 * arch.hidden * kept
    root_weights = (arch.other_params - 2 * arch.layers * arch.hidden) * kept  # embeddings, head, final norm
    weights = arch.layers * layer_weights + root_weights
    if s.sharded:  # the shard, plus what is gathered: the root unit and two layers
        weights = weights / shards + root_weights + 2 * layer_weights

    targeted = arch.targeted(s.target_modules)
    lora_params = arch.layers * sum(s.rank * (lin.inputs + lin.outputs) for lin in targeted)
    lora = lora_params * 16 / shards + (lora_params * 4 if s.processes > 1 and not s.sharded else 0)

    tokens = s.micro_batch * s.seq_len
    q_dim, kv_dim = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    per_token = 2 * 4 * arch.hidden  # the two RMSNorms' fp32 inputs
    per_token += act * (2 * q_dim + 2 * kv_dim)  # q, k, v and the attention output
    eager = s.attn_implementation == "eager" or (s.attn_implementation == "auto" and arch.family in EAGER_FAMILIES)
    if eager:
        per_token += arch.heads * s.seq_len * (4 + act)  # scores: fp32 softmax output, then in dtype
    per_token += 3 * arch.intermediate * act  # gate output, its activation, up output
    per_token += _adapter_inputs(targeted, s, act) + len(targeted) * 4 * s.rank
    if s.checkpointing:
        activations = tokens * (arch.layers * arch.hidden * act + 4 * arch.hidden)
        layer_backward = tokens * (per_token + _layer_gradients(arch, act))
    else:
        activations = tokens * (arch.layers * per_token + 4 * arch.hidden)
        layer_backward = tokens * _layer_gradients(arch, act)
    logits = 12 * tokens * arch.vocab
    overhead = CUDA_OVERHEAD_BYTES if s.device == "cuda" else 0
    return Estimate(arch, s, weights, lora, lora_params, activations, per_token, logits, layer_backward, overhead)


def _adapter_inputs(targeted: tuple[Linear, ...], s: TrainSettings, d: int) -> float:
    """Bytes per token that the adapters' inputs keep: PEFT casts each input to the adapters' fp32."""
    if s.dropout > 0:
        mask = 1 if s.device == "cuda" else 4
        return sum(lin.inputs * (4 + mask) for lin in targeted)
    if d == 4:  # nothing copies the input: one per source; the attention output is counted already
        return sum({lin.source: lin.inputs * 4 for lin in targeted if lin.source != "attn_out"}.values())
    return sum(lin.inputs * 4 for lin in targeted)


def _layer_gradients(arch: Architecture, d: int) -> float:
    """Bytes per token of the gradients in flight while one layer runs backward (its MLP's: the widest)."""
    return 2 * arch.intermediate * d + 4 * arch.hidden


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for a run, the GPU it must fit, and what the planner changed to make it fit."""

    estimate: Estimate
    gpu_gib: float
    pool: str
    chose_fsdp: bool = False  # strategy=auto: ddp does not fit, fsdp does

    @property
    def fits(self) -> bool:
        return self.estimate.peak <= self.gpu_gib * GIB

    def render(self) -> str:
        e, s, a = self.estimate, self.estimate.settings, self.estimate.arch
        gpus = f"{s.processes} GPUs per pod, {s.strategy}" if s.processes > 1 else "one GPU"
        share = f" ({s.micro_batch} per forward pass on each GPU)" if s.processes > 1 else ""
        head = (
            f"memory plan for train_lora: {a.family}, {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; {gpus}, "
            f"batch_size={s.batch_size}{share}, grad_accum_steps={s.grad_accum_steps}, block_size={s.seq_len}, "
            f"rank={s.rank}, precision={s.precision}, quantization={s.quantization}, "
            f"gradient_checkpointing={'on' if s.checkpointing else 'off'}"
        )
        verdict = f"fits the {self.gpu_gib:g} GiB GPUs of {self.pool}" if self.fits else "does not fit"
        lines = [head, e.table(), f"  {e.peak / GIB:.1f} GiB per GPU: {verdict}"]
        if self.chose_fsdp:
            lines.append(
                f"  strategy=auto: ddp would need {ddp_peak(e) / GIB:.1f} GiB per GPU, more than {self.gpu_gib:g} GiB; "
                f"train_lora runs with strategy=fsdp (the base sharded over {s.processes} GPUs)"
            )
        return "\n".join(lines)


def ddp_peak(e: Estimate) -> float:
    return estimate(e.arch, e.settings.changed(strategy="ddp")).peak


def plan(arch: Architecture, settings: TrainSettings, gpu_gib: float, pool: str) -> MemoryPlan:
    """The plan for ``settings`` on GPUs of ``gpu_gib``; raises DoesNotFit with what would fit instead.

    ``strategy=auto`` runs ddp where it fits, else fsdp where that fits (with more than one process, and
    a base that is not 4-bit: train_lora refuses nf4 with fsdp).
    """
    limit = gpu_gib * GIB
    first = estimate(arch, settings.changed(strategy="ddp") if settings.strategy == "auto" else settings)
    if first.peak <= limit:
        return MemoryPlan(first, gpu_gib, pool)
    if settings.strategy == "auto" and settings.processes > 1 and settings.quantization != "nf4":
        sharded = estimate(arch, settings.changed(strategy="fsdp"))
        if sharded.peak <= limit:
            return MemoryPlan(sharded, gpu_gib, pool, chose_fsdp=True)
    raise DoesNotFit(refusal(first, gpu_gib, pool))


def suggestions(arch: Architecture, settings: TrainSettings, gpu_gib: float) -> list[tuple[str, float]]:
    """(changes to the run conf, peak bytes) in the order tried, until one fits: gradient checkpointing;
    then on top of it the base in 4 bits, or instead fsdp over the pod's GPUs (train_lora does not combine
    the two); then, on the better of those, smaller micro-batches (more accumulation steps keep the blocks
    of an optimizer step)."""
    s = settings.changed(strategy="ddp") if settings.strategy == "auto" else settings
    changes: dict[str, Any] = {}
    candidates: list[tuple[dict[str, Any], TrainSettings]] = []
    if not s.checkpointing:
        changes, s = {"gradient_checkpointing": "on"}, s.changed(checkpointing=True)
        candidates.append((changes, s))
    options = [(changes, s)]
    if s.quantization != "nf4" and not s.sharded:
        options.append(({**changes, "quantization": "nf4"}, s.changed(quantization="nf4")))
    if s.processes > 1 and not s.sharded:
        fsdp = {**changes, **({"quantization": "none"} if s.quantization == "nf4" else {}), "strategy": "fsdp"}
        options.append((fsdp, s.changed(strategy="fsdp", quantization="none")))
    candidates += options[1:]
    changes, s = min(options, key=lambda option: estimate(arch, option[1]).peak)
    batch = s.micro_batch
    while batch > 1:
        batch //= 2
        accum = math.ceil(s.batch_size * s.grad_accum_steps / batch)
        candidates.append(
            (
                {**changes, "batch_size": batch, "grad_accum_steps": accum},
                s.changed(batch_size=batch, grad_accum_steps=accum),
            )
        )
    tried = []
    for changed, candidate in candidates:
        peak = estimate(arch, candidate).peak
        tried.append((" ".join(f"train.{k}={v}" for k, v in changed.items()), peak))
        if peak <= gpu_gib * GIB:
            break
    return tried


def refusal(e: Estimate, gpu_gib: float, pool: str) -> str:
    s = e.settings
    where = f"{s.processes} GPUs" if s.processes > 1 else "one GPU"
    lines = [
        f"train_lora needs about {e.peak / GIB:.1f} GiB per GPU, more than the {gpu_gib:g} GiB of a GPU in "
        f"node pool {pool} (kubernetes.node_pools.{pool}.gpu_memory_gib); it would run out of memory. The plan:",
        MemoryPlan(e, gpu_gib, pool).render(),
        "What would fit (changes to the run conf, tried in this order):",
    ]
    tried = suggestions(e.arch, s, gpu_gib)
    for label, peak in tried:
        verdict = "fits" if peak <= gpu_gib * GIB else "still too much"
        lines.append(f"  {label} would need {peak / GIB:.1f} GiB: {verdict}")
    if not tried or tried[-1][1] > gpu_gib * GIB:
        lines.append(
            f"  nothing a run conf sets makes it fit {where} of {gpu_gib:g} GiB; what would: a shorter "
            "tokenize.block_size, a smaller base model, a pool with larger GPUs, or more GPUs per pod "
            "(platform config stages.train_lora.gpu) with train.strategy=fsdp"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m genai_dags.memory_plan config.json [train setting=value ...] [block_size=N] [gpus=N]
    [gpu_memory_gib=G]``: the estimate's table, and the plan's verdict when a GPU size is given."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(main.__doc__)
        return 2
    with open(args[0], encoding="utf-8") as fh:
        arch = Architecture.from_config(json.load(fh))
    options = dict(a.split("=", 1) for a in args[1:])
    block_size = int(options.pop("block_size", BLOCK_SIZE_DEFAULT))
    gpus, gpu_gib = int(options.pop("gpus", 1)), float(options.pop("gpu_memory_gib", 0))
    train = {k: (v.split(",") if k == "target_modules" else _number(v)) for k, v in options.items()}
    settings = TrainSettings.from_conf(train, block_size, gpus)
    if not gpu_gib:
        print(estimate(arch, settings).table())
        return 0
    try:
        print(plan(arch, settings, gpu_gib, "gpu-spot").render())
    except DoesNotFit as exc:
        print(exc)
        return 1
    return 0


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


if __name__ == "__main__":
    raise SystemExit(main())
