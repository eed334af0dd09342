"""The model registry: champion and challenger, aliases that move safely, rollback by hand."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from genai_dags import local_airflow, registry

NAME = "folio-lora"


def publish(root: Path, version: str) -> str:
    """A published version, as far as the registry looks: its folder with a committed manifest."""
    folder = root / "models" / NAME / version
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    return registry.version_uri(str(root), NAME, version)


def evaluation(champion_uri: str | None = None, passed: bool = True) -> dict:
    """evaluate's metrics, as promotion reads them."""
    metrics = {"quality_gate": {"passed": True, "reason": "word_perplexity improved 12.0% (>= 2.0% required)"}}
    if champion_uri:
        reason = "over the champion, word_perplexity improved 3.0%" if passed else "word_perplexity got worse by 1.0%"
        metrics["champion"] = {"uri": champion_uri, "passed": passed, "reason": reason, "metric": "word_perplexity"}
    return metrics


def decision_file(root: Path, version: str) -> dict:
    return json.loads((root / "models" / NAME / "decisions" / f"{version}.json").read_text())


def test_the_first_version_that_passes_its_gate_becomes_champion(tmp_path):
    publish(tmp_path, "v1")
    decision = registry.promotion_decision(str(tmp_path), NAME, "v1", evaluation(), run_id="ft-1")
    assert decision["decision"] == "promoted" and "first version" in decision["reason"]
    champion = registry.read_alias(str(tmp_path), NAME, "champion")
    assert (champion.number, champion.version, champion.fields["previous"]) == (1, "v1", None)
    assert champion.fields["run_id"] == "ft-1"
    assert decision_file(tmp_path, "v1")["decision"] == "promoted"


def test_a_challenger_that_beats_the_champion_takes_the_alias(tmp_path):
    v1 = publish(tmp_path, "v1")
    publish(tmp_path, "v2")
    registry.promotion_decision(str(tmp_path), NAME, "v1", evaluation(), run_id="ft-1")
    decision = registry.promotion_decision(str(tmp_path), NAME, "v2", evaluation(v1, passed=True), run_id="ft-2")
    assert decision["decision"] == "promoted" and decision["previous"] == "v1"
    champion = registry.read_alias(str(tmp_path), NAME, "champion")
    assert (champion.number, champion.version, champion.fields["previous"]) == (2, "v2", "v1")


def test_a_challenger_that_loses_stays_published_and_is_marked_rejected_with_the_comparison(tmp_path):
    v1 = publish(tmp_path, "v1")
    publish(tmp_path, "v2")
    registry.promotion_decision(str(tmp_path), NAME, "v1", evaluation(), run_id="ft-1")
    decision = registry.promotion_decision(str(tmp_path), NAME, "v2", evaluation(v1, passed=False), run_id="ft-2")
    assert decision["decision"] == "rejected" and decision["champion"] == "v1"
    assert decision_file(tmp_path, "v2")["comparison"]["reason"] == "word_perplexity got worse by 1.0%"
    assert registry.read_alias(str(tmp_path), NAME, "champion").version == "v1"
    assert registry.is_published(str(tmp_path), NAME, "v2")


def test_a_comparison_with_another_champion_than_the_current_one_promotes_nothing(tmp_path):
    """The alias moved after evaluate ran (or evaluate compared with nothing): promotion would be blind."""
    v1 = publish(tmp_path, "v1")
    publish(tmp_path, "v2")
    publish(tmp_path, "v3")
    registry.promotion_decision(str(tmp_path), NAME, "v1", evaluation(), run_id="ft-1")
    registry.promotion_decision(str(tmp_path), NAME, "v2", evaluation(v1), run_id="ft-2")
    decision = registry.promotion_decision(str(tmp_path), NAME, "v3", evaluation(v1), run_id="ft-3")
    assert decision["decision"] == "not_compared" and "genai_promote" in decision["reason"]
    assert registry.promotion_decision(str(tmp_path), NAME, "v3", evaluation(), "ft-3")["decision"] == "not_compared"
    assert registry.read_alias(str(tmp_path), NAME, "champion").version == "v2"


