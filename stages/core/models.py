"""Loading base models, tokenizers and adapters the same way in every stage.

A base model is named by a URI of a folder saved with ``save_pretrained`` (the artifact store) or by
a Hugging Face model id (production clusters with hub access). Devices and precision are picked
once here: bf16 on a GPU that supports it, fp32 on CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core import downloads, layout, manifest, store, uris
from stages.core.errors import ConfigError, UserError

if TYPE_CHECKING:  # torch loads only in stages that run a model, not in tokenize
    import torch

# Stages run offline unless the platform says otherwise: no surprise downloads in a pod.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Model config attributes that hold the context length, in the order lm-evaluation-harness reads them.
CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")
# What transformers leaves in a tokenizer's model_max_length when nothing set it (its VERY_LARGE_INTEGER).
UNSET_MODEL_MAX_LENGTH = int(1e30)
# The files of a saved model that hold its weights (and training state). A stage that reads only the tokenizer
# and the config (tokenize) neither hashes nor fetches them: a 70B model's weights are 140 GB.
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx")


def check_base_model(value: str, field: str = "base_model") -> str:
    """A base model as a stage config keeps it: a URI, normalised (a plain path becomes ``file://``; an
    unknown scheme or a URI with credentials is refused, naming ``field``), or a hub model id as given."""
    if not value:
        raise ConfigError(f"{field} is required: the URI of a saved model folder or a hub model id")
    return uris.normalize_uri(value, field) if uris.is_uri(value) else value


def tokenizer_input(name: str) -> manifest.Input | str:
    """A base model as the input of a stage that reads only its tokenizer and config: the weights are not
    part of its identity (a hub model id is its name)."""
    return manifest.Input(name, WEIGHT_FILES) if uris.is_uri(name) else name


@contextmanager
def model_dir(name: str, field: str = "base_model", weights: bool = True) -> Iterator[str]:
    """A local folder (or a hub id) that ``from_pretrained`` accepts, for a URI or a hub id; without the
    weight files where ``weights`` is False (enough for the tokenizer and the config)."""
    if not uris.is_uri(name):
        yield name
        return
    uri = uris.normalize_uri(name, field)
    config_uri = uris.join(uri, "config.json")
    if not store.exists(config_uri):
        raise UserError(f"{field}={name!r} is not a saved model: {config_uri} does not exist")
    with downloads.local_copy(uri, skip=() if weights else WEIGHT_FILES) as path:
        yield str(path)


def pick_device(requested: str = "auto") -> torch.device:
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' but no GPU is visible to this process")
    return torch.device(requested)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    import torch

    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    if precision == "bf16" and device.type == "cpu":
        raise UserError("precision='bf16' is for GPUs; use precision=fp32 (or auto) on CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


@contextmanager
def _hub_errors(name: str) -> Iterator[None]:
    """A hub model id that cannot be loaded (offline, unknown, gated) is the user's to fix: one message."""
    try:
        yield
    except OSError as exc:
        if uris.is_uri(name) or Path(name).exists():  # a folder on this machine: a real I/O problem
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"base_model={name!r} is read as a Hugging Face hub model id, which could not be loaded ({first}). "
            "Give the URI of a saved model folder (file://, s3://, gs://, abfs://) instead; to load from a "
            "hub, the platform sets HF_HUB_OFFLINE=0 for the stage and, for gated models, HF_TOKEN"
        ) from None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    with _hub_errors(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(path: str):
    from transformers import AutoConfig

    with _hub_errors(path):
        return AutoConfig.from_pretrained(path)


def context_length(model_config: Any, tokenizer: Any = None) -> int | None:
    """The longest sequence the model takes, in tokens, or None when nothing says.

    In order: the first of CONTEXT_ATTRS that the model config (its ``text_config`` where it has one)
    sets to a positive number; then the tokenizer's ``model_max_length``, unless it is transformers'
    "unset" value. What an unknown length means is the caller's policy, stated where it is called.
    """
    config = getattr(model_config, "text_config", None) or model_config
    for attr in CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if value is not None and value > 0:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and 0 < limit != UNSET_MODEL_MAX_LENGTH:
        return int(limit)
    return None


def load_model(
    path: str, dtype: torch.dtype, device: torch.device, attn_implementation: str = "auto", quantization: str = "none"
):
    """The model on ``device``; ``auto`` leaves the attention kernel to transformers (SDPA where the model has it).

    ``quantization="nf4"`` loads the linear layers in 4-bit NormalFloat with double quantisation and
    ``dtype`` compute (QLoRA; bitsandbytes, see :func:`check_quantization`); the rest stays in ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        options["device_map"] = {"": device}  # a quantized model is placed as it loads, never moved after
    with _hub_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options)
    return model if quantization == "nf4" else model.to(device)


def check_quantization(quantization: str, field: str = "quantization") -> None:
    """4-bit needs bitsandbytes (the CUDA images have it) and a backend for this machine: say so before loading."""
    if quantization == "none":
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"{field}={quantization} needs the bitsandbytes package, which this image does not have "
            "(the CUDA trainer image does): use quantization=none here"
        )
    try:
        import bitsandbytes  # noqa: F401  (it checks its native library as it imports)
    except (ImportError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{field}={quantization}: bitsandbytes cannot run on this machine ({first})") from None


@contextmanager
def adapter_dir(adapter_uri: str, base_sha256: str, base_model: str, field: str = "adapter_uri") -> Iterator[Path]:
    """The local PEFT adapter folder of a train_lora output, a published model or a bare adapter folder.

    An adapter trained on another base model is refused here, before any weights load.
    """
    with downloads.local_copy(adapter_uri) as path:
        inside = path / layout.ADAPTER
        folder = inside if (inside / layout.ADAPTER_CONFIG).exists() else path
        if not (folder / layout.ADAPTER_CONFIG).exists():
            raise UserError(
                f"{field}={adapter_uri!r} holds no PEFT adapter (no adapter/adapter_config.json "
                "or adapter_config.json); give a train_lora output or a published model"
            )
        _check_adapter_matches(folder, base_sha256, base_model, f"{field}={adapter_uri!r}: ")
        yield folder


def _check_adapter_matches(adapter_path: Path, base_sha256: str, base_model: str, which: str = "") -> None:
    info_file = adapter_path / layout.TRAINING_BASE
    if not info_file.exists():
        raise UserError(f"adapter at {adapter_path} has no training_base.json; was it made by train_lora?")
    trained_on = json.loads(info_file.read_text())
    if trained_on.get("sha256") != base_sha256:
        raise UserError(
            f"{which}adapter was trained on base model {trained_on.get('base_model')!r} "
            f"(content {str(trained_on.get('sha256'))[:12]}), but base_model={base_model!r} "
            f"has content {base_sha256[:12]}: they do not match"
        )
