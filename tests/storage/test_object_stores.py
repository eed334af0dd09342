"""The stages on S3, GCS and Azure Blob with the same code: chained, cached, resumed after SIGKILL, through faults.

    make test-storage

Every test runs once per store. The emulators start together (conftest.py), each behind a
fault-injecting proxy; the three stores' scenarios then run side by side, each a sequence of real
stage processes with the artifact root in the bucket, and the tests check what each scenario saw.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.storage.conftest import Store
from tests.storage.fault_proxy import Plan, forward_all

pytestmark = [pytest.mark.storage, pytest.mark.integration]

TINY_BASE = ["steps=5", "vocab_size=300", "hidden_size=32", "num_layers=1", "num_heads=2", "context_length=64",
             "seq_len=32", "batch_size=4"]  # fmt: skip
TRAIN = ["max_steps=3", "batch_size=2", "learning_rate=2e-3"]
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"


def run_args(store: Store, run_id: str) -> list[str]:
    return [f"artifact_root={store.root}", f"run_id={run_id}", f"base_model={store.root}/runs/base/base_model/model"]


# The fine-tuning chain, base model first; each entry: stage, run id, arguments. Its inputs are a folder
# (corpus_uri), a glob (input_uri) and a file (prompts_uri): every kind of input URI, on every store.
CHAIN: list[tuple[str, str, Callable[[Store], list[str]]]] = [
    ("base_model", "base", lambda s: [f"artifact_root={s.root}", "run_id=base", f"corpus_uri={s.root}/data/base",
                                      *TINY_BASE]),
    ("tokenize", "chain", lambda s: [*run_args(s, "chain"), f"input_uri={s.root}/data/folio/*.txt", "block_size=32",
                                     "min_chars=20"]),
    ("train_lora", "chain", lambda s: [*run_args(s, "chain"), *TRAIN]),
    ("evaluate", "chain", lambda s: [*run_args(s, "chain"), "max_eval_docs=8", "num_samples=1",
                                     "sample_max_new_tokens=4", "batch_size=4"]),
    ("batch_infer", "chain", lambda s: [*run_args(s, "chain"), f"prompts_uri={s.root}/data/prompts.jsonl",
                                        "max_new_tokens=4"]),
]  # fmt: skip


def flaky(every: int, faults: int = 3) -> Plan:
    """Every ``every``-th request fails, ``faults`` times: a 503, a dropped request, a lost answer, in turn.

    Never two failures in a row, so one client retry rides each out; kept few, because the clients
    sleep about a second before retrying.
    """

    def plan(n: int, method: str, target: str) -> str:
        if n % every != every - 1 or n // every >= faults:
            return "forward"
        return ("503", "drop", "lose")[(n // every) % 3]

    return plan


def hold_first_upload(fragment: str) -> Plan:
    """Hold the first upload whose target contains ``fragment`` (the stage hangs mid-upload)."""
    held = []

    def plan(n: int, method: str, target: str) -> str:
        if not held and method in ("PUT", "POST") and fragment in target:
            held.append(target)
            return "hold"
        return "forward"

    return plan


def outage_after_uploads(fragment: str, passing: int) -> Plan:
    """Let ``passing`` uploads under ``fragment`` through, then answer every request with a 503."""
    seen = []

    def plan(n: int, method: str, target: str) -> str:
        if len(seen) > passing:
            return "503"
        if method in ("PUT", "POST") and fragment in target:
            seen.append(target)
            if len(seen) > passing:
                return "503"
        return "forward"

    return plan


def result_of(proc) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def outputs_match_manifest(store: Store, *parts: str) -> dict:
    committed = store.manifest(*parts)
    assert committed is not None, f"no manifest under {parts}"
    for rel, digest in committed["outputs"].items():
        data = store.fs.cat_file(store.path(*parts, rel))
        assert hashlib.sha256(data).hexdigest() == digest, f"{rel} does not match its manifest"
    return committed


def objects_under(store: Store, *parts: str) -> set[str]:
    store.fs.invalidate_cache()
    prefix = store.path(*parts) + "/"
    return {path.removeprefix(prefix) for path in store.fs.find(store.path(*parts))}


@pytest.fixture(scope="session")
def scenarios(request, stores: dict) -> dict[str, Future]:
    """The selected stores' scenarios, all running at once (most of a stage run is one core loading torch)."""
    selected = {
        item.callspec.params["store"]
        for item in request.session.items
        if hasattr(item, "callspec") and "store" in item.callspec.params
    }
    runnable = {name: found for name, found in stores.items() if name in selected and not isinstance(found, str)}
    with ThreadPoolExecutor(max_workers=max(1, len(runnable))) as pool:
        yield {name: pool.submit(run_scenario, found) for name, found in runnable.items()}


@pytest.fixture
def scenario(store: Store, scenarios: dict[str, Future]) -> dict:
    return scenarios[store.name].result(timeout=600)


