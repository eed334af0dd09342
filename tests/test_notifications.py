"""Notifications through Airflow's notifiers, end to end against a real SMTP server on 127.0.0.1 (aiosmtpd)."""

from __future__ import annotations

import email
import email.policy
import json
import socket
import urllib.parse
from pathlib import Path

import pytest

from genai_dags import local_airflow, notifications, settings
from genai_dags.render_pods import load_dags

ROOT = Path(__file__).resolve().parents[1]

CONF = {
    "model_name": "folio",
    "base_model": "tiny-shakespeare",
    "train_data_uri": "data/folio/",
    "prompts_uri": "examples/prompts/folio-prompts.jsonl",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp_server(monkeypatch):
    """A real SMTP server on loopback, and an Airflow connection pointing at it."""
    from aiosmtpd.controller import Controller

    received: list[email.message.EmailMessage] = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
            return "250 Message accepted"

    controller = Controller(Handler(), hostname="127.0.0.1", port=free_port())
    controller.start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_GENAI_SMTP",
        json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": controller.port,
                "extra": {"disable_tls": True, "disable_ssl": True, "timeout": 10, "retry_limit": 0},
            }
        ),
    )
    yield received
    controller.stop()


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"artifact_root: {tmp_path}/artifacts\nretries: 0\nbase_models: {{tiny-shakespeare: {tmp_path}/base}}\n"
        "notifications:\n  on_failure: true\n  on_success: true\n"
        "  smtp: {conn_id: genai_smtp, to: [ml-oncall@example.com], from_email: airflow@example.com}\n"
    )
    return path


def body(message) -> str:
    part = message.get_body(preferencelist=("html", "plain"))
    return part.get_content()


def test_notifications_are_off_by_default():
    default = settings.parse({}, "test")
    assert notifications.on_failure(default) == [] and notifications.on_success(default) == []
    dag = load_dags(None)["genai_finetune"]
    assert not dag.default_args.get("on_failure_callback")
    assert not dag.on_success_callback


def test_slack_and_smtp_notifiers_are_built_from_connection_ids():
    from airflow.providers.slack.notifications.slack import SlackNotifier
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    s = settings.parse(
        {
            "notifications": {
                "smtp": {"conn_id": "mail", "to": ["a@b.c"]},
                "slack": {"conn_id": "chat", "channel": "#ml"},
            }
        },
        "test",
    )
    smtp, slack = notifications.on_failure(s)
    assert isinstance(smtp, SmtpNotifier) and smtp.smtp_conn_id == "mail" and smtp.to == ["a@b.c"]
    assert isinstance(slack, SlackNotifier) and slack.slack_conn_id == "chat" and slack.channel == "#ml"
    assert "{{ ti.log_url }}" in slack.text


@pytest.mark.integration
def test_a_failed_task_mails_the_dag_the_run_the_task_and_its_log_url(smtp_server, config):
    local_airflow.migrate()
    run = local_airflow.run_dag("genai_finetune", {**CONF, "trian": {}}, config)
    assert str(run.state) == "failed"
    (message,) = smtp_server  # one task failed, one mail
    text = body(message)
    assert message["To"] == "ml-oncall@example.com"
    assert "genai_finetune" in message["Subject"] and "plan" in message["Subject"]
    assert run.run_id in message["Subject"]
    assert "<b>genai_finetune</b>" in text and f"<b>{run.run_id}</b>" in text and "<b>plan</b>" in text
    assert "unknown key &#39;trian&#39;" in text or "unknown key 'trian'" in text  # why it failed
    log_url = f"http://localhost:8080/dags/genai_finetune/runs/{urllib.parse.quote(run.run_id)}/tasks/plan"
    assert log_url in text  # where to look


def test_the_last_task_of_each_dag_reports_a_successful_run(smtp_server, config):
    dags = load_dags(config)
    for dag_id, last in (("genai_finetune", "promote"), ("genai_batch_inference", "merge_predictions")):
        dag = dags[dag_id]
        assert [t.task_id for t in dag.tasks if not t.downstream_task_ids] == [last]
        (notifier,) = dag.get_task(last).on_success_callback
        ti = type("TI", (), {"task_id": last, "try_number": 1, "log_url": "http://x/log"})()
        notifier({"dag": dag, "run_id": "manual__2026-01-01T00:00:00+00:00", "ti": ti})
    assert [m["Subject"] for m in smtp_server] == [
        "[genai] genai_finetune succeeded (run manual__2026-01-01T00:00:00+00:00)",
        "[genai] genai_batch_inference succeeded (run manual__2026-01-01T00:00:00+00:00)",
    ]
    run_path = "/dags/genai_finetune/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00"
    assert f"http://localhost:8080{run_path}" in body(smtp_server[0])
