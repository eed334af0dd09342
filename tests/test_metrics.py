"""Stage metrics: pushed to a real Pushgateway, scraped by a real Prometheus, graphed by the shipped dashboard.

    .venv/bin/python -m pytest tests/test_metrics.py -q

The Pushgateway and Prometheus are Debian's (`apt-get install prometheus prometheus-pushgateway`, as
.ci/run does), started on free ports on 127.0.0.1 with throw-away data. Without them the tests that need
them skip, unless GENAI_REQUIRE_PROMETHEUS=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.core import telemetry
from tests.conftest import ROOT, run_stage_cli

DASHBOARD = ROOT / "docs" / "grafana" / "genai-stages.json"
BINARIES = {"prometheus": "prometheus", "pushgateway": "prometheus-pushgateway"}
TRAIN = ["max_steps=4", "log_every=2", "batch_size=4", "checkpoint_every=100", "learning_rate=2e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} not ready in 30 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A Pushgateway and a Prometheus that scrapes it every second: {"pushgateway": url, "prometheus": url}."""
    missing = [name for name in BINARIES.values() if shutil.which(name) is None]
    if missing:
        if os.environ.get("GENAI_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"GENAI_REQUIRE_PROMETHEUS=1 but {', '.join(missing)} not on PATH")
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install prometheus prometheus-pushgateway)")
    folder = tmp_path_factory.mktemp("prometheus")
    gateway, server = free_port(), free_port()
    (folder / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: pushgateway\n"
        "    honor_labels: true\n"  # keep the pushed job/run_id/stage labels, as a real setup must
        f"    static_configs: [{{targets: ['127.0.0.1:{gateway}']}}]\n"
    )
    commands = {
        "pushgateway": [BINARIES["pushgateway"], f"--web.listen-address=127.0.0.1:{gateway}"],
        "prometheus": [
            BINARIES["prometheus"],
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{server}",
        ],
    }
    urls = {"pushgateway": f"http://127.0.0.1:{gateway}", "prometheus": f"http://127.0.0.1:{server}"}
    procs = {}
    try:
        for name, command in commands.items():
            log = folder / f"{name}.log"
            with log.open("w") as out:
                procs[name] = subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT)
            wait_ready(f"{urls[name]}/-/ready", procs[name], log)
        yield urls
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def query(prometheus_url: str, promql: str) -> dict:
    return get_json(f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))


def series(prometheus_url: str, run_id: str, wanted: set[str]) -> dict[str, list[dict]]:
    """{name: [result, ...]} of the run's genai_* series, once every wanted name has been scraped."""
    deadline = time.time() + 30
    while True:
        found: dict[str, list[dict]] = {}
        for result in query(prometheus_url, f'{{__name__=~"genai_.+", run_id="{run_id}"}}')["data"]["result"]:
            found.setdefault(result["metric"]["__name__"], []).append(result)
        if wanted <= found.keys() or time.time() > deadline:
            return found
        time.sleep(0.5)


def train(run: dict, run_id: str, **env: str) -> subprocess.CompletedProcess:
    root = run["artifact_root"]
    args = [f"artifact_root={root}", f"run_id={run_id}", f"base_model={run['base_model']}",
            f"dataset_uri={root}/runs/ft/tokenize", *TRAIN]  # fmt: skip
    return run_stage_cli("train_lora", *args, env={**os.environ, **env})