def run_scenario(store: Store) -> dict:
    """The chain on one store, with the trouble a production run meets along the way.

    Stage runs cost seconds each (torch and transformers load in every process), so one pass does it
    all and records what it saw; the tests below check the records:
    base_model; tokenize hit by a store outage mid-upload, then rerun; train_lora SIGKILLed in the
    middle of a checkpoint upload, then restarted on a flaky store; evaluate; batch_infer; finally
    tokenize and train_lora rerun on a flaky store (cache hits).
    """
    seen: dict = {}
    args = {stage: make(store) for stage, _, make in CHAIN}
    store.proxy.reset(forward_all)
    seen["base_model"] = result_of(store.run("base_model", *args["base_model"]))

    # tokenize: the store starts failing every request after the first dataset file went up.
    store.proxy.reset(outage_after_uploads("runs/chain/tokenize/dataset/", passing=1))
    seen["outage"] = store.run("tokenize", *args["tokenize"])
    seen["outage_objects"] = objects_under(store, "runs", "chain", "tokenize")
    seen["outage_manifest"] = store.manifest("runs", "chain", "tokenize")
    store.proxy.reset(forward_all)
    seen["tokenize"] = result_of(store.run("tokenize", *args["tokenize"]))
    seen["tokenize_objects"] = objects_under(store, "runs", "chain", "tokenize")

    # train_lora: killed while checkpoint step 2 is being uploaded, restarted on a flaky store.
    train = [*args["train_lora"], "checkpoint_every=1"]
    store.proxy.reset(hold_first_upload(f"runs/chain/train_lora/{CHECKPOINTS}/step-00000002/adapter_model"))
    proc = store.start("train_lora", *train)
    while not store.proxy.held.wait(timeout=0.2):
        assert proc.poll() is None, f"train_lora ended before the upload was held:\n{proc.communicate()[1][-3000:]}"
    store.kill(proc)
    store.proxy.release.set()
    seen["killed_objects"] = objects_under(store, "runs", "chain", "train_lora")
    seen["killed_manifest"] = store.manifest("runs", "chain", "train_lora")
    store.proxy.reset(flaky(every=5))
    restart = store.run("train_lora", *train)
    seen["train_lora"], seen["restart_stderr"] = result_of(restart), restart.stderr
    seen["restart_faults"] = store.proxy.faults()
    seen["train_objects"] = objects_under(store, "runs", "chain", "train_lora")

    store.proxy.reset(forward_all)
    for stage in ("evaluate", "batch_infer"):
        seen[stage] = result_of(store.run(stage, *args[stage]))

    manifests = {stage: store.fs.cat_file(store.path("runs", run, stage, MANIFEST)) for stage, run, _ in CHAIN}
    store.proxy.reset(flaky(every=3))
    seen["rerun"] = {stage: result_of(store.run(stage, *args[stage])) for stage in ("tokenize", "train_lora")}
    seen["rerun_faults"] = store.proxy.faults()
    seen["manifests_unchanged"] = manifests == {
        stage: store.fs.cat_file(store.path("runs", run, stage, MANIFEST)) for stage, run, _ in CHAIN
    }
    return seen


def test_chained_stages_commit_outputs_that_match_their_manifests(store: Store, scenario: dict):
    for stage, run_id, _ in CHAIN:
        assert scenario[stage]["cache_hit"] is False
        assert scenario[stage]["output_uri"] == f"{store.root}/runs/{run_id}/{stage}"
        committed = outputs_match_manifest(store, "runs", run_id, stage)
        assert committed["outputs"], f"{stage} committed no outputs"
    assert "adapter/adapter_model.safetensors" in store.manifest("runs", "chain", "train_lora")["outputs"]
    assert scenario["batch_infer"]["metrics"]["prompts"] == 2


def test_store_outage_fails_cleanly_naming_the_uri_and_commits_nothing(store: Store, scenario: dict):
    proc = scenario["outage"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    uri = f"{store.root}/runs/chain/tokenize/dataset/"
    assert f"error: tokenize: could not upload '{uri}" in proc.stderr, proc.stderr[-3000:]
    assert "after 3 attempts" in proc.stderr
    assert "Traceback" not in proc.stderr  # infrastructure failing is reported, not a crash
    assert scenario["outage_objects"], "the first upload should have landed before the outage"
    assert MANIFEST not in scenario["outage_objects"] and scenario["outage_manifest"] is None


def test_rerun_after_an_outage_commits_without_the_leftovers(store: Store, scenario: dict):
    committed = store.manifest("runs", "chain", "tokenize")
    assert scenario["tokenize_objects"] == {*committed["outputs"], MANIFEST}


def test_sigkill_mid_checkpoint_upload_never_uses_the_half_written_checkpoint(store: Store, scenario: dict):
    killed = scenario["killed_objects"]
    assert f"{CHECKPOINTS}/step-00000001/COMPLETE.json" in killed
    assert any(p.startswith(f"{CHECKPOINTS}/step-00000002/") for p in killed), "step 2 should be half-uploaded"
    assert f"{CHECKPOINTS}/step-00000002/COMPLETE.json" not in killed
    assert scenario["killed_manifest"] is None
    assert scenario["train_lora"]["metrics"]["resumed_from_step"] == 1
    assert "resumed from checkpoint at step 1" in scenario["restart_stderr"]
    assert scenario["restart_faults"] > 0, "the restart should have met injected faults"
    assert scenario["train_lora"]["metrics"]["steps"] == 3
    assert not [p for p in scenario["train_objects"] if p.startswith(CHECKPOINTS)], "checkpoints outlived the commit"


def test_rerun_through_a_flaky_store_is_all_cache_hits(store: Store, scenario: dict):
    assert all(result["cache_hit"] for result in scenario["rerun"].values())
    assert scenario["rerun_faults"] > 0
    assert scenario["manifests_unchanged"]


def test_planted_secret_never_appears_in_logs_manifests_or_metrics(store: Store, scenario: dict):
    assert len(store.logs) >= len(CHAIN) + 3
    texts = {
        path: store.fs.cat_file(store.path("runs", path)).decode("utf-8", errors="replace")
        for path in objects_under(store, "runs")
        if path.endswith((".json", ".jsonl", ".md"))
    }
    assert sum(path.endswith(MANIFEST) for path in texts) == len(CHAIN)
    for secret in store.secrets:
        assert len(secret) >= 16
        for i, log in enumerate(store.logs):
            assert secret not in log, f"a planted {store.name} credential is in the output of stage run {i}"
        for path, text in texts.items():
            assert secret not in text, f"a planted {store.name} credential is in {path}"
