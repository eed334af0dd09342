"""The planner: from a validated run conf to each stage's command-line arguments (the first task of every DAG).

Plain functions, no Airflow: the DAGs' ``plan`` tasks call them, and the tests call them directly.
They decide the stage run id, resolve base-model names and plain paths, check that training fits the
node pool's GPUs (:func:`train_memory_plan`), and build the exact ``key=value`` list every stage task
passes to ``python -m stages.<name>``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from genai_dags import memory_plan, registry
from genai_dags.params import TUNABLES
from genai_dags.settings import PipelineSettings
from genai_dags.stage_specs import STAGES


class PlanError(ValueError):
    """The run cannot start (a name that does not resolve, a model that is not published): the user's to fix."""


STAMP_KEYS = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "updated")


def input_files(uri: str) -> tuple[Any, dict[str, dict[str, Any]]] | None:
    """The files a data URI names (a file, a folder's files at any depth, or a glob's files) with their
    listings' info; None when nothing is there. One listing call for a folder or a glob, nothing read."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if any(c in path for c in "*?["):
        infos = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"}
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
    elif fs.exists(path):
        infos = {path: fs.info(path)}
    else:
        return None
    return fs, infos


def input_fingerprint(uris: dict[str, str]) -> dict[str, str]:
    """A cheap identity of each input: its files' names, sizes and change stamps (a listing, no content read).

    It is the default run id's second half (with the conf): the same conf over changed data is a new
    run, and the same conf over the same data is the same run whatever the code, so that each stage's
    own cache key (which holds its code version) decides what reruns after a code change.
    """
    out = {}
    for field, uri in sorted(uris.items()):
        if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
            out[field] = uri  # a hub model id: its name is all we know
            continue
        found = input_files(uri)
        if found is None:
            out[field] = "missing"  # the stage reports it, with the field's name
            continue
        h = hashlib.sha256()
        for name, info in sorted(found[1].items()):
            stamp = next((info[k] for k in STAMP_KEYS if info.get(k) is not None), "")
            h.update(f"{name}\0{info.get('size')}\0{stamp}\n".encode())
        out[field] = h.hexdigest()
    return out


def stable_run_id(prefix: str, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Same conf + same input files -> same run id. Triggered again, every stage is a cache hit; after a code
    change, only the stages whose code (or inputs) changed recompute, each deciding by its own cache key."""
    conf = {k: v for k, v in params.items() if k != "run_id"}
    digest = hashlib.sha256(json.dumps({"conf": conf, "inputs": inputs}, sort_keys=True).encode()).hexdigest()
    return f"{prefix}-{digest[:16]}"


def finetune_inputs(params: dict[str, Any], settings: PipelineSettings) -> dict[str, str]:
    return {
        "train_data_uri": resolve_uri(params["train_data_uri"], settings),
        "prompts_uri": resolve_uri(params["prompts_uri"], settings),
        "base_model": resolve_base_model(params["base_model"], settings),
    }