@pytest.mark.integration
def test_train_lora_metrics_reach_prometheus_with_the_runs_labels(finetune_run, prometheus):
    started = time.time()
    train(finetune_run, "metrics", STAGE_METRICS_PUSHGATEWAY=prometheus["pushgateway"])
    train_seconds = time.time() - started
    wanted = {
        "genai_train_step",
        "genai_train_loss",
        "genai_train_learning_rate",
        "genai_train_tokens_per_second",
        "genai_train_step_seconds",
        "genai_stage_duration_seconds",
        "genai_stage_tokens_per_second",
    }
    found = series(prometheus["prometheus"], "metrics", wanted)
    print(f"train_lora {train_seconds:.1f}s; Prometheus:")
    for name in sorted(found):
        for result in found[name]:
            print(f"  {name}{json.dumps(result['metric'], sort_keys=True)} = {result['value'][1]}")
    assert wanted <= found.keys(), sorted(found)
    assert found.keys() <= telemetry.SERIES.keys(), "every pushed series is declared (and so may be graphed)"
    for results in found.values():
        for result in results:
            labels = result["metric"]
            assert labels["job"] == "genai_stage" and labels["stage"] == "train_lora", labels
            assert set(labels) <= {"__name__", "job", "instance", "run_id", "stage", "status"}, labels
    assert float(found["genai_train_step"][0]["value"][1]) == 4  # the last step is always pushed
    assert float(found["genai_train_loss"][0]["value"][1]) > 0
    assert float(found["genai_train_tokens_per_second"][0]["value"][1]) > 0
    duration = found["genai_stage_duration_seconds"]
    assert [r["metric"]["status"] for r in duration] == ["done"]
    assert 0 < float(duration[0]["value"][1]) <= train_seconds

    # Every query of the shipped dashboard is valid PromQL, and the training panels show this run.
    for expr in dashboard_queries():
        result = query(prometheus["prometheus"], expr.replace("$run_id", "metrics"))
        assert result["status"] == "success", (expr, result)
        if "genai_train_" in expr and "gpu" not in expr:
            assert result["data"]["result"], expr


@pytest.mark.integration
def test_an_unreachable_pushgateway_never_fails_a_stage_and_warns_once(finetune_run):
    # Nothing listens on the port; the password must never reach a log line.
    url = f"http://ci-user:s3cret-token@127.0.0.1:{free_port()}"
    proc = train(finetune_run, "metrics-down", STAGE_METRICS_PUSHGATEWAY=url)
    assert proc.returncode == 0
    warnings = [line for line in proc.stderr.splitlines() if "could not push" in line]
    assert len(warnings) == 1, warnings
    assert "WARNING" in warnings[0] and "the stage goes on" in warnings[0]
    assert "s3cret-token" not in proc.stderr + proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["stage"] == "train_lora"


# ---- fast: the push itself, and the dashboard ------------------------------------------------------


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def metric_names(promql: str) -> set[str]:
    """The genai_ series a query names (label values, such as job="genai_stage", are not series)."""
    return set(re.findall(r"\bgenai_[a-z0-9_]+", re.sub(r'"[^"]*"', '""', promql)))


def test_the_dashboard_graphs_only_series_the_stages_push():
    board = json.loads(DASHBOARD.read_text())
    assert board["panels"] and board["uid"]
    names = set()
    for expr in dashboard_queries():
        used = metric_names(expr)
        assert used, f"a panel query names no genai_ series: {expr}"
        names |= used
    for variable in board["templating"]["list"]:
        definition = variable.get("query")
        names |= metric_names(definition["query"] if isinstance(definition, dict) else "")
    assert names <= telemetry.SERIES.keys(), sorted(names - telemetry.SERIES.keys())
    assert {"genai_train_loss", "genai_train_tokens_per_second", "genai_run_cost"} <= names


def test_gpu_utilisation_is_left_out_where_nvml_cannot_tell_it():
    import torch

    from stages.core import telemetry

    # No NVML here (no driver; nvidia-ml-py only in the CUDA images): no value, and no exception for the trainer.
    assert telemetry.gpu_utilization(torch.device("cuda", 0)) is None


