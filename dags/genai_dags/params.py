"""Run conf of each DAG as Airflow Params (JSON Schema): validated when a run is triggered, before any task.

Airflow validates each Param against its schema when the run is created (UI, CLI, REST API, ``dag.test``)
and refuses the run with ``Invalid input for param <name>: ...``. Airflow does not refuse unknown
top-level keys, so the DAG's first task checks the whole conf against :func:`conf_schema` (which adds
``additionalProperties: false``) before any stage starts. Nested groups (``train``, ``inference``...)
are objects with ``additionalProperties: false``, which Airflow itself enforces at trigger time.

What a conf can say is deliberately narrow: data URIs (schemes from the platform config, no ``..``),
names that become path segments (a strict pattern), and a per-stage allowlist of hyperparameters.
Images, commands, service accounts, node pools and security settings come only from the platform
config (``genai_dags.settings``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from airflow.sdk import Param

from genai_dags.settings import PipelineSettings
from genai_dags.stage_specs import STAGES

# The end of the string: JSON Schema validators use Python's re.search, where '$' also matches before
# a final newline ("folio\n" would pass as a name); the lookahead refuses that and means the same in ECMA.
END = r"$(?!\n)"
# Names that become path segments under the artifact root: no '/', no '..', no leading dot.
NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9_-]|\.(?!\.)){0,62}" + END
# A published model by name, or by one of its aliases: <name>@<alias> (genai_dags.registry.ALIAS_PATTERN).
MODEL_REFERENCE_PATTERN = NAME_PATTERN.removesuffix(END) + r"(?:@[a-z][a-z0-9-]{0,62})?" + END
RUN_ID_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){0,127}" + END
SEED = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}

# stage -> {stage config field: JSON Schema}: the only stage settings a run conf can give, in the conf's
# group of that stage (``StageSpec.conf_group``: train_lora's are under "train"). Ranges match (or are
# tighter than) the stage's own validation, which the contract test checks.
TUNABLES: dict[str, dict[str, dict[str, Any]]] = {
    "tokenize": {
        "input_format": {"enum": ["auto", "jsonl", "text", "parquet"]},
        "text_field": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}" + END},
        "text_unit": {"enum": ["paragraph", "line", "file"]},
        "min_chars": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "max_chars": {"type": "integer", "minimum": 1, "maximum": 100_000_000},
        "block_size": {"type": "integer", "minimum": 2, "maximum": 32_768},
        "validation_fraction": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "seed": SEED,
        "task": {"enum": ["causal_lm", "sft"]},
        # A template file is a platform decision (the stage takes its URI); a run conf names a built-in.
        "chat_template": {"enum": ["", "chatml"]},
        "messages_field": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}" + END},
        "prompt_field": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}" + END},
        "completion_field": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}" + END},
        "train_on": {"enum": ["assistant", "all"]},
        "packing": {"type": "boolean"},
        "truncation": {"type": "boolean"},
    },
    "train_lora": {
        "rank": {"type": "integer", "minimum": 1, "maximum": 1024},
        "alpha": {"type": "number", "exclusiveMinimum": 0, "maximum": 4096},
        "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "target_modules": {
            "type": "array",
            "minItems": 1,
            "maxItems": 32,
            "items": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}" + END},
        },
        "learning_rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "lr_schedule": {"enum": ["cosine", "linear", "constant"]},
        "warmup_steps": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "weight_decay": {"type": "number", "minimum": 0, "maximum": 10},
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 4096},
        "grad_accum_steps": {"type": "integer", "minimum": 1, "maximum": 1024},
        "max_steps": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
        "epochs": {"type": "integer", "minimum": 1, "maximum": 1000},
        "precision": {"enum": ["auto", "fp32", "bf16"]},
        "attn_implementation": {"enum": ["auto", "sdpa", "eager", "flash_attention_2"]},
        "gradient_checkpointing": {"enum": ["auto", "on", "off"]},
        "quantization": {"enum": ["none", "nf4"]},
        "strategy": {"enum": ["auto", "ddp", "fsdp"]},
        "seed": SEED,
    },
    "evaluate": {
        "max_eval_docs": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
        "gate_metric": {
            "enum": [
                "auto",
                "word_perplexity",
                "byte_perplexity",
                "token_perplexity",
                "assistant_perplexity",
                "exact_match",
                "chrf",
            ]
        },
        "min_relative_improvement": {"type": "number", "minimum": -1, "exclusiveMaximum": 1},
        "num_samples": {"type": "integer", "minimum": 0, "maximum": 1000},
        "sample_max_new_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
        "precision": {"enum": ["auto", "fp32", "bf16"]},
    },
    "batch_infer": {
        "id_field": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}" + END},
        "prompt_field": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}" + END},
        "messages_field": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}" + END},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 1024},
        "do_sample": {"type": "boolean"},
        "temperature": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0, "maximum": 100_000},
        "seed": SEED,
        "precision": {"enum": ["auto", "fp32", "bf16"]},
    },
}


def uri_schema(settings: PipelineSettings) -> dict[str, Any]:
    """A data URI with one of the platform's allowed schemes; plain paths only where file:// is allowed."""
    schemes = "|".join(settings.allowed_uri_schemes)
    no_traversal = r"(?!.*(?:^|/)\.\.(?:/|$))"
    if "file" in settings.allowed_uri_schemes:
        # A plain path must contain a '/' (./prompts.jsonl), so that a bare word is never taken for one.
        pattern = rf"^{no_traversal}(?:(?:{schemes})://|(?![A-Za-z][A-Za-z0-9+.-]*:)(?=[^\s]*/))[^\s]+{END}"
    else:
        pattern = rf"^{no_traversal}(?:{schemes})://[^\s]+{END}"
    return {"type": "string", "minLength": 1, "maxLength": 2048, "pattern": pattern}


