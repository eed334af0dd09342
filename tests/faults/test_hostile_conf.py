"""Hostile and malformed run confs: each is refused before any stage starts, with the field named.

``tests/test_dags.py`` holds the first 21 such confs (wrong types, unknown keys, ``..`` in names and
URIs, a disallowed scheme, an image through the conf); these are the rest: huge and negative numbers,
integers in disguise, names with a trailing newline, and every way a conf might try to reach the
image, command, service account, node selector, security context or environment of a stage pod.
A conf that is accepted must also be one the stages accept (the last tests).
"""

from __future__ import annotations

import pytest

from genai_dags import params, planner
from stages.core.config import load_config
from tests.test_dags import BATCH_OK, FINETUNE_OK, local_dags, local_settings, resolved, validate_conf
from tests.test_dags_contract import stage_config_class

pytestmark = pytest.mark.faults
__all__ = ["local_dags"]  # the fixture, imported for use here

FT, BATCH = "genai_finetune", "genai_batch_inference"

HOSTILE = [
    # (id, dag, conf, the field the message must name, and anything else it must say)
    ("huge-integer", FT, {**FINETUNE_OK, "train": {"max_steps": 10**30}}, ["train.max_steps"]),
    ("huge-float-as-integer", FT, {**FINETUNE_OK, "train": {"max_steps": 1e300}}, ["train.max_steps"]),
    ("infinite-number", FT, {**FINETUNE_OK, "inference": {"temperature": float("inf")}}, ["inference.temperature"]),
    ("nan", FT, {**FINETUNE_OK, "train": {"learning_rate": float("nan")}}, ["train.learning_rate"]),
    ("negative-batch-size", FT, {**FINETUNE_OK, "train": {"batch_size": -8}}, ["train.batch_size"]),
    ("negative-block-size", FT, {**FINETUNE_OK, "tokenize": {"block_size": -128}}, ["tokenize.block_size"]),
    ("negative-new-tokens", BATCH, {**BATCH_OK, "inference": {"max_new_tokens": -1}}, ["inference.max_new_tokens"]),
    ("negative-shard-size", BATCH, {**BATCH_OK, "records_per_shard": -5}, ["records_per_shard"]),
    ("zero-shards", BATCH, {**BATCH_OK, "max_shards": 0}, ["max_shards"]),
    ("bool-as-integer", FT, {**FINETUNE_OK, "train": {"rank": True}}, ["train.rank"]),
    ("string-as-integer", FT, {**FINETUNE_OK, "train": {"rank": "8"}}, ["train.rank"]),
    ("fraction-as-integer", FT, {**FINETUNE_OK, "train": {"rank": 8.5}}, ["train.rank"]),
    ("list-as-name", FT, {**FINETUNE_OK, "model_name": ["folio"]}, ["model_name"]),
    ("object-as-uri", FT, {**FINETUNE_OK, "train_data_uri": {"path": "data/"}}, ["train_data_uri"]),
    ("null-required", FT, {**FINETUNE_OK, "base_model": None}, ["base_model"]),
    ("group-not-an-object", FT, {**FINETUNE_OK, "train": [["rank", 4]]}, ["train"]),
    ("run-id-inner-traversal", FT, {**FINETUNE_OK, "run_id": "a/../../b"}, ["run_id"]),
    ("run-id-absolute", FT, {**FINETUNE_OK, "run_id": "/etc"}, ["run_id"]),
    ("run-id-trailing-newline", FT, {**FINETUNE_OK, "run_id": "exp-1\n"}, ["run_id"]),
    ("run-id-nul", FT, {**FINETUNE_OK, "run_id": "exp\x001"}, ["run_id"]),
    ("run-id-too-long", FT, {**FINETUNE_OK, "run_id": "r" * 129}, ["run_id"]),
    ("model-name-trailing-newline", FT, {**FINETUNE_OK, "model_name": "folio\n"}, ["model_name"]),
    ("model-name-leading-dot", FT, {**FINETUNE_OK, "model_name": ".hidden"}, ["model_name"]),
    ("model-name-unicode", FT, {**FINETUNE_OK, "model_name": "fólio"}, ["model_name"]),
    ("version-traversal-finetune", FT, {**FINETUNE_OK, "version": "../v1"}, ["version"]),
    ("base-model-traversal", FT, {**FINETUNE_OK, "base_model": "file:///models/../../etc"}, ["base_model"]),
    ("uri-trailing-newline", FT, {**FINETUNE_OK, "train_data_uri": "data/folio/\n"}, ["train_data_uri"]),
    ("uri-with-space", FT, {**FINETUNE_OK, "prompts_uri": "data/p.jsonl --config=/etc/x"}, ["prompts_uri"]),
    ("scheme-s3-on-local", FT, {**FINETUNE_OK, "prompts_uri": "s3://bucket/p.jsonl"}, ["prompts_uri"]),
    ("scheme-ftp", FT, {**FINETUNE_OK, "train_data_uri": "ftp://host/data/"}, ["train_data_uri"]),
    ("scheme-javascript", FT, {**FINETUNE_OK, "train_data_uri": "javascript:alert(1)//x"}, ["train_data_uri"]),
    ("sets-the-command", FT, {**FINETUNE_OK, "command": ["sh", "-c", "id"]}, ["unknown key 'command'"]),
    ("sets-the-service-account", FT, {**FINETUNE_OK, "service_account": "admin"}, ["unknown key 'service_account'"]),
    ("sets-a-node-selector", FT, {**FINETUNE_OK, "node_selector": {"gpu": "h100"}}, ["unknown key 'node_selector'"]),
    ("sets-privileged", FT, {**FINETUNE_OK, "privileged": True}, ["unknown key 'privileged'"]),
    ("sets-the-env", FT, {**FINETUNE_OK, "env": {"AWS_ROLE_ARN": "x"}}, ["unknown key 'env'"]),
    ("sets-resources", BATCH, {**BATCH_OK, "resources": {"nvidia.com/gpu": 64}}, ["unknown key 'resources'"]),
    ("stage-image", FT, {**FINETUNE_OK, "train": {"image": "evil:latest"}}, ["train", "image"]),
    ("stage-command", BATCH, {**BATCH_OK, "inference": {"command": "sh"}}, ["inference", "command"]),
    ("stage-security-context", FT, {**FINETUNE_OK, "train": {"security_context": {}}}, ["train", "security_context"]),
    ("stage-artifact-root", FT, {**FINETUNE_OK, "tokenize": {"artifact_root": "/"}}, ["tokenize", "artifact_root"]),
    ("stage-run-id", FT, {**FINETUNE_OK, "train": {"run_id": "../ft-other"}}, ["train", "run_id"]),
    ("stage-input", FT, {**FINETUNE_OK, "evaluate": {"adapter_uri": "/tmp/x"}}, ["evaluate", "adapter_uri"]),
    ("argument-smuggling", FT, {**FINETUNE_OK, "tokenize": {"text_field": "text max_chars=1"}}, ["text_field"]),
    ("list-item-smuggling", FT, {**FINETUNE_OK, "train": {"target_modules": ["q_proj,rank=999"]}}, ["target_modules"]),
]