def test_nothing_is_sent_without_an_endpoint(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no endpoint configured: nothing may be sent")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert telemetry.push({"run_id": "r", "stage": "s"}, {"genai_train_loss": 1.0}, environ={}) is False


def test_the_push_is_the_pushgateways_text_format_under_the_runs_group(monkeypatch):
    sent = []

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b""

    def capture(request, timeout):
        sent.append((request, timeout))
        return Response()

    monkeypatch.setattr(urllib.request, "urlopen", capture)
    environ = {telemetry.PUSHGATEWAY_ENV: "http://user:pw@gateway.example:9091/prefix/"}
    group = {"run_id": "exp-1", "stage": "publish", "model_name": "folio"}
    values = {"genai_run_cost": ({"currency": "USD"}, 0.25), "genai_train_loss": float("nan"), "skip": None}
    assert telemetry.push(group, values, environ=environ)
    request, timeout = sent[0]
    assert timeout <= 3
    assert request.method == "POST"  # only the same-named series of the group are replaced
    assert request.full_url == (
        "http://gateway.example:9091/prefix/metrics/job/genai_stage/run_id/exp-1/stage/publish/model_name/folio"
    )
    assert request.get_header("Authorization") == "Basic dXNlcjpwdw=="
    body = request.data.decode()
    assert 'genai_run_cost{currency="USD"} 0.25' in body and "# TYPE genai_run_cost gauge" in body
    assert "nan" not in body and "skip" not in body
    assert telemetry._path_label("run_id", "a/b") == "run_id@base64/YS9i"


def test_every_runtime_passes_the_pushgateway_to_its_stages_only_when_configured(tmp_path):
    from genai_dags import docker_operator, local_operator, render_pods, settings
    from genai_dags.stage_contract import METRICS_ENV

    assert METRICS_ENV == telemetry.PUSHGATEWAY_ENV
    url = "http://pushgateway.monitoring:9091"
    plain = ROOT / "values/gke/pipeline.yaml"
    with_metrics = tmp_path / "pipeline.yaml"
    with_metrics.write_text(plain.read_text() + f"metrics: {{pushgateway_url: '{url}'}}\n")

    def pod_env(config: Path) -> dict[str, str]:
        pod = render_pods.render_all(config, try_number=1)["genai_finetune.train_lora"]
        (base,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
        return {e["name"]: e.get("value") for e in base["env"]}

    assert pod_env(with_metrics)[METRICS_ENV] == url
    assert METRICS_ENV not in pod_env(plain)
    for config, expected in ((with_metrics, url), (plain, None)):
        s = settings.load_file(config)
        stage = s.stage("tokenize")
        assert docker_operator.docker_kwargs(stage, s)["environment"].get(METRICS_ENV) == expected
        assert (local_operator.local_kwargs(stage, s)["pushgateway_url"] or None) == expected
    with pytest.raises(settings.ConfigError, match=r"metrics\.pushgateway_url"):
        settings.parse({"metrics": {"pushgateway_url": "pushgateway:9091"}}, "test")


def test_the_runner_pushes_the_attempts_duration_and_publishs_run_cost(monkeypatch):
    from types import SimpleNamespace

    from stages.core import runner

    pushed = []
    monkeypatch.setattr(telemetry, "push", lambda group, values: pushed.append((group, values)))
    attempt = SimpleNamespace(finish=lambda status, code: None, record={"seconds": 12.5})
    config = SimpleNamespace(run_id="exp-1", model_name="folio")
    cost = {"currency": "EUR", "total": 0.3, "on_demand": 0.9, "seconds": 1800.0, "stages": {}}
    runner._finish(attempt, "done", 0, "publish", config, {"cost": cost, "model_name": "folio"})
    group, values = pushed[0]
    assert group == {"run_id": "exp-1", "stage": "publish", "model_name": "folio"}
    assert values["genai_stage_duration_seconds"] == ({"status": "done"}, 12.5)
    assert values["genai_run_cost"] == ({"currency": "EUR"}, 0.3)
    assert values["genai_run_on_demand_cost"] == ({"currency": "EUR"}, 0.9)
    assert values["genai_run_duration_seconds"] == 1800.0
    assert set(values) <= telemetry.SERIES.keys()
    body = telemetry.exposition(values)
    assert 'genai_run_cost{currency="EUR"} 0.3' in body and "genai_stage_tokens_per_second" not in body
