"""The DAGs under every shipped pipeline config: they import, follow the house policy, and refuse bad run confs.

Fast and hermetic except the two ``integration`` tests, which trigger real runs through ``dag.test()``.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from genai_dags import local_airflow, params, planner, settings
from genai_dags.render_pods import load_dags, pipeline_config
from genai_dags.stage_specs import STAGES

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = sorted(ROOT.glob("values/*/pipeline.yaml"))
CONFIG_IDS = [p.parent.name for p in CONFIGS]
DAG_IDS = {"genai_finetune", "genai_batch_inference", "genai_promote", "genai_monitor", "genai_retrain"}
EXAMPLES = sorted(ROOT.glob("examples/*.json"))
EXAMPLE_DAG = {"finetune": "genai_finetune", "batch": "genai_batch_inference"}


@pytest.fixture(scope="module")
def local_dags():
    return load_dags(ROOT / "values/local/pipeline.yaml")


def serialized_params(dag):
    """The params exactly as the scheduler and the REST API see them (after DAG serialization)."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag)).params


def validate_conf(dag, conf: dict) -> dict:
    """What happens to a conf before any stage runs: Airflow's trigger-time check, then the plan task's."""
    resolved = serialized_params(dag).deep_merge(conf).validate()  # as DAG.create_dagrun does
    params.check_conf(conf, dag.params)  # the plan task: unknown top-level keys, the whole schema
    return resolved


def example_dag_id(path: Path) -> str:
    return next(dag_id for prefix, dag_id in EXAMPLE_DAG.items() if path.name.startswith(prefix))


# ---------------------------------------------------------------------------------------------
# Import and policy


@pytest.mark.parametrize("config", [None, *CONFIGS], ids=["embedded-default", *CONFIG_IDS])
def test_every_dag_file_imports_without_errors(config):
    assert set(load_dags(config)) == DAG_IDS


K8S_OPERATORS = "airflow.providers.cncf.kubernetes.operators"
DOCKER_OPERATORS = "airflow.providers.docker.operators"


