"""Failure and success notifications through Airflow's notifier mechanism (SMTP, Slack), off by default.

Configured in the pipeline config by connection id, so credentials stay in Airflow connections:

    notifications:
      on_failure: true            # a task failed after its last try: which DAG, run, task, and its log URL
      on_success: false           # a run finished
      smtp: {conn_id: smtp_default, to: [ml-oncall@example.com], from_email: airflow@example.com}
      slack: {conn_id: slack_api_default, channel: "#ml-pipelines"}

Failures are reported per task (the task's own callback knows the task, its try and its log URL);
success once per run, by the callback of the run's last task.
"""

from __future__ import annotations

from typing import Any

from genai_dags.settings import PipelineSettings

FAILURE_SUBJECT = "[genai] {{ dag.dag_id }} failed at {{ ti.task_id }} (run {{ run_id }})"
FAILURE_TEXT = (
    "DAG {{ dag.dag_id }}, run {{ run_id }}: task {{ ti.task_id }} failed "
    "(try {{ ti.try_number }}).\n"
    "Error: {{ exception }}\n"
    "Log: {{ ti.log_url }}"
)
FAILURE_HTML = (
    "<p>DAG <b>{{ dag.dag_id }}</b>, run <b>{{ run_id }}</b>: task <b>{{ ti.task_id }}</b> failed "
    "(try {{ ti.try_number }}).</p>"
    "<p>Error: <code>{{ exception | e }}</code></p>"
    '<p>Log: <a href="{{ ti.log_url }}">{{ ti.log_url }}</a></p>'
)
SUCCESS_SUBJECT = "[genai] {{ dag.dag_id }} succeeded (run {{ run_id }})"
SUCCESS_TEXT = "DAG {{ dag.dag_id }}, run {{ run_id }} succeeded. Details: {{ run_url }}"
SUCCESS_HTML = (
    "<p>DAG <b>{{ dag.dag_id }}</b>, run <b>{{ run_id }}</b> succeeded.</p>"
    '<p><a href="{{ run_url }}">{{ run_url }}</a></p>'
)


def _run_url() -> str:
    from airflow.configuration import conf

    base = conf.get("api", "base_url", fallback="http://localhost:8080/").rstrip("/")
    return base + "/dags/{{ dag.dag_id }}/runs/{{ run_id | urlencode }}"


def _notifiers(settings: PipelineSettings, subject: str, text: str, html: str) -> list[Any]:
    n = settings.notifications
    notifiers: list[Any] = []
    if n.smtp:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        notifiers.append(
            SmtpNotifier(
                to=list(n.smtp.to),
                from_email=n.smtp.from_email,
                smtp_conn_id=n.smtp.conn_id,
                subject=subject,
                html_content=html,
            )
        )
    if n.slack:
        from airflow.providers.slack.notifications.slack import SlackNotifier

        notifiers.append(SlackNotifier(slack_conn_id=n.slack.conn_id, channel=n.slack.channel, text=text))
    return notifiers


def on_failure(settings: PipelineSettings) -> list[Any]:
    if not settings.notifications.on_failure:
        return []
    return _notifiers(settings, FAILURE_SUBJECT, FAILURE_TEXT, FAILURE_HTML)


def on_success(settings: PipelineSettings) -> list[Any]:
    if not settings.notifications.on_success:
        return []
    url = _run_url()
    return _notifiers(
        settings,
        SUCCESS_SUBJECT,
        SUCCESS_TEXT.replace("{{ run_url }}", url),
        SUCCESS_HTML.replace("{{ run_url }}", url),
    )
