"""``make demo``: run genai_finetune through Airflow on this machine and print what came out.

    make demo        # installs, builds the tiny base model, then runs this module
    PYTHONPATH=dags python -m genai_dags.demo [--conf examples/finetune-demo.json]

Airflow (SQLite under ``airflow_home/``) runs the DAG with the ``local`` runtime of
``values/local/pipeline.yaml``: each stage is ``python -m stages.<name>`` as a subprocess. Airflow's
own log goes to ``airflow_home/demo.log``; the terminal shows one line per task, then a summary:
perplexity before and after, the quality gate, where the adapter, report and predictions are, and
a few generated samples. Running it again reuses every stage's output (cache hits).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from genai_dags.settings import REPO_ROOT

HOME = REPO_ROOT / "airflow_home"
CONFIG = REPO_ROOT / "values" / "local" / "pipeline.yaml"
TASK_LINE = re.compile(r"\[DAG TEST\] (starting|end task) task_id=(\S+)")


def run_in_child(conf_path: Path, result_path: Path) -> None:
    """The child process: Airflow runs the DAG; the outcome goes to ``result_path`` as JSON."""
    from genai_dags import local_airflow

    local_airflow.configure(HOME)
    local_airflow.migrate()
    conf = json.loads(conf_path.read_text())
    run = local_airflow.run_dag("genai_finetune", conf, CONFIG)
    tasks = ("plan", "tokenize", "train_lora", "evaluate", "quality_gate", "batch_infer", "publish", "promote")
    result = {
        "state": str(run.state),
        "run_id": run.run_id,
        "tasks": local_airflow.task_states(run),
        "xcom": {t: local_airflow.xcom(run, t) for t in tasks},
        "plan": {"run_id": local_airflow.xcom(run, "plan", key="run_id")},
    }
    result_path.write_text(json.dumps(result, default=str))


def follow(log_path: Path, child: subprocess.Popen) -> None:
    """Print one line per task from Airflow's log while the child runs."""
    started: dict[str, float] = {}
    position = 0
    while True:
        done = child.poll() is not None
        if log_path.exists():
            with log_path.open(errors="replace") as fh:
                fh.seek(position)
                chunk = fh.read()
                position = fh.tell()
            for match in TASK_LINE.finditer(chunk):
                event, task = match.groups()
                if event == "starting":
                    started[task] = time.monotonic()
                    print(f"  {task:<14}", end="", flush=True)
                else:
                    print(f"{time.monotonic() - started.get(task, time.monotonic()):6.1f}s", flush=True)
        if done:
            return
        time.sleep(0.3)


def metric(metrics: dict[str, Any], *path: str) -> Any:
    for key in path:
        metrics = (metrics or {}).get(key, {})
    return metrics if metrics != {} else None


def summary(result: dict[str, Any], conf: dict[str, Any]) -> str:
    xcom = result["xcom"]
    lines = [""]
    failed = [t for t, s in result["tasks"].items() if s == "failed"]
    if result["state"] != "success":
        lines.append(f"genai_finetune FAILED at {', '.join(failed) or '?'}; the reason is in {HOME / 'demo.log'}")
    evaluation = (xcom.get("evaluate") or {}).get("metrics") or {}
    base, adapted = evaluation.get("base", {}), evaluation.get("adapted", {})
    if base and adapted and evaluation.get("task") == "sft":
        lines.append("on held-out conversations                    before (base)   after (base + LoRA)")
        lines.append(f"  {'assistant_perplexity':<40} {base['assistant_perplexity']:>12.2f}   "
                     f"{adapted['assistant_perplexity']:>12.2f}")  # fmt: skip
        for name in ("exact_match", "chrf"):
            lines.append(f"  {name:<40} {base[name]:>12.1%}   {adapted[name]:>12.1%}")
    elif base and adapted:
        lines.append("perplexity on held-out First Folio text     before (base)   after (base + LoRA)")
        for name in ("word_perplexity", "byte_perplexity", "token_perplexity"):
            lines.append(f"  {name:<40} {base[name]:>12.2f}   {adapted[name]:>12.2f}")
    gate = evaluation.get("quality_gate") or {}
    if gate:
        lines.append(f"quality gate: {'PASSED' if gate.get('passed') else 'FAILED'} ({gate.get('reason')})")
    champion = evaluation.get("champion") or {}
    if champion:
        lines.append(f"champion:     {champion['uri']}: {champion['reason']}")
    decision = xcom.get("promote") or {}
    if decision:
        reason = f" ({decision['reason']})" if decision.get("reason") else ""
        lines.append(f"promotion:    {decision['alias']} {decision['decision']}{reason}")
    published = (xcom.get("publish") or {}).get("metrics") or {}
    if published:
        lines.append(f"published:    {published['model_name']} version {published['version']}")
        lines.append(f"  adapter:    {published['adapter_uri']}")
        lines.append(f"  report:     {published['uri']}/evaluation/report.md")
        lines.append(f"  lineage:    {published['uri']}/lineage.json")
        lines.extend(cost_lines(published))
    infer = xcom.get("batch_infer") or {}
    if infer:
        predictions = f"{infer['output_uri']}/predictions.jsonl"
        lines.append(f"predictions:  {predictions}")
        lines.extend(samples(predictions, REPO_ROOT / conf["prompts_uri"]))
    cached = [t for t, x in xcom.items() if isinstance(x, dict) and x.get("cache_hit")]
    if cached:
        lines.append(f"cache hits:   {', '.join(cached)} (same conf and code as an earlier run)")
    lines.append(f"Airflow run {result['run_id']}; stage run id {result['plan']['run_id']}; log {HOME / 'demo.log'}")
    return "\n".join(lines)