def _uri_param(settings: PipelineSettings, what: str) -> Param:
    allowed = ", ".join(f"{s}://" for s in settings.allowed_uri_schemes)
    plain = " or a path with a '/' on this machine" if "file" in settings.allowed_uri_schemes else ""
    return Param(description=f"{what}: a URI ({allowed}){plain}; no '..' segments.", schema=uri_schema(settings))


def _group(stage: str, description: str) -> dict[str, Param]:
    """The conf group of one stage's tunables, under the group's name (``StageSpec.conf_group``)."""
    param = Param(
        {},
        description=f"{description} Passed to `python -m stages.{stage}`; unknown keys are rejected.",
        schema={"type": "object", "properties": TUNABLES[stage], "additionalProperties": False},
    )
    return {STAGES[stage].conf_group: param}


def _run_id() -> Param:
    return Param(
        None,
        description="Stage run id (artifacts under runs/<run_id>/). Empty: a hash of this conf and its input "
        "files, so re-running the same conf reuses every stage's cached output (after a code change, only the "
        "stages whose code changed recompute).",
        schema={"type": ["null", "string"], "pattern": RUN_ID_PATTERN},
    )


def _name(what: str, optional: bool = False) -> Param:
    description = f"{what} (lower-case letters, digits, '.', '_', '-')."
    if optional:
        return Param(None, description=description, schema={"type": ["null", "string"], "pattern": NAME_PATTERN})
    return Param(description=description, schema={"type": "string", "pattern": NAME_PATTERN})


def finetune_params(settings: PipelineSettings) -> dict[str, Param]:
    catalog = sorted(settings.base_models)
    base_model: dict[str, Any] = uri_schema(settings)
    if catalog:
        base_model = {"type": "string", "anyOf": [{"enum": catalog}, base_model], "examples": catalog}
    return {
        "model_name": _name("Name the model is published under: models/<model_name>/<version>/"),
        "base_model": Param(
            description=f"A base model of the platform catalog ({', '.join(catalog) or 'empty'}) "
            "or the URI of a saved model folder.",
            schema=base_model,
        ),
        "train_data_uri": _uri_param(settings, "Training text (JSONL, text or Parquet; file, folder or glob)"),
        "prompts_uri": _uri_param(settings, "JSONL of prompts with id and prompt"),
        "run_id": _run_id(),
        "version": _name("Published version; empty: the run id", optional=True),
        "tokenize_shards": Param(
            0,
            description="Tasks that tokenize in parallel, each a slice of the input, then one merges them into "
            "the dataset one task would write. 0: one per platform tokenize_shard_bytes of input "
            f"(at most {settings.max_shards}); 1: one task.",
            schema={"type": "integer", "minimum": 0, "maximum": settings.max_shards},
        ),
        **_group("tokenize", "Tokenizer settings."),
        **_group("train_lora", "LoRA training settings."),
        **_group("evaluate", "Evaluation and quality-gate settings."),
        **_group("batch_infer", "Batch inference settings."),
    }


