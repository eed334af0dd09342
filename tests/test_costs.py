"""What a run cost: attempt records, their arithmetic, the price table and the plan's estimate.

    .venv/bin/python -m pytest tests/test_costs.py

The end-to-end check (publish's cost.json and ``make costs`` after a real DAG run) is in
tests/test_finetune_e2e.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from genai_dags import cost_estimate, render_pods, settings
from stages.core import costs, manifest
from tests.test_contract import run_echo

ROOT = Path(__file__).resolve().parents[1]
PRICES = (
    "costs:\n  currency: EUR\n  prices:\n"
    "    cpu: {on_demand: 0.05, spot: 0.01}\n"
    "    gpu-spot: {on_demand: 0.9, spot: 0.3}\n"
    "    gpu-on-demand: {on_demand: 1.0}\n"
    "  train_tokens_per_second: {gpu-spot: 1000, gpu-on-demand: 1000}\n"
)


def record(stage: str, seconds: float, status: str = "done", **resources) -> dict:
    return {
        "attempt": f"{stage}-{seconds}",
        "stage": stage,
        "seconds": seconds,
        "status": status,
        "resources": resources,
    }


def gpu(price: float, on_demand: float, pool: str = "gpu-spot", gpus: int = 1) -> dict:
    capacity = "spot" if pool == "gpu-spot" else "on-demand"
    return {"node_pool": pool, "capacity": capacity, "gpu": gpus, "unit": "gpu", "units": gpus, "currency": "EUR"} | {
        "unit_price_per_hour": price,
        "on_demand_unit_price_per_hour": on_demand,
    }


# ---------------------------------------------------------------------------------------------
# The arithmetic


def test_every_attempt_counts_at_its_pools_price_preempted_ones_included():
    cpu = {"node_pool": "cpu", "capacity": "on-demand", "gpu": 0, "unit": "vcpu", "units": 4, "currency": "EUR"}
    cpu |= {"unit_price_per_hour": 0.05, "on_demand_unit_price_per_hour": 0.05}
    cost = costs.summarize(
        [
            record("tokenize", 1800, **cpu),  # 0.5 h x 4 vCPU x 0.05
            record("train_lora", 3600, "preempted", **gpu(0.3, 0.9, gpus=2)),  # 1 h x 2 GPUs at spot
            record("train_lora", 1800, "preempted", **gpu(0.3, 0.9, gpus=2)),
            record("train_lora", 900, **gpu(1.0, 1.0, pool="gpu-on-demand", gpus=2)),  # the last try
        ],
        run_id="r1",
    )
    train = cost["stages"]["train_lora"]
    assert (train["attempts"], train["preempted"], train["seconds"]) == (3, 2, 6300)
    assert train["gpu_hours"] == pytest.approx(3.5)
    assert train["cost"] == pytest.approx(2 * 0.3 + 1 * 0.3 + 0.5 * 1.0)
    assert train["on_demand_cost"] == pytest.approx(2 * 0.9 + 1 * 0.9 + 0.5 * 1.0)
    assert train["pools"] == ["gpu-spot (spot)", "gpu-on-demand (on-demand)"]
    assert cost["stages"]["tokenize"]["cost"] == pytest.approx(0.1)
    total = cost["total"]
    assert total["cost"] == pytest.approx(1.4 + 0.1) and total["on_demand_cost"] == pytest.approx(3.2 + 0.1)
    assert (total["attempts"], total["preempted"], total["unpriced"], cost["currency"]) == (4, 2, 0, "EUR")
    text = costs.render(cost)
    assert "cost of run r1 (EUR;" in text
    assert "train_lora" in text and "1h45m" in text and "1.4000" in text
    assert "spot saved 1.8000 (55%)" in text


def test_attempts_without_prices_are_timed_and_counted_not_priced():
    cost = costs.summarize([record("publish", 30), record("train_lora", 60, **gpu(0.3, 0.9))])
    assert cost["stages"]["publish"]["cost"] is None and cost["stages"]["publish"]["seconds"] == 30
    assert cost["total"]["cost"] == pytest.approx(0.005) and cost["total"]["unpriced"] == 1
    assert "1 attempt(s) ran without prices" in costs.render(cost)
    assert costs.summarize([record("publish", 30)])["total"]["cost"] is None


# ---------------------------------------------------------------------------------------------
# The records the runner writes


def attempts(root: Path, run_id: str = "dev") -> list[dict]:
    folder = root / "runs" / run_id / costs.ATTEMPTS
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("hello")
    return path


def test_every_attempt_records_how_it_ended_its_time_and_resources(tmp_path, source, monkeypatch, capsys):
    resources = {"node_pool": "gpu-spot", "capacity": "spot", "gpu": 1, "units": 1, "unit_price_per_hour": 0.3}
    monkeypatch.setenv(costs.RESOURCES_ENV, json.dumps(resources))
    args = (f"artifact_root={tmp_path}/art", f"source={source}")
    assert run_echo(*args, "fail_with=sigterm") == 143  # a spot node reclaimed
    assert run_echo(*args, "fail_with=user") == 2
    assert run_echo(*args) == 0
    assert run_echo(*args) == 0  # a cache hit costs its (short) time too
    ended = [(r["stage"], r["status"], r["exit_code"]) for r in sorted(attempts(tmp_path / "art"), key=started)]
    assert ended == [("echo", "preempted", 143), ("echo", "refused", 2), ("echo", "done", 0), ("echo", "cache_hit", 0)]
    assert all(r["resources"] == resources and r["seconds"] >= 0 for r in attempts(tmp_path / "art"))
    committed = manifest.read(f"file://{tmp_path}/art/runs/dev/echo")
    assert committed["resources"] == resources and committed["timings"]["attempt"].startswith("echo-")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["cache_hit"] and result["attempt"]["seconds"] >= 0
    # The records are not outputs: the stage's folder holds what it always held.
    assert sorted(p.name for p in (tmp_path / "art/runs/dev/echo").iterdir()) == ["copy-0.txt", "manifest.json"]


def started(r: dict) -> tuple:
    return (r["started_at"], r["attempt"])


def test_an_attempt_killed_without_notice_keeps_its_last_heartbeat(tmp_path, source):
    art = tmp_path / "art"
    args = [f"artifact_root={art}", f"source={source}", "fail_with=sigkill"]
    code = f"import time; from tests.test_contract import run_echo; time.sleep(0.3); run_echo(*{args!r})"
    env = {**os.environ, costs.HEARTBEAT_ENV: "0.05"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env)
    assert done.returncode == -signal.SIGKILL
    (left,) = attempts(art)
    assert left["status"] == costs.RUNNING and left["exit_code"] is None  # never finished: counted as it stood
    assert costs.run_cost(f"file://{art}", "dev")["stages"]["echo"]["attempts"] == 1


# ---------------------------------------------------------------------------------------------
# The platform's price table


def load(tmp_path: Path, text: str) -> settings.PipelineSettings:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return settings.load_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (PRICES.replace("on_demand: 0.05", "on_demand: -0.05"), "costs.prices.cpu.on_demand: Input should be greater"),
        (PRICES.replace("spot: 0.3", "spot: cheap"), "costs.prices.gpu-spot.spot: Input should be a valid number"),
        (PRICES.replace(", spot: 0.3}", "}"), "costs.prices.gpu-spot.spot is missing: GPU stages run on spot"),
        (
            PRICES.replace("    gpu-on-demand: {on_demand: 1.0}\n", ""),
            "costs.prices.gpu-on-demand.on_demand is missing",
        ),
        (PRICES.replace("{on_demand: 0.05, spot: 0.01}", "{spot: 0.01}"), "costs.prices.cpu.on_demand is missing"),
        (PRICES.replace("gpu-spot: 1000", "gpu-spot: 0"), "costs.train_tokens_per_second.gpu-spot: Input should be"),
        (PRICES.replace("EUR", "euro"), "costs.currency: String should match pattern"),
        ("costs: {prices: {gpu-cheap: {spot: 1}}}\n", "costs.prices.gpu-cheap: Input should be"),
    ],
    ids=[
        "negative",
        "not-a-number",
        "no-spot-price",
        "no-on-demand-pool",
        "no-cpu-price",
        "zero-throughput",
        "bad-currency",
        "unknown-pool",
    ],
)
def test_a_bad_price_table_is_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(settings.ConfigError) as exc:
        load(tmp_path, text)
    assert message in str(exc.value) and str(tmp_path / "pipeline.yaml") in str(exc.value)


def test_without_gpu_stages_no_gpu_price_is_needed(tmp_path):
    no_gpus = "stages: {train_lora: {gpu: 0}, evaluate: {gpu: 0}, batch_infer: {gpu: 0}}\n"
    s = load(tmp_path, no_gpus + "costs: {prices: {cpu: {on_demand: 0.05}}}\n")
    assert s.stage_resources("train_lora")["units"] == 8 and s.stage_resources("train_lora")["unit"] == "vcpu"


def test_each_attempt_is_told_its_pool_capacity_and_prices(tmp_path):
    s = load(tmp_path, PRICES + "stages: {publish: {cpu: 500m}}\n")
    assert s.stage_resources("train_lora") == {
        "runtime": "local",
        "node_pool": "gpu-spot",
        "capacity": "spot",
        "cpu": "8",
        "memory": "32Gi",
        "gpu": 1,
        "unit": "gpu",
        "units": 1,
        "unit_price_per_hour": 0.3,
        "on_demand_unit_price_per_hour": 0.9,
        "currency": "EUR",
    }
    last_try = s.stage_resources("train_lora", "on-demand")
    assert (last_try["node_pool"], last_try["capacity"], last_try["unit_price_per_hour"]) == (
        "gpu-on-demand",
        "on-demand",
        1.0,
    )
    publish = s.stage_resources("publish")
    assert (publish["node_pool"], publish["units"], publish["unit_price_per_hour"]) == ("cpu", 0.5, 0.05)
    assert load(tmp_path, "retries: 1\n").stage_resources("tokenize")["unit_price_per_hour"] is None


def test_the_last_try_of_a_gpu_pod_records_the_on_demand_pool_and_price():
    config = ROOT / "values/gke/pipeline.yaml"
    retries = settings.load_file(config).retries

    def told(try_number: int) -> dict:
        pod = render_pods.render_all(config, try_number=try_number)["genai_finetune.train_lora"]
        (base,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
        return json.loads(next(e["value"] for e in base["env"] if e["name"] == costs.RESOURCES_ENV))

    assert (told(1)["node_pool"], told(1)["unit_price_per_hour"]) == ("gpu-spot", 0.30)
    assert (told(retries + 1)["node_pool"], told(retries + 1)["unit_price_per_hour"]) == ("gpu-on-demand", 0.85)


# ---------------------------------------------------------------------------------------------
# The plan's estimate


def test_the_plan_estimates_training_from_steps_and_the_configured_throughput(tmp_path):
    s = load(tmp_path, PRICES)
    conf = {"train": {"max_steps": 1000, "batch_size": 4, "grad_accum_steps": 2}, "tokenize": {"block_size": 450}}
    line = cost_estimate.train_estimate(conf, s)  # 1000 x 8 x 450 = 3.6M tokens at 1000/s = 1 h
    assert line.startswith("cost estimate (an estimate, not a measurement; train_lora only)")
    assert (
        "3,600,000 tokens at 1000 tokens/s (configured) on gpu-spot = 1 h x 1 gpu = 0.3000 EUR (spot; 0.9000 on demand)"
        in line
    )
    measured = cost_estimate.train_estimate(conf, s, (4000.0, "measured by m@champion (v1)"))
    assert "at 4000 tokens/s (measured by m@champion (v1)) on gpu-spot = 0.25 h" in measured
    assert "skipped: train.max_steps is 0" in cost_estimate.train_estimate({}, s)
    assert "no costs.train_tokens_per_second.gpu-spot" in cost_estimate.train_estimate(
        conf, load(tmp_path, "retries: 1\n")
    )


def test_the_measured_throughput_is_the_champions_on_the_same_base_model(tmp_path):
    from genai_dags import registry

    root = tmp_path / "artifacts"
    s = load(tmp_path, f"artifact_root: {root}\nbase_models: {{tiny: /models/tiny}}\n")
    conf = {"model_name": "m", "base_model": "tiny"}
    assert cost_estimate.measured_throughput(conf, s) is None  # no champion yet
    trained = root / "runs/ft-1/train_lora"
    trained.mkdir(parents=True)
    (trained / "manifest.json").write_text(json.dumps({"metrics": {"tokens_per_second": 5123.4}}))
    version = root / "models/m/v1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    lineage = {"run_id": "ft-1", "base_model": s.base_models["tiny"],
               "stages": {"train_lora": {"output_uri": trained.as_uri()}}}  # fmt: skip
    (version / "lineage.json").write_text(json.dumps(lineage))
    registry.move_alias(str(root), "m", registry.CHAMPION, "v1", None)
    assert cost_estimate.measured_throughput(conf, s) == (5123.4, "measured by m@champion (v1)")
    other_base = {"model_name": "m", "base_model": "/models/other"}
    assert cost_estimate.measured_throughput(other_base, s) is None  # another model's speed says nothing