def cost_lines(published: dict[str, Any]) -> list[str]:
    """What the run cost, as publish measured it from every stage attempt (``cost.json`` has the table)."""
    cost = published.get("cost") or {}
    if not cost:
        return []
    currency = cost.get("currency")
    if cost.get("total") is None:
        return [
            f"  cost:       not priced (no costs.prices); {cost['seconds']:.0f}s of stage time; "
            f"{published['uri']}/cost.json"
        ]
    per_stage = ", ".join(f"{name} {value:.4f}" for name, value in cost["stages"].items() if value is not None)
    return [
        f"  cost:       {cost['total']:.4f} {currency} ({cost['on_demand']:.4f} on demand) over "
        f"{cost['seconds']:.0f}s of stage time, priced as the cluster's pools; {published['uri']}/cost.json",
        f"              {per_stage}",
    ]


def samples(predictions_uri: str, prompts_file: Path, count: int = 3) -> list[str]:
    path = Path(predictions_uri.removeprefix("file://"))
    if not path.exists() or not prompts_file.exists():
        return []
    prompts = {r["id"]: r for r in map(json.loads, prompts_file.read_text().splitlines())}
    out = ["samples (prompt -> completion):"]
    for line in path.read_text().splitlines()[:count]:
        record = json.loads(line)
        prompt = prompts.get(record["id"], {})
        # A chat prompt shows its last turn, and the expected answer when the prompts file holds one.
        shown = prompt["messages"][-1]["content"] if "messages" in prompt else prompt.get("prompt", record["id"])
        completion = " ".join(record["completion"].split())[:160]
        expected = f"   (expected: {prompt['answer']})" if "answer" in prompt else ""
        lines = [line for line in str(shown).splitlines() if line.strip()]
        out.append(f"  {' / '.join(lines)}\n    -> {completion}{expected}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run genai_finetune through Airflow locally and summarise it.")
    parser.add_argument("--conf", type=Path, default=REPO_ROOT / "examples" / "finetune-demo.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: run the DAG, write the result
    args = parser.parse_args(argv)
    if args.child:
        run_in_child(args.conf, args.child)
        return 0

    HOME.mkdir(parents=True, exist_ok=True)
    log_path, result_path = HOME / "demo.log", HOME / "demo-result.json"
    result_path.unlink(missing_ok=True)
    print(
        f"genai_finetune through Airflow (local runtime, {CONFIG.relative_to(REPO_ROOT)}); "
        f"conf {args.conf}; Airflow log {log_path.relative_to(REPO_ROOT)}"
    )
    started = time.monotonic()
    with log_path.open("w") as log:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "dags"), os.environ.get("PYTHONPATH")])),
        }
        child = subprocess.Popen(
            [sys.executable, "-m", "genai_dags.demo", "--conf", str(args.conf), "--child", str(result_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )
        try:
            follow(log_path, child)
        except KeyboardInterrupt:
            child.terminate()
            child.wait()
            raise
    if child.returncode != 0 or not result_path.exists():
        print(f"Airflow did not finish (exit {child.returncode}); see {log_path}", file=sys.stderr)
        return 1
    result = json.loads(result_path.read_text())
    print(summary(result, json.loads(args.conf.read_text())))
    print(f"done in {time.monotonic() - started:.0f}s")
    return 0 if result["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