def batch_inference_params(settings: PipelineSettings) -> dict[str, Param]:
    return {
        "model_name": Param(
            description="A model published by genai_finetune, or <name>@<alias> (e.g. folio-lora@champion) for the "
            "version the alias points at.",
            schema={"type": "string", "pattern": MODEL_REFERENCE_PATTERN},
        ),
        "version": _name("Its published version (none with <name>@<alias>)", optional=True),
        "prompts_uri": _uri_param(settings, "JSONL of prompts with id and prompt"),
        "run_id": _run_id(),
        "records_per_shard": Param(
            256,
            description="Prompts per batch_infer task; the shard count follows from the input size.",
            schema={"type": "integer", "minimum": 1, "maximum": 10_000_000},
        ),
        "max_shards": Param(
            min(8, settings.max_shards),
            description=f"Upper bound on parallel batch_infer tasks (platform cap {settings.max_shards}).",
            schema={"type": "integer", "minimum": 1, "maximum": settings.max_shards},
        ),
        **_group("batch_infer", "Batch inference settings."),
    }


def promote_params() -> dict[str, Param]:
    return {
        "model_name": _name("A model published by genai_finetune"),
        "version": _name("The published version the alias moves to"),
        "alias": Param(
            "champion",
            description="The alias to move (lower-case letters, digits, '-').",
            schema={"type": "string", "pattern": r"^[a-z][a-z0-9-]{0,62}" + END},
        ),
        "reason": Param(
            description="Why (recorded with the move): e.g. 'rollback: v7 regressed on support tickets'.",
            schema={"type": "string", "minLength": 1, "maxLength": 500},
        ),
    }


def monitor_params(settings: PipelineSettings) -> dict[str, Param]:
    """genai_monitor runs on a schedule, without a conf: every param has its default from ``monitor:``."""
    watched = settings.monitor.model_name or None
    uri = uri_schema(settings)
    return {
        "model_name": Param(
            watched,
            description="The model whose champion is measured against the new batch "
            f"(default: the platform's monitor.model_name, {watched or 'unset'}).",
            schema={"type": ["null", "string"], "pattern": NAME_PATTERN},
        ),
        "data_uri": Param(
            None,
            description="The batch to measure (file, folder or glob). Empty: the newest entry under the "
            "platform's monitor.data_prefix.",
            schema={**uri, "type": ["null", "string"]},
        ),
        "run_id": _run_id(),
    }


def _param_objects(params: Mapping[str, Any]) -> dict[str, Param]:
    """Param objects from a plain dict or from a DAG's ParamsDict (whose items() resolves values)."""
    get = getattr(params, "get_param", None)
    return {name: get(name) if get else params[name] for name in params}


def conf_schema(params: Mapping[str, Any]) -> dict[str, Any]:
    """The whole run conf as one JSON Schema: each Param's schema, required ones, and no unknown keys."""
    params = _param_objects(params)
    required = [name for name, p in params.items() if p.value is None or not p.has_value]
    required = [name for name in required if "null" not in _types(params[name].schema)]
    return {
        "type": "object",
        "properties": {name: p.schema for name, p in params.items()},
        "required": required,
        "additionalProperties": False,
    }


def _types(schema: dict[str, Any]) -> list[str]:
    t = schema.get("type", [])
    return t if isinstance(t, list) else [t]


class ConfError(ValueError):
    """The run conf is invalid; the message names the field."""


def check_conf(conf: dict[str, Any], params: Mapping[str, Any]) -> None:
    """Validate a raw run conf; every error names its field (``train.rank``, ``unknown key 'trian'``)."""
    import jsonschema

    if not isinstance(conf, dict):
        raise ConfError(f"the run conf must be a JSON object, not {type(conf).__name__}")
    # JSON Schema lets NaN through every range check (all comparisons with it are false); Python's JSON
    # parser reads the literal NaN, so a conf can carry one.
    errors = [f"{field}: NaN is not a number" for field in _nan_fields(conf)]
    for key in conf:
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            errors.append(
                f"unknown key {key!r} in the run conf"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; allowed: {', '.join(params)}"
            )
    validator = jsonschema.Draft202012Validator(conf_schema(params))
    for error in sorted(validator.iter_errors(conf), key=lambda e: list(map(str, e.absolute_path))):
        if error.validator == "additionalProperties" and not error.absolute_path:
            continue  # reported above, with a suggestion
        field = ".".join(str(p) for p in error.absolute_path) or "(conf)"
        errors.append(f"{field}: {error.message}")
    if errors:
        raise ConfError("invalid run conf: " + "; ".join(errors))


def _nan_fields(value: Any, path: str = "") -> list[str]:
    if isinstance(value, float) and value != value:
        return [path or "(conf)"]
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in _nan_fields(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [f for i, v in enumerate(value) for f in _nan_fields(v, f"{path}.{i}")]
    return []
