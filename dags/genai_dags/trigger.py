"""Trigger a DAG run with a conf file through Airflow's REST API (v2), locally or on a deployed Airflow.

    make trigger CONF=examples/finetune-demo.json [DAG=genai_finetune] [AIRFLOW_URL=http://localhost:8080]
    PYTHONPATH=dags python -m genai_dags.trigger examples/finetune-demo.json --url https://airflow.example.com

Authentication (Airflow 3 uses bearer tokens), first that applies:
  1. ``AIRFLOW_TOKEN``: a token you already have;
  2. ``AIRFLOW_USERNAME`` + ``AIRFLOW_PASSWORD``: exchanged for a token at ``POST /auth/token``;
  3. the local instance of ``make airflow``: the admin password Airflow generated under ``airflow_home/``.

Prints the Airflow run id and where to watch it; with ``--wait`` (``make trigger ... WAIT=1``) it then
waits for the run to finish, prints each task's state and exits 1 if the run failed, for CI jobs and
scripts. Only the standard library: it runs anywhere.
The conf is validated by Airflow itself (the DAG's Params); a refusal is printed as Airflow wrote it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_PASSWORDS = REPO_ROOT / "airflow_home" / "simple_auth_manager_passwords.json.generated"


class ConfFileError(ValueError):
    """The conf file cannot be read or is not a JSON object."""


class TriggerError(RuntimeError):
    """Airflow refused the request; the message is Airflow's."""


def load_conf(path: str | os.PathLike) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfFileError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(conf, dict):
        raise ConfFileError(f"{path}: must hold a JSON object (the run conf), not {type(conf).__name__}")
    return conf


def request(method: str, url: str, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):  # not JSON: keep the text as it is
            detail = json.loads(detail).get("detail", detail)
            detail = detail if isinstance(detail, str) else json.dumps(detail)
        raise TriggerError(f"{method} {url} -> HTTP {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise TriggerError(f"cannot reach Airflow at {url}: {exc.reason} (is it running? `make airflow`)") from None


def get_token(url: str) -> str:
    if token := os.environ.get("AIRFLOW_TOKEN"):
        return token
    username, password = os.environ.get("AIRFLOW_USERNAME"), os.environ.get("AIRFLOW_PASSWORD")
    if not (username and password) and LOCAL_PASSWORDS.exists():
        username, password = next(iter(json.loads(LOCAL_PASSWORDS.read_text()).items()))
    if not (username and password):
        raise TriggerError("no credentials: set AIRFLOW_TOKEN, or AIRFLOW_USERNAME and AIRFLOW_PASSWORD")
    return login(url, username, password)


def login(url: str, username: str, password: str) -> str:
    """A bearer token for the API, in exchange for a user's credentials."""
    return request("POST", f"{url}/auth/token", {"username": username, "password": password})["access_token"]


def trigger(url: str, dag_id: str, conf: dict[str, Any], token: str) -> dict[str, Any]:
    api = f"{url}/api/v2/dags/{urllib.parse.quote(dag_id)}"
    dag = request("GET", api, token=token)
    if dag.get("is_paused"):
        print(f"note: {dag_id} is paused; the run waits until you unpause it", file=sys.stderr)
    # logical_date null: a manual run that is not tied to a data interval.
    return request("POST", f"{api}/dagRuns", {"logical_date": None, "conf": conf}, token=token)


def _run_api(url: str, dag_id: str, run_id: str) -> str:
    return f"{url}/api/v2/dags/{urllib.parse.quote(dag_id)}/dagRuns/{urllib.parse.quote(run_id, safe='')}"


def wait(url: str, dag_id: str, run_id: str, token: str, *, poll_seconds: float = 5, timeout: float | None = None):
    """Poll a run until it finishes (success or failed) and return it as Airflow reports it."""
    api = _run_api(url, dag_id, run_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run = request("GET", api, token=token)
        if run["state"] in ("success", "failed"):
            return run
        if deadline is not None and time.monotonic() > deadline:
            raise TriggerError(f"run {run_id} of {dag_id} is still {run['state']} after {timeout:.0f} s")
        time.sleep(poll_seconds)


def task_instances(url: str, dag_id: str, run_id: str, token: str) -> list[dict[str, Any]]:
    """Every task instance of a run (mapped ones one per index), with state, try number and times."""
    return request("GET", f"{_run_api(url, dag_id, run_id)}/taskInstances?limit=1000", token=token)["task_instances"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Trigger a GenAI DAG with a run conf through Airflow's REST API.")
    parser.add_argument("conf", help="JSON file with the run conf (see examples/)")
    parser.add_argument("--dag", default="genai_finetune", help="DAG id (default: genai_finetune)")
    parser.add_argument(
        "--url",
        default=os.environ.get("AIRFLOW_URL", "http://localhost:8080"),
        help="Airflow API server URL (default: $AIRFLOW_URL or http://localhost:8080)",
    )
    parser.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 if it failed")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    try:
        conf = load_conf(args.conf)
        token = get_token(url)
        run = trigger(url, args.dag, conf, token)
    except (ConfFileError, TriggerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_id = run["dag_run_id"]
    print(f"triggered {args.dag} run {run_id} ({run.get('state')})")
    print(f"watch it:  {url}/dags/{args.dag}/runs/{urllib.parse.quote(run_id)}")
    if not args.wait:
        return 0
    try:
        run = wait(url, args.dag, run_id, token)
        for ti in sorted(task_instances(url, args.dag, run_id, token), key=lambda t: (t["task_id"], t["map_index"])):
            index = f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""
            print(f"  {ti['task_id']}{index}: {ti['state']} (try {ti['try_number']})")
    except TriggerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run {run_id}: {run['state']}")
    return 0 if run["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