def resolve_uri(value: str, settings: PipelineSettings) -> str:
    """Plain paths are relative to the local working directory; URIs pass through unchanged."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        return value
    return "file://" + str((settings.local.workdir / value).resolve())


def resolve_base_model(value: str, settings: PipelineSettings) -> str:
    if value in settings.base_models:
        return settings.base_models[value]
    return resolve_uri(value, settings)


def _arg(key: str, value: Any) -> str:
    if isinstance(value, list):
        value = ",".join(map(str, value))
    elif isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema accepts 12.0 as an integer; the stages parse "12", not "12.0"
    return f"{key}={value}"


def tunable_args(stage: str, params: dict[str, Any]) -> list[str]:
    """``key=value`` for the stage settings the conf gives in the stage's group (``train`` for train_lora...)."""
    group = STAGES[stage].conf_group
    values = params.get(group) or {}
    fields = TUNABLES[stage]
    unknown = set(values) - set(fields)
    if unknown:  # Airflow enforced this already; a second look costs nothing
        raise PlanError(f"{group}: unknown setting(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    return [_arg(k, v) for k, v in sorted(values.items())]


def train_memory_plan(params: dict[str, Any], settings: PipelineSettings) -> tuple[memory_plan.MemoryPlan | None, str]:
    """train_lora's estimated peak memory per GPU against the GPUs of its node pools, and the line to log.

    The plan is None (and the line says why) where there is nothing to check: a runtime without node
    pools, a train_lora without GPUs, pools without ``gpu_memory_gib``, a hub model id (its config.json is
    not read here), a config the estimate does not cover. Raises PlanError, with the table and the
    settings that would fit, when the run cannot fit the smaller GPU of ``gpu-spot`` and ``gpu-on-demand``
    (its last retry). The read is one small file through fsspec.
    """
    stage = settings.stage("train_lora")
    if settings.runtime != "kubernetes":
        return None, f"memory plan skipped: the {settings.runtime} runtime has no node pools to fit"
    if not stage.uses_gpu:
        return None, "memory plan skipped: train_lora runs without a GPU (stages.train_lora.gpu: 0)"
    pools = settings.kubernetes.node_pools
    sized = [(pools[p].gpu_memory_gib, p) for p in ("gpu-spot", "gpu-on-demand") if pools[p].gpu_memory_gib]
    if not sized:
        return None, "memory plan skipped: no kubernetes.node_pools.<pool>.gpu_memory_gib for the GPU pools"
    gpu_gib, pool = min(sized, key=lambda size_pool: size_pool[0])  # the first on a tie: the stage's own pool
    base_model = resolve_base_model(params["base_model"], settings)
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", base_model):
        return None, f"memory plan skipped: base_model={base_model!r} is a hub id, whose config.json is not read here"
    try:
        import fsspec

        with fsspec.open(f"{base_model.rstrip('/')}/config.json", "rb") as fh:
            arch = memory_plan.Architecture.from_config(json.load(fh))
    except (OSError, ValueError) as exc:  # the stage names a missing or broken model itself
        return None, f"memory plan skipped: {base_model}/config.json: {exc}"
    block_size = (params.get("tokenize") or {}).get("block_size", memory_plan.BLOCK_SIZE_DEFAULT)
    train = memory_plan.TrainSettings.from_conf(params.get("train") or {}, block_size, gpus=stage.gpu)
    try:
        plan = memory_plan.plan(arch, train, gpu_gib, pool)
    except memory_plan.DoesNotFit as exc:
        raise PlanError(str(exc)) from None
    return plan, plan.render()


def finetune_plan(
    params: dict[str, Any],
    settings: PipelineSettings,
    inputs: dict[str, str],
    memory: memory_plan.MemoryPlan | None = None,
    champion_uri: str | None = None,
    tokenize_shards: int = 1,
) -> dict[str, Any]:
    """The stage run id, the published name/version, and every stage's arguments.

    ``inputs`` is what else makes a run what it is besides its conf: the fingerprint of its input files
    (:func:`input_fingerprint`). ``memory`` is :func:`train_memory_plan`'s plan: where it chose fsdp for
    ``strategy=auto``, train_lora gets ``strategy=fsdp``. With ``tokenize_shards`` > 1, ``tokenize_shards``
    holds each shard task's arguments and ``tokenize`` merges them (:func:`tokenize_shard_count`); else
    ``tokenize_shards`` is empty and ``tokenize`` is the one task.
    """
    run_id, version = finetune_version(params, inputs)
    base_model = resolve_base_model(params["base_model"], settings)
    common = [f"artifact_root={settings.artifact_root}", f"run_id={run_id}"]
    train = tunable_args("train_lora", params)
    if memory is not None and memory.chose_fsdp:
        train = [*(a for a in train if not a.startswith("strategy=")), "strategy=fsdp"]
    tokenize = [
        *common,
        f"input_uri={resolve_uri(params['train_data_uri'], settings)}",
        f"base_model={base_model}",
        *tunable_args("tokenize", params),
    ]
    n = tokenize_shards
    return {
        "run_id": run_id,
        "model_name": params["model_name"],
        "version": version,
        "tokenize_shards": [[*tokenize, f"num_shards={n}", f"shard_index={i}"] for i in range(n)] if n > 1 else [],
        "tokenize": [*tokenize, f"num_shards={n}", "merge=true"] if n > 1 else tokenize,
        "train_lora": [*common, f"base_model={base_model}", *train],
        "evaluate": [
            *common,
            f"base_model={base_model}",
            *([f"champion_uri={champion_uri}"] if champion_uri else []),
            *tunable_args("evaluate", params),
        ],
        "batch_infer": [
            *common,
            f"base_model={base_model}",
            f"prompts_uri={resolve_uri(params['prompts_uri'], settings)}",
            *tunable_args("batch_infer", params),
        ],
        # The conf goes into the version's lineage.json: what genai_monitor retrains from (genai_dags.monitor).
        "publish": [
            *common,
            f"model_name={params['model_name']}",
            f"version={version}",
            f"run_conf={json.dumps(params, sort_keys=True, separators=(',', ':'))}",
        ],
    }


def finetune_version(params: dict[str, Any], inputs: dict[str, str]) -> tuple[str, str]:
    """The stage run id and the version it publishes (the conf's, else the run id)."""
    run_id = params.get("run_id") or stable_run_id("ft", params, inputs)
    return run_id, params.get("version") or run_id


def champion_to_compare(params: dict[str, Any], settings: PipelineSettings, version: str) -> tuple[str | None, str]:
    """The published model the new adapter must beat to be promoted (the ``champion`` alias's version), and
    the line to log. None when the model has no champion yet (its first version competes with the base
    alone), when ``version`` is the champion (a rerun), or when the champion was trained on another base
    model (not comparable: promotion by hand)."""
    name = params["model_name"]
    champion = registry.read_alias(settings.artifact_root, name, registry.CHAMPION)
    if champion is None:
        return None, f"{name} has no champion yet: a version that passes its gate becomes it"
    if champion.version == version:
        return None, f"{name}@champion is this run's version {version} already"
    lineage = read_published(settings, name, champion.version)
    base_model = resolve_base_model(params["base_model"], settings)
    if lineage.get("base_model") != base_model:
        return None, (
            f"{name}@champion ({champion.version}) was trained on {lineage.get('base_model')}, not {base_model}: "
            "not compared; promote by hand (genai_promote) if this version should replace it"
        )
    uri = registry.version_uri(settings.artifact_root, name, champion.version)
    return uri, f"evaluate compares the new adapter with {name}@champion ({champion.version})"


def tokenize_shard_count(params: dict[str, Any], settings: PipelineSettings) -> int:
    """How many tasks tokenize in parallel: the conf's ``tokenize_shards``, else one per
    ``tokenize_shard_bytes`` of input (capped by ``max_shards``); conversations (task=sft) take one."""
    asked = params.get("tokenize_shards") or 0
    if (params.get("tokenize") or {}).get("task") == "sft":
        if asked > 1:
            raise PlanError(f"tokenize_shards={asked}: task=sft tokenizes in one task (tokenize_shards 0 or 1)")
        return 1
    if asked:
        return asked
    found = input_files(resolve_uri(params["train_data_uri"], settings))
    size = sum(int(info.get("size") or 0) for info in found[1].values()) if found else 0
    return shard_count(size, settings.tokenize_shard_bytes, settings.max_shards)


def shard_count(records: int, records_per_shard: int, max_shards: int) -> int:
    """Enough shards for ``records_per_shard`` each, never more than ``max_shards``, at least one."""
    return max(1, min(max_shards, math.ceil(records / records_per_shard)))


def published_uri(settings: PipelineSettings, model_name: str, version: str) -> str:
    return f"{settings.artifact_root}/models/{model_name}/{version}"


def read_published(settings: PipelineSettings, model_name: str, version: str) -> dict[str, Any]:
    """The lineage of a published model; a model without a committed manifest is not published."""
    import fsspec

    uri = published_uri(settings, model_name, version)
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(f"{path}/manifest.json"):
        raise PlanError(
            f"model_name={model_name!r} version={version!r} is not published: "
            f"{uri}/manifest.json does not exist (run genai_finetune first)"
        )
    with fs.open(f"{path}/lineage.json", "rb") as fh:
        return json.load(fh)


def count_records(uri: str) -> int:
    """JSONL records in a file, folder or glob: newlines counted in 1 MiB chunks, nothing parsed or held."""
    found = input_files(uri)
    if found is None:
        raise PlanError(f"prompts_uri={uri!r} does not exist")
    fs, files = found
    records = 0
    for file in sorted(files):
        last = b"\n"
        with fs.open(file, "rb") as fh:
            while chunk := fh.read(1 << 20):
                records += chunk.count(b"\n")
                last = chunk[-1:]
        if last != b"\n":
            records += 1  # a last line without a newline
    return records


def batch_plan(
    params: dict[str, Any], settings: PipelineSettings, inputs: dict[str, str], lineage: dict[str, Any], records: int
) -> dict[str, Any]:
    run_id = params.get("run_id") or stable_run_id("bi", params, inputs)
    shards = shard_count(records, params["records_per_shard"], params["max_shards"])
    model_uri = published_uri(settings, params["model_name"], params["version"])
    common = [f"artifact_root={settings.artifact_root}", f"run_id={run_id}"]
    infer = [
        *common,
        f"base_model={lineage['base_model']}",
        f"adapter_uri={model_uri}",
        f"prompts_uri={resolve_uri(params['prompts_uri'], settings)}",
        *tunable_args("batch_infer", params),
    ]
    return {
        "run_id": run_id,
        "records": records,
        "num_shards": shards,
        "batch_infer": [[*infer, f"shard_index={i}", f"num_shards={shards}"] for i in range(shards)],
        "merge_predictions": [*common, f"num_shards={shards}"],
    }


def check_quality_gate(evaluation: dict[str, Any] | None) -> str:
    """The gate's reason when it passed; raises GateFailed with the reason when it did not."""
    gate = ((evaluation or {}).get("metrics") or {}).get("quality_gate")
    if not isinstance(gate, dict) or "passed" not in gate:
        raise GateFailed("evaluate reported no metrics.quality_gate; cannot decide, stopping before publication")
    reason = str(gate.get("reason", "no reason given"))
    if not gate["passed"]:
        raise GateFailed(f"quality gate failed: {reason}")
    return reason


class GateFailed(Exception):
    """The evaluation did not meet the threshold: inference and publication must not run."""
