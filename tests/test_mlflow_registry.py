"""MLflow as a second model registry (genai_dags/mlflow_registry.py), against a real MLflow tracking server.

    .venv/bin/python -m pytest tests/test_mlflow_registry.py -q

The server is the full ``mlflow`` package at the client's version, in its own virtual environment
(build/mlflow-venv, made by `make install`), started on a free port on 127.0.0.1 with a SQLite store and a
throw-away artifact root. Without that environment the tests that need it skip, unless GENAI_REQUIRE_MLFLOW=1
(CI), where they fail. The artifact root is fsspec's in-memory filesystem standing in for object storage:
MLflow's server refuses a local path as a model version's source (the settings refuse that combination).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import fsspec
import pytest
import yaml

from genai_dags import mlflow_registry, registry, settings
from genai_dags.mlflow_registry import MlflowRegistry

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_VENV = ROOT / "build" / "mlflow-venv"
NAME = "folio-lora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1: its URL."""
    version = metadata.version("mlflow-skinny")
    server = MLFLOW_VENV / "bin" / "mlflow"
    if not (MLFLOW_VENV / f".mlflow-{version}").is_file() or not server.is_file():
        why = f"no MLflow {version} server in {MLFLOW_VENV.relative_to(ROOT)} (make install builds it)"
        if os.environ.get("GENAI_REQUIRE_MLFLOW") == "1":
            pytest.fail(f"GENAI_REQUIRE_MLFLOW=1 but {why}")
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV", "PYTHONPATH"))}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [server, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--default-artifact-root", str(folder / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError(f"mlflow server not ready in 90 s:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(autouse=True)
def short_http(monkeypatch):
    """A server that does not answer fails the call at once (the module's own defaults retry for seconds)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture
def root() -> Iterator[str]:
    """An empty artifact root of this test's own."""
    uri = f"memory:///genai-{uuid.uuid4().hex[:12]}"
    yield uri
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def publish(root: str, version: str, word_perplexity: float) -> str:
    """A published version as stages.publish leaves it: adapter, evaluation/metrics.json, lineage.json, manifest."""
    uri = registry.version_uri(root, NAME, version)
    run_id = f"ft-{version}"
    lineage = {
        "model_name": NAME,
        "version": version,
        "run_id": run_id,
        "base_model": "s3://models/base-tiny",
        "base_model_sha256": "ab" * 32,
        "quality_gate": {"metric": "word_perplexity", "passed": True, "threshold": 0.02},
        "stages": {
            stage: {"cache_key": f"{stage}-{version}-key", "code": {"source_sha256": f"{stage}-code"}}
            for stage in ("tokenize", "train_lora", "evaluate")
        },
        "images": [],
    }
    metrics = {
        "adapted": {"word_perplexity": word_perplexity},
        "base": {"word_perplexity": 100.0},
        "quality_gate": {"passed": True, "value": 0.5, "reason": "improved"},
        "task": "causal_lm",
    }
    files = {
        "adapter/adapter_config.json": {"r": 8},
        "evaluation/metrics.json": metrics,
        "lineage.json": lineage,
        "manifest.json": {"stage": "publish"},
    }
    fs, path = fsspec.core.url_to_fs(uri)
    for rel, content in files.items():
        fs.pipe_file(f"{path}/{rel}", json.dumps(content).encode())
    return uri


def evaluation(champion_uri: str | None = None, passed: bool = True) -> dict:
    """evaluate's metrics, as promotion reads them (as in tests/test_registry.py)."""
    metrics = {"quality_gate": {"passed": True, "reason": "word_perplexity improved 12.0% (>= 2.0% required)"}}
    if champion_uri:
        reason = "over the champion, word_perplexity improved 3.0%" if passed else "word_perplexity got worse by 1.0%"
        metrics["champion"] = {"uri": champion_uri, "passed": passed, "reason": reason, "metric": "word_perplexity"}
    return metrics


def model_versions(url: str, root: str) -> dict[str, dict]:
    """The model's MLflow versions from this artifact root, by our version: number, source, run's metrics and params,
    tags (the tests share one server)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    found = {}
    for v in client.search_model_versions(f"name = '{NAME}'"):
        if not v.source.startswith(f"{root}/"):
            continue
        run = client.get_run(v.run_id)
        found[v.tags["genai.version"]] = {
            "number": v.version, "source": v.source, "tags": v.tags,
            "metrics": run.data.metrics, "params": run.data.params,
        }  # fmt: skip
    return found


def decision_of(root: str, version: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(f"{registry.model_uri(root, NAME)}/decisions/{version}.json")
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def test_promotion_registers_every_version_in_mlflow_and_moves_its_champion_alias_with_ours(mlflow_server, root):
    mlflow = MlflowRegistry(mlflow_server, "genai-finetune")
    v1 = publish(root, "v1", 60.0)
    v2 = publish(root, "v2", 50.0)
    publish(root, "v3", 55.0)

    first = mlflow_registry.promote(root, NAME, "v1", evaluation(), "ft-v1", mlflow)
    assert first["decision"] == "promoted"
    assert mlflow.alias_version(NAME, "champion") == model_versions(mlflow_server, root)["v1"]["number"]

    winner = mlflow_registry.promote(root, NAME, "v2", evaluation(v1, passed=True), "ft-v2", mlflow)
    loser = mlflow_registry.promote(root, NAME, "v3", evaluation(v2, passed=False), "ft-v3", mlflow)
    retried = mlflow_registry.promote(root, NAME, "v2", evaluation(v1, passed=True), "ft-v2", mlflow)  # a retry
    assert (winner["decision"], loser["decision"], retried["decision"]) == ("promoted", "rejected", "already")

    versions = model_versions(mlflow_server, root)
    assert sorted(versions) == ["v1", "v2", "v3"]  # the retry registered nothing again
    for version, v in versions.items():
        assert v["source"] == f"{registry.version_uri(root, NAME, version)}/adapter"
        assert v["tags"]["genai.run_id"] == f"ft-{version}"
        assert v["tags"]["genai.train_lora.cache_key"] == f"train_lora-{version}-key"
        assert v["params"]["run_id"] == f"ft-{version}" and v["params"]["base_model"] == "s3://models/base-tiny"
        assert v["params"]["stages.train_lora.code.source_sha256"] == "train_lora-code"
        assert v["metrics"]["base.word_perplexity"] == 100.0
    assert [versions[v]["metrics"]["adapted.word_perplexity"] for v in ("v1", "v2", "v3")] == [60.0, 50.0, 55.0]
    assert [versions[v]["tags"]["genai.decision"] for v in ("v1", "v2", "v3")] == ["promoted", "promoted", "rejected"]

    assert registry.read_alias(root, NAME, "champion").version == "v2"
    assert mlflow.alias_version(NAME, "champion") == versions["v2"]["number"]


def test_a_rollback_moves_both_aliases_and_registers_a_version_mlflow_never_saw(mlflow_server, root):
    mlflow = MlflowRegistry(mlflow_server, "genai-finetune")
    v1 = publish(root, "v1", 60.0)
    publish(root, "v2", 50.0)
    mlflow_registry.promote(root, NAME, "v1", evaluation(), "ft-v1", None)  # before MLflow was configured
    mlflow_registry.promote(root, NAME, "v2", evaluation(v1), "ft-v2", mlflow)
    assert sorted(model_versions(mlflow_server, root)) == ["v2"]

    decision = mlflow_registry.move_by_hand(root, NAME, "v1", "champion", "rollback: v2 regressed", "manual-1", mlflow)
    assert decision["decision"] == "promoted" and decision["previous"] == "v2"
    assert registry.read_alias(root, NAME, "champion").version == "v1"
    versions = model_versions(mlflow_server, root)
    assert mlflow.alias_version(NAME, "champion") == versions["v1"]["number"]
    assert versions["v1"]["tags"]["genai.decision_reason"] == "rollback: v2 regressed"

    with pytest.raises(registry.RegistryError, match="reserved by MLflow"):
        mlflow_registry.move_by_hand(root, NAME, "v2", "v2", "an alias MLflow cannot take", "manual-2", mlflow)
    assert registry.read_alias(root, NAME, "v2") is None


def test_a_registry_that_does_not_answer_fails_in_one_line_naming_it_and_moves_nothing_of_ours(root):
    down = MlflowRegistry(f"http://127.0.0.1:{free_port()}", "genai-finetune")  # nothing listens there
    v1 = publish(root, "v1", 60.0)
    publish(root, "v2", 50.0)
    mlflow_registry.promote(root, NAME, "v1", evaluation(), "ft-v1", None)

    started = time.monotonic()
    for attempt in (
        lambda: mlflow_registry.promote(root, NAME, "v2", evaluation(v1), "ft-v2", down),
        lambda: mlflow_registry.move_by_hand(root, NAME, "v2", "champion", "by hand", "manual-1", down),
    ):
        with pytest.raises(mlflow_registry.MlflowRegistryError) as failed:
            attempt()
        message = str(failed.value)
        assert failed.value.retryable and "\n" not in message and len(message) < 300, message
        assert message.startswith(f"MLflow registry {down.tracking_uri}: registering {NAME} v2 failed: no answer")
    assert time.monotonic() - started < 10

    champion = registry.read_alias(root, NAME, "champion")
    assert (champion.number, champion.version) == (1, "v1")
    assert decision_of(root, "v2") is None


def config(tracking_uri: str, artifact_root: str = "s3://bucket/genai") -> dict:
    return {
        "artifact_root": artifact_root,
        "allowed_uri_schemes": ["s3"],
        "registry": {"mlflow": {"tracking_uri": tracking_uri}},
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (config("http://alice:s3cret@mlflow:5000"), "registry.mlflow.tracking_uri: Value error, holds credentials"),
        (config("https://token@mlflow.example.com"), "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        (config("databricks"), "registry.mlflow.tracking_uri: Value error, must be an http:// or https:// URL"),
        (config("file:///tmp/mlruns"), "registry.mlflow.tracking_uri: Value error, must be an http:// or https://"),
        (config("http://mlflow:5000", "/tmp/artifacts"), "refuses a local path as a model version's source"),
    ],
    ids=["user-and-password", "token", "databricks", "file", "local-artifact-root"],
)
def test_the_settings_refuse_credentials_in_the_tracking_uri_and_what_mlflow_could_not_register(data, message):
    with pytest.raises(settings.ConfigError) as refused:
        settings.parse(data, source="test")
    assert message in str(refused.value)
    assert "s3cret" not in str(refused.value) and "token@" not in str(refused.value)


def test_mlflow_is_off_by_default_and_on_with_a_plain_tracking_uri():
    default = settings.parse(yaml.safe_load(settings.DEFAULT_CONFIG_YAML), "embedded default")
    assert mlflow_registry.from_settings(default) is None
    on = mlflow_registry.from_settings(settings.parse(config("http://mlflow.mlflow.svc:5000/"), "test"))
    assert on == MlflowRegistry("http://mlflow.mlflow.svc:5000", "genai-finetune")