@pytest.mark.parametrize(
    ("runtime", "config", "unloaded"),
    [
        ("local", "", (K8S_OPERATORS, "kubernetes", DOCKER_OPERATORS, "docker")),
        ("docker", "runtime: docker\n", (K8S_OPERATORS, "kubernetes")),
        ("kubernetes", "values/gke/pipeline.yaml", (DOCKER_OPERATORS, "docker")),
    ],
)
def test_parsing_the_dags_loads_neither_torch_nor_the_stage_modules_nor_another_runtime(
    tmp_path, runtime, config, unloaded
):
    if config.endswith(".yaml"):
        path = ROOT / config
    else:
        path = tmp_path / "pipeline.yaml"
        path.write_text(config or "runtime: local\n")
    code = (
        "import sys; sys.path.insert(0, 'dags');"
        "from genai_dags import local_airflow; local_airflow.configure_for_tests();"
        f"from genai_dags.render_pods import load_dags; load_dags({str(path)!r});"
        f"prefixes = ('torch', 'stages', *{unloaded!r});"
        "bad = sorted(m for m in sys.modules if m in prefixes or m.startswith(tuple(p + '.' for p in prefixes)));"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
class TestPolicy:
    def test_is_never_scheduled_and_never_catches_up(self, local_dags, dag_id):
        dag = local_dags[dag_id]
        assert dag.catchup is False
        if dag_id == "genai_retrain":  # data-aware: genai_monitor's drift events start it
            assert [a.name for a in dag.timetable.asset_condition.objects] == ["genai_drift"]
        else:  # schedule=None (genai_monitor: until monitor.schedule is set): triggered with a conf only
            assert dag.timetable.can_be_scheduled is False

    def test_has_tags_an_owner_and_its_module_docstring_as_doc_md(self, local_dags, dag_id):
        dag = local_dags[dag_id]
        assert "genai" in dag.tags and "local" in dag.tags
        assert dag.owner == "genai-platform"
        doc = Path(dag.fileloc).read_text().split('"""')[1]  # the module docstring
        assert dag.doc_md.strip() == doc.strip()
        assert dag.doc_md.lstrip().startswith(f"# {dag_id}")

    def test_every_stage_task_retries_with_backoff_and_has_a_time_limit(self, local_dags, dag_id):
        for task in local_dags[dag_id].tasks:
            stage = getattr(task, "stage", None) or (task.partial_kwargs.get("stage") if task.is_mapped else None)
            if stage is None:
                continue
            timeout = task.partial_kwargs["execution_timeout"] if task.is_mapped else task.execution_timeout
            retries = task.partial_kwargs["retries"] if task.is_mapped else task.retries
            backoff = (
                task.partial_kwargs["retry_exponential_backoff"] if task.is_mapped else task.retry_exponential_backoff
            )
            assert retries >= 1, task.task_id
            assert backoff > 1, task.task_id
            assert timeout == STAGES[stage].timeout or stage == "train_lora", task.task_id


@pytest.mark.parametrize("dag_id", ["genai_finetune", "genai_batch_inference", "genai_monitor"])
def test_the_plan_task_runs_first(local_dags, dag_id):
    dag = local_dags[dag_id]
    assert not dag.get_task("plan").upstream_task_ids
    assert {t.task_id for t in dag.tasks if not t.upstream_task_ids} == {"plan"}


def test_genai_monitor_runs_on_the_platforms_schedule_for_the_platforms_model(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("monitor: {schedule: '0 6 * * 1', model_name: folio, data_prefix: /data/incoming}\n")
    dag = load_dags(path)["genai_monitor"]
    assert dag.timetable.can_be_scheduled and dag.schedule == "0 6 * * 1"
    assert dag.params["model_name"] == "folio" and dag.params["data_uri"] is None  # a scheduled run has no conf


def test_finetune_runs_the_stages_in_order(local_dags):
    dag = local_dags["genai_finetune"]
    order = ["plan", "tokenize", "train_lora", "evaluate", "quality_gate", "batch_infer", "publish", "promote"]
    for upstream, downstream in itertools.pairwise(order):
        assert upstream in dag.get_task(downstream).upstream_task_ids, (upstream, downstream)
    assert [o.name for o in dag.get_task("publish").outlets] == ["genai_models"]


def test_batch_inference_maps_batch_infer_over_shards(local_dags):
    dag = local_dags["genai_batch_inference"]
    assert dag.get_task("batch_infer").is_mapped
    assert "batch_infer" in dag.get_task("merge_predictions").upstream_task_ids


def test_the_local_config_runs_stages_as_subprocesses_of_this_interpreter(local_dags):
    task = local_dags["genai_finetune"].get_task("train_lora")
    assert type(task).__name__ == "LocalStageOperator"
    assert task.workdir == str(ROOT)


# ---------------------------------------------------------------------------------------------
# Run confs


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_conf_is_valid(local_dags, example):
    conf = json.loads(example.read_text())
    resolved = validate_conf(local_dags[example_dag_id(example)], conf)
    assert resolved["model_name"] == conf["model_name"]


FINETUNE_OK = {
    "model_name": "folio",
    "base_model": "tiny-shakespeare",
    "train_data_uri": "data/folio/",
    "prompts_uri": "examples/prompts/folio-prompts.jsonl",
}
BATCH_OK = {"model_name": "folio", "version": "v1", "prompts_uri": "s3-less/prompts.jsonl"}


def without(conf: dict, key: str) -> dict:
    return {k: v for k, v in conf.items() if k != key}


BAD_CONFS = [
    # (id, dag, conf, words the error must contain)
    (
        "wrong-type",
        "genai_finetune",
        {**FINETUNE_OK, "train": {"max_steps": "many"}},
        ["train", "max_steps", "integer"],
    ),
    ("wrong-type-top", "genai_finetune", {**FINETUNE_OK, "model_name": 7}, ["model_name", "string"]),
    ("unknown-key", "genai_finetune", {**FINETUNE_OK, "trian": {"rank": 4}}, ["unknown key 'trian'", "'train'"]),
    ("unknown-nested-key", "genai_finetune", {**FINETUNE_OK, "train": {"rnk": 4}}, ["train", "rnk"]),
    ("conf-sets-the-image", "genai_finetune", {**FINETUNE_OK, "image": "evil:latest"}, ["unknown key 'image'"]),
    ("conf-sets-the-device", "genai_finetune", {**FINETUNE_OK, "train": {"device": "cuda"}}, ["train", "device"]),
    ("negative-value", "genai_finetune", {**FINETUNE_OK, "train": {"learning_rate": -0.1}}, ["train", "learning_rate"]),
    ("zero-rank", "genai_finetune", {**FINETUNE_OK, "train": {"rank": 0}}, ["train", "rank"]),
    ("out-of-enum", "genai_finetune", {**FINETUNE_OK, "train": {"precision": "fp8"}}, ["train", "precision", "fp8"]),
    ("missing-required", "genai_finetune", without(FINETUNE_OK, "model_name"), ["model_name"]),
    ("missing-required-uri", "genai_finetune", without(FINETUNE_OK, "prompts_uri"), ["prompts_uri"]),
    ("unknown-model-name", "genai_finetune", {**FINETUNE_OK, "base_model": "gpt-17"}, ["base_model", "gpt-17"]),
    ("run-id-traversal", "genai_finetune", {**FINETUNE_OK, "run_id": "../../etc"}, ["run_id", "../../etc"]),
    ("model-name-traversal", "genai_finetune", {**FINETUNE_OK, "model_name": "../models"}, ["model_name"]),
    ("model-name-with-slash", "genai_finetune", {**FINETUNE_OK, "model_name": "a/b"}, ["model_name", "a/b"]),
    ("uri-traversal", "genai_finetune", {**FINETUNE_OK, "train_data_uri": "data/../../etc/passwd"}, ["train_data_uri"]),
    (
        "disallowed-scheme",
        "genai_finetune",
        {**FINETUNE_OK, "prompts_uri": "http://evil.example/p.jsonl"},
        ["prompts_uri", "http://evil.example"],
    ),
    ("version-traversal", "genai_batch_inference", {**BATCH_OK, "version": ".."}, ["version"]),
    ("zero-records-per-shard", "genai_batch_inference", {**BATCH_OK, "records_per_shard": 0}, ["records_per_shard"]),
    ("fan-out-above-platform-cap", "genai_batch_inference", {**BATCH_OK, "max_shards": 1000}, ["max_shards"]),
    (
        "batch-unknown-key",
        "genai_batch_inference",
        {**BATCH_OK, "node_selector": {"a": "b"}},
        ["unknown key 'node_selector'"],
    ),
]


@pytest.mark.parametrize(("dag_id", "conf", "words"), [c[1:] for c in BAD_CONFS], ids=[c[0] for c in BAD_CONFS])
def test_a_bad_conf_is_rejected_before_any_stage_with_the_field_named(local_dags, dag_id, conf, words):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises((ParamValidationError, params.ConfError)) as exc:
        validate_conf(local_dags[dag_id], conf)
    for word in words:
        assert word in str(exc.value), f"{word!r} not in: {exc.value}"


def test_cloud_configs_accept_only_their_own_object_store_scheme():
    gke_dags = load_dags(ROOT / "values/gke/pipeline.yaml")
    dag = gke_dags["genai_finetune"]
    good = {**FINETUNE_OK, "train_data_uri": "gs://bucket/folio/", "prompts_uri": "gs://bucket/prompts.jsonl"}
    validate_conf(dag, good)
    from airflow.sdk.exceptions import ParamValidationError

    for uri in ("file:///etc/passwd", "/etc/passwd", "s3://bucket/x", "data/folio/"):
        with pytest.raises(ParamValidationError, match="train_data_uri"):
            validate_conf(dag, {**good, "train_data_uri": uri})


def test_malformed_conf_json_is_reported_with_its_position(tmp_path):
    from genai_dags import trigger

    bad = tmp_path / "bad.json"
    bad.write_text('{"model_name": "folio",\n "train": {"rank": 4,}}\n')
    with pytest.raises(trigger.ConfFileError, match=r"bad.json: not valid JSON at line 2, column"):
        trigger.load_conf(bad)
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    with pytest.raises(trigger.ConfFileError, match="must hold a JSON object"):
        trigger.load_conf(not_object)


# ---------------------------------------------------------------------------------------------
# Planning: run ids, arguments, shards, the gate


def local_settings() -> settings.PipelineSettings:
    return settings.load_file(ROOT / "values/local/pipeline.yaml")


def resolved(conf: dict, dag_params) -> dict:
    return {**{k: p.value for k, p in dag_params.items()}, **conf}


def test_the_same_conf_gets_the_same_run_id_and_a_changed_conf_a_new_one(local_dags):
    s = local_settings()
    p = local_dags["genai_finetune"].params
    inputs = {"train_data_uri": "0" * 64}
    first = planner.finetune_plan(resolved(FINETUNE_OK, p), s, inputs)
    again = planner.finetune_plan(resolved(dict(reversed(FINETUNE_OK.items())), p), s, inputs)
    changed = planner.finetune_plan(resolved({**FINETUNE_OK, "train": {"rank": 4}}, p), s, inputs)
    new_data = planner.finetune_plan(resolved(FINETUNE_OK, p), s, {"train_data_uri": "1" * 64})
    explicit = planner.finetune_plan(resolved({**FINETUNE_OK, "run_id": "exp-7"}, p), s, inputs)
    assert first["run_id"] == again["run_id"]
    assert first["run_id"].startswith("ft-")
    assert len({first["run_id"], changed["run_id"], new_data["run_id"]}) == 3
    assert explicit["run_id"] == "exp-7"
    assert explicit["version"] == "exp-7" and first["version"] == first["run_id"]


def test_changed_input_files_make_a_new_run_id_and_unchanged_ones_the_same(local_dags, tmp_path):
    s = local_settings()
    data = tmp_path / "folio"
    data.mkdir()
    (data / "a.txt").write_text("Enter Romeo.")
    conf = {**FINETUNE_OK, "train_data_uri": str(data)}
    params_ = local_dags["genai_finetune"].params

    def run_id() -> str:
        inputs = planner.input_fingerprint(planner.finetune_inputs(conf, s))
        return planner.finetune_plan(resolved(conf, params_), s, inputs)["run_id"]

    first = run_id()
    assert run_id() == first
    (data / "b.txt").write_text("Enter Juliet.")
    assert run_id() != first
    fingerprint = planner.input_fingerprint({"base_model": "org/hub-model", "missing": f"file://{tmp_path}/nope"})
    assert fingerprint == {"base_model": "org/hub-model", "missing": "missing"}


def test_plan_resolves_catalog_names_and_plain_paths_and_passes_only_allowed_settings(local_dags):
    s = local_settings()
    conf = {
        **FINETUNE_OK,
        "train": {"rank": 4, "target_modules": ["q_proj", "v_proj"]},
        "inference": {"do_sample": True},
    }
    plan = planner.finetune_plan(resolved(conf, local_dags["genai_finetune"].params), s, {})
    assert f"base_model={s.base_models['tiny-shakespeare']}" in plan["train_lora"]
    assert f"input_uri=file://{ROOT}/data/folio" in plan["tokenize"]
    assert "rank=4" in plan["train_lora"] and "target_modules=q_proj,v_proj" in plan["train_lora"]
    assert "do_sample=true" in plan["batch_infer"]
    for stage_args in (v for k, v in plan.items() if k in STAGES):
        assert stage_args[:2] == [f"artifact_root={s.artifact_root}", f"run_id={plan['run_id']}"]


@pytest.mark.parametrize(
    ("records", "per_shard", "cap", "expected"),
    [(0, 10, 8, 1), (1, 10, 8, 1), (10, 10, 8, 1), (11, 10, 8, 2), (1000, 10, 8, 8), (16, 6, 4, 3)],
)
def test_shard_count_follows_input_size_within_the_fan_out_cap(records, per_shard, cap, expected):
    assert planner.shard_count(records, per_shard, cap) == expected


def test_counting_records_streams_newlines_of_a_file_folder_or_glob(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    (tmp_path / "b.jsonl").write_text('{"id": 3}\n{"id": 4}')  # no final newline
    assert planner.count_records(str(tmp_path / "a.jsonl")) == 2
    assert planner.count_records(f"file://{tmp_path}/*.jsonl") == 4
    assert planner.count_records(str(tmp_path)) == 4
    with pytest.raises(planner.PlanError, match="prompts_uri="):
        planner.count_records(str(tmp_path / "missing.jsonl"))


def test_batch_plan_gives_every_shard_its_index_and_the_merge_the_count():
    s = local_settings()
    conf = {**BATCH_OK, "records_per_shard": 6, "max_shards": 4, "run_id": None, "inference": {}}
    plan = planner.batch_plan(conf, s, {"x": "y"}, {"base_model": "file:///m"}, records=16)
    assert plan["num_shards"] == 3
    assert [a[-2:] for a in plan["batch_infer"]] == [[f"shard_index={i}", "num_shards=3"] for i in range(3)]
    assert f"adapter_uri={s.artifact_root}/models/folio/v1" in plan["batch_infer"][0]
    assert plan["merge_predictions"][-1] == "num_shards=3"


def test_a_model_that_is_not_published_is_refused_by_name(tmp_path):
    s = settings.parse({"artifact_root": str(tmp_path)}, "test")
    with pytest.raises(planner.PlanError, match=r"model_name='folio' version='v1' is not published"):
        planner.read_published(s, "folio", "v1")


@pytest.mark.parametrize(
    ("evaluation", "error"),
    [
        ({"metrics": {"quality_gate": {"passed": True, "reason": "word_perplexity improved 9%"}}}, None),
        (
            {"metrics": {"quality_gate": {"passed": False, "reason": "word_perplexity improved 0.1% (< 2%)"}}},
            r"quality gate failed: word_perplexity improved 0.1% \(< 2%\)",
        ),
        ({"metrics": {}}, "no metrics.quality_gate"),
        (None, "no metrics.quality_gate"),
    ],
)
def test_the_quality_gate_passes_or_stops_with_the_reason(evaluation, error):
    if error is None:
        assert "improved" in planner.check_quality_gate(evaluation)
    else:
        with pytest.raises(planner.GateFailed, match=error):
            planner.check_quality_gate(evaluation)


# ---------------------------------------------------------------------------------------------
# The platform config file


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_every_shipped_config_loads_and_starts_with_a_header_comment(path):
    loaded = settings.load_file(path)
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("# ") and "Used by:" in header and "Override:" in header
    if path.parent.name == "local":
        assert loaded.runtime == "local" and loaded.artifact_root == f"file://{ROOT}/artifacts"
    else:
        assert loaded.runtime == "kubernetes"
        assert loaded.allowed_uri_schemes == (loaded.artifact_root.split("://")[0],)
        assert loaded.kubernetes.node_pools["gpu-spot"].node_selector
        assert loaded.kubernetes.node_pools["gpu-on-demand"].node_selector


def test_the_embedded_default_is_the_local_config_without_a_file(monkeypatch):
    monkeypatch.delenv(settings.ENV_VAR, raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_GENAI_PIPELINE_CONFIG", raising=False)
    default = settings.load_settings()
    local = local_settings()
    assert default.source == "embedded default"
    assert (default.runtime, default.artifact_root, default.base_models) == (
        local.runtime,
        local.artifact_root,
        local.base_models,
    )


def test_the_config_is_found_through_the_env_path_then_the_airflow_variable(monkeypatch, tmp_path):
    gke = ROOT / "values/gke/pipeline.yaml"
    monkeypatch.delenv(settings.ENV_VAR, raising=False)
    monkeypatch.setenv("AIRFLOW_VAR_GENAI_PIPELINE_CONFIG", gke.read_text())  # the YAML itself
    assert settings.load_settings().artifact_root == "gs://my-genai-artifacts/genai"
    monkeypatch.setenv("AIRFLOW_VAR_GENAI_PIPELINE_CONFIG", str(ROOT / "values/eks/pipeline.yaml"))  # a path
    assert settings.load_settings().artifact_root == "s3://my-genai-artifacts/genai"
    monkeypatch.setenv(settings.ENV_VAR, str(ROOT / "values/aks/pipeline.yaml"))  # the env path wins
    assert settings.load_settings().artifact_root.startswith("abfs://")


def test_the_config_reference_in_the_dags_readme_is_generated_from_the_settings_model():
    readme = (ROOT / "dags/README.md").read_text()
    assert settings.reference() in readme, "run: PYTHONPATH=dags python -m genai_dags.settings reference"


def test_the_json_schema_of_the_settings_model_accepts_every_shipped_config_and_refuses_unknown_keys():
    import jsonschema
    import yaml

    schema = settings.PipelineSettings.model_json_schema()
    for path in CONFIGS:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError, match="artifact_roots"):
        jsonschema.validate({"artifact_roots": "/x"}, schema)


def test_the_readme_vocabulary_table_names_each_stages_image_and_conf_group_as_the_stage_table_does():
    readme = (ROOT / "README.md").read_text()
    rows = readme.split("<!-- stage vocabulary:")[1].split("\n\n")[0].splitlines()[3:]
    table = {
        cells[0]: (cells[1], cells[2]) for cells in ([c.strip(" `") for c in r.strip("|").split("|")] for r in rows)
    }
    assert table == {name: (spec.image, spec.conf_group or "-") for name, spec in STAGES.items()}


BAD_CONFIGS = [
    (
        "unknown-key",
        "runtime: local\nartifact_roots: /x\n",
        "artifact_roots: unknown key (did you mean 'artifact_root'?)",
    ),
    (
        "unknown-runtime",
        "runtime: docker-swarm\n",
        "runtime: Input should be 'local', 'kubernetes' or 'docker' (got 'docker-swarm')",
    ),
    ("wrong-type", "retries: three\n", "retries: Input should be a valid integer"),
    (
        "nested-unknown-key",
        "kubernetes: {nodepools: {}}\n",
        "kubernetes.nodepools: unknown key (did you mean 'node_pools'?)",
    ),
    (
        "bad-toleration",
        "kubernetes:\n  node_pools:\n    gpu-spot:\n      tolerations: [{key: a, operator: Equal, "
        "effect: NoSchedul}]\n",
        "kubernetes.node_pools.gpu-spot.tolerations[0].effect: Input should be 'NoSchedule'",
    ),
    ("unknown-node-pool", "kubernetes: {node_pools: {gpu-cheap: {}}}\n", "kubernetes.node_pools.gpu-cheap: Input"),
    ("bad-quantity", "stages: {train_lora: {memory: lots}}\n", "stages.train_lora.memory: String should match pattern"),
    ("unknown-stage", "stages: {train: {gpu: 1}}\n", "stages.train: Input should be 'tokenize'"),
    ("bad-scheme", "artifact_root: ftp://host/x\n", "artifact_root='ftp://host/x' uses scheme 'ftp'"),
    ("kubernetes-on-local-disk", "runtime: kubernetes\nartifact_root: /data\n", "needs shared object storage"),
    (
        "volume-claim-with-object-storage",
        "runtime: kubernetes\nartifact_root: s3://b/x\nkubernetes: {artifact_volume_claim: shared}\n",
        "kubernetes.artifact_volume_claim='shared' mounts a volume at artifact_root's path",
    ),
    (
        "kubernetes-without-spot-selector",
        "runtime: kubernetes\nartifact_root: s3://b/x\n",
        "kubernetes.node_pools.gpu-spot.node_selector is empty",
    ),
    (
        "smtp-without-recipients",
        "notifications: {smtp: {conn_id: smtp_default}}\n",
        "notifications.smtp.to: Field required",
    ),
    (
        "drift-ratio-of-one",
        "monitor: {max_perplexity_ratio: 1}\n",
        "monitor.max_perplexity_ratio: Input should be greater than 1",
    ),
    (
        "divergence-above-one",
        "monitor: {max_token_divergence: 1.5}\n",
        "monitor.max_token_divergence: Input should be less than or equal to 1",
    ),
    ("bad-schedule", "monitor: {schedule: sometimes}\n", "monitor.schedule: Value error, 'sometimes' is neither"),
    ("not-a-mapping", "- runtime: local\n", "must be a mapping"),
    ("invalid-yaml", "runtime: [local\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_a_bad_config_file_is_refused_with_the_key_named(tmp_path, text, message):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(settings.ConfigError) as exc:
        settings.load_file(path)
    assert message in str(exc.value)
    assert str(path) in str(exc.value)


def test_a_bad_config_is_an_import_error_of_the_dags_not_a_silent_default(tmp_path):
    from airflow.dag_processing.dagbag import BundleDagBag

    path = tmp_path / "pipeline.yaml"
    path.write_text("runtime: kubernetes\nartifact_root: /data\n")
    with pipeline_config(path):
        bag = BundleDagBag(dag_folder=str(ROOT / "dags"), bundle_path=str(ROOT / "dags"), bundle_name="t")
    assert set(bag.import_errors) == {f"{dag_id}.py" for dag_id in DAG_IDS}
    assert all("needs shared object storage" in e for e in bag.import_errors.values())


# ---------------------------------------------------------------------------------------------
# Through Airflow: a bad conf never starts a stage


@pytest.mark.integration
def test_airflow_refuses_to_create_a_run_for_a_conf_that_fails_its_params():
    from airflow.sdk.exceptions import ParamValidationError

    local_airflow.migrate()
    with pytest.raises(ParamValidationError, match="base_model"):
        local_airflow.run_dag(
            "genai_finetune", {**FINETUNE_OK, "base_model": "gpt-17"}, ROOT / "values/local/pipeline.yaml"
        )


@pytest.mark.integration
def test_an_unknown_key_fails_the_plan_task_and_no_stage_task_starts():
    local_airflow.migrate()
    run = local_airflow.run_dag("genai_finetune", {**FINETUNE_OK, "trian": {}}, ROOT / "values/local/pipeline.yaml")
    states = local_airflow.task_states(run)
    assert str(run.state) == "failed"
    assert states.pop("plan") == "failed"
    assert set(states.values()) == {"upstream_failed"}
    # A bad conf stays bad: failed on the first try although the config allows a retry.
    from airflow.utils.session import create_session

    with create_session() as session:
        (plan,) = [ti for ti in run.get_task_instances(session=session) if ti.task_id == "plan"]
        assert (plan.try_number, plan.max_tries) == (1, 1)


@pytest.mark.integration
def test_without_a_passed_gate_neither_inference_nor_publication_runs(tmp_path):
    """Wiring check: the gate sees no verdict (evaluate is marked done without running) and stops the run."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"artifact_root: {tmp_path}\nretries: 0\nbase_models: {{tiny: {tmp_path}/base}}\n")
    local_airflow.migrate()
    dag = local_airflow.load_dag("genai_finetune", config)
    with pipeline_config(config):
        run = dag.test(
            run_conf={**FINETUNE_OK, "base_model": "tiny"}, mark_success_pattern="tokenize|train_lora|evaluate"
        )
    states = local_airflow.task_states(run)
    assert states["quality_gate"] == "failed"
    assert states["batch_infer"] == states["publish"] == "upstream_failed"
    assert not (tmp_path / "models").exists()


def test_trigger_exchanges_credentials_for_a_token_and_posts_the_conf(monkeypatch, tmp_path, capsys):
    """The REST client against a stand-in API server speaking Airflow 3's endpoints."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from genai_dags import trigger

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, code, payload):
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(("POST", self.path, self.headers.get("Authorization"), body))
            if self.path == "/auth/token":
                return self._reply(201, {"access_token": "t0k3n"})
            if body["conf"].get("model_name") == "bad":
                return self._reply(400, {"detail": "Invalid input for param model_name: 'bad' is wrong"})
            return self._reply(200, {"dag_run_id": "manual__2026-01-01T00:00:00+00:00", "state": "queued"})

        def do_GET(self):
            seen.append(("GET", self.path, self.headers.get("Authorization"), None))
            if self.path.endswith("/taskInstances?limit=1000"):
                tis = [("plan", -1, "success", 1), ("train_lora", -1, "failed", 4), ("publish", -1, "skipped", 0)]
                keys = ("task_id", "map_index", "state", "try_number")
                return self._reply(200, {"task_instances": [dict(zip(keys, ti, strict=True)) for ti in tis]})
            if "/dagRuns/" in self.path:  # the run, polled by --wait
                return self._reply(200, {"state": "failed"})
            self._reply(200, {"dag_id": "genai_finetune", "is_paused": False})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.delenv("AIRFLOW_TOKEN", raising=False)
    monkeypatch.setenv("AIRFLOW_USERNAME", "admin")
    monkeypatch.setenv("AIRFLOW_PASSWORD", "secret")
    try:
        conf_file = ROOT / "examples/finetune-demo.json"
        assert trigger.main([str(conf_file), "--url", url]) == 0
        out = capsys.readouterr().out
        assert "triggered genai_finetune run manual__2026-01-01T00:00:00+00:00" in out
        assert f"{url}/dags/genai_finetune/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00" in out
        assert seen[0] == ("POST", "/auth/token", None, {"username": "admin", "password": "secret"})
        method, path, auth, body = seen[-1]
        assert (method, path, auth) == ("POST", "/api/v2/dags/genai_finetune/dagRuns", "Bearer t0k3n")
        assert body == {"logical_date": None, "conf": json.loads(conf_file.read_text())}

        assert trigger.main([str(conf_file), "--url", url, "--wait"]) == 1  # the run failed
        out = capsys.readouterr().out
        assert "  train_lora: failed (try 4)" in out and "run manual__2026-01-01T00:00:00+00:00: failed" in out
        assert seen[-2][1] == "/api/v2/dags/genai_finetune/dagRuns/manual__2026-01-01T00%3A00%3A00%2B00%3A00"

        bad = tmp_path / "bad.json"
        bad.write_text('{"model_name": "bad"}')
        assert trigger.main([str(bad), "--url", url]) == 2
        assert "HTTP 400: Invalid input for param model_name" in capsys.readouterr().err
    finally:
        server.shutdown()