@pytest.mark.parametrize(("dag_id", "conf", "words"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_hostile_conf_is_refused_before_any_stage_naming_the_field(local_dags, tally, dag_id, conf, words):
    from airflow.sdk.exceptions import ParamValidationError

    try:
        validate_conf(local_dags[dag_id], conf)
        message = None
    except (ParamValidationError, params.ConfError) as exc:
        message = str(exc)
    # "train.rank": Airflow names the group ("param train") and the key ("instance['rank']") apart
    parts = [part for word in words for part in (word.split(".") if " " not in word else [word])]
    named = message is not None and all(part in message for part in parts)
    tally.bad_input("run conf (hostile or malformed)", rejected_cleanly=named)
    assert message is not None, f"accepted: {conf}"
    for part in parts:
        assert part in message, f"{part!r} not in: {message}"


def test_there_are_at_least_25_hostile_confs_none_repeating_test_dags():
    from tests.test_dags import BAD_CONFS

    assert len(HOSTILE) >= 25
    assert not {c[0] for c in HOSTILE} & {c[0] for c in BAD_CONFS}


@pytest.mark.parametrize(
    "conf",
    [
        {**FINETUNE_OK, "train": {"max_steps": 12.0, "rank": 4.0, "alpha": 8, "learning_rate": 1}},
        {**FINETUNE_OK, "inference": {"temperature": 1, "top_p": 1, "max_new_tokens": 16.0}},
        {**FINETUNE_OK, "tokenize": {"block_size": 64.0, "validation_fraction": 0.5}},
    ],
    ids=["integral-floats", "integers-for-numbers", "tokenize"],
)
def test_a_conf_that_is_accepted_is_accepted_by_every_stage_too(local_dags, conf):
    """JSON Schema calls 12.0 an integer; the stage must not then refuse ``max_steps=12.0`` mid-run."""
    validate_conf(local_dags[FT], conf)
    s = local_settings()
    plan = planner.finetune_plan(resolved(conf, local_dags[FT].params), s, {})
    for stage in ("tokenize", "train_lora", "batch_infer"):
        load_config(stage_config_class(stage), None, plan[stage])