def test_two_promotions_at_once_leave_one_champion_and_one_clear_failure(tmp_path):
    for version in ("v1", "a", "b", "c", "d"):
        publish(tmp_path, version)
    registry.promotion_decision(str(tmp_path), NAME, "v1", evaluation(), run_id="ft-1")
    read = registry.read_alias(str(tmp_path), NAME, "champion")  # every contender decided against v1
    start, outcomes = threading.Barrier(4), {}

    def promote(version: str) -> None:
        start.wait()
        try:
            registry.move_alias(str(tmp_path), NAME, "champion", version, read, run_id=version)
            outcomes[version] = "moved"
        except registry.AliasMoved as exc:
            outcomes[version] = str(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in ("a", "b", "c", "d")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v, outcome in outcomes.items() if outcome == "moved"]
    assert len(winners) == 1, outcomes
    champion = registry.read_alias(str(tmp_path), NAME, "champion")
    assert (champion.number, champion.version) == (2, winners[0])
    losers = [outcome for v, outcome in outcomes.items() if v not in winners]
    assert all(f"moved to {winners[0]}" in o and "nothing was written" in o for o in losers)
    assert sorted(p.name for p in (tmp_path / "models" / NAME / "aliases" / "champion").iterdir()) == [
        "00000001.json",
        "00000002.json",
    ]


@pytest.mark.parametrize("alias", ["../x", "Champion", "a/b", "", "-x"])
def test_an_alias_that_is_not_a_plain_name_is_refused(tmp_path, alias):
    with pytest.raises(registry.RegistryError, match="is not an alias name"):
        registry.move_alias(str(tmp_path), NAME, alias, "v1", None)
    assert not (tmp_path / "models").exists()  # nothing written


def test_a_model_is_named_by_version_or_by_alias(tmp_path):
    publish(tmp_path, "v1")
    root = str(tmp_path)
    assert registry.resolve(root, NAME, "v1") == "v1"
    with pytest.raises(registry.RegistryError, match="has no 'champion' alias yet"):
        registry.resolve(root, f"{NAME}@champion", None)
    registry.promotion_decision(root, NAME, "v1", evaluation(), run_id="ft-1")
    assert registry.resolve(root, f"{NAME}@champion", None) == "v1"
    with pytest.raises(registry.RegistryError, match="give no version beside it"):
        registry.resolve(root, f"{NAME}@champion", "v1")
    with pytest.raises(registry.RegistryError, match="is not an alias name"):
        registry.resolve(root, f"{NAME}@../v1", None)


@pytest.fixture
def registry_config(tmp_path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"runtime: local\nartifact_root: {tmp_path / 'artifacts'}\nretries: 0\n")
    return path


def test_genai_promote_rolls_the_champion_back_by_hand_and_records_why(registry_config, tmp_path):
    root = tmp_path / "artifacts"
    for version in ("v1", "v2"):
        publish(root, version)
    registry.promotion_decision(str(root), NAME, "v1", evaluation(), run_id="ft-1")
    v1 = registry.version_uri(str(root), NAME, "v1")
    registry.promotion_decision(str(root), NAME, "v2", evaluation(v1), run_id="ft-2")
    local_airflow.migrate()

    conf = {"model_name": NAME, "version": "v1", "reason": "rollback: v2 regressed on tickets"}
    run = local_airflow.run_dag("genai_promote", conf, registry_config)
    assert str(run.state) == "success", local_airflow.task_states(run)
    champion = registry.read_alias(str(root), NAME, "champion")
    assert (champion.number, champion.version, champion.fields["previous"]) == (3, "v1", "v2")
    assert champion.fields["reason"] == "rollback: v2 regressed on tickets" and champion.fields["by"] == "hand"
    assert champion.fields["run_id"] == run.run_id
    assert decision_file(root, "v1")["decision"] == "promoted"

    # A version that was never published: refused, the alias untouched.
    missing = local_airflow.run_dag("genai_promote", {**conf, "version": "v9"}, registry_config)
    assert str(missing.state) == "failed"
    assert registry.read_alias(str(root), NAME, "champion").number == 3
