"""genai_finetune end to end through Airflow with the docker runtime: every stage in its own image.

Airflow runs the DAG with ``dag.test()`` on SQLite (as ``make demo`` does); each stage task is a
``StageDockerOperator`` that starts the stage's image, hardened like its pod, with the artifact root
mounted at its own path and the data folder mounted read-only.

    make test-docker
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from genai_dags import local_airflow
from tests.docker.conftest import ROOT, docker

pytestmark = pytest.mark.docker
STAGE_TASKS = ["tokenize", "train_lora", "evaluate", "batch_infer", "publish"]


def test_genai_finetune_runs_every_stage_in_its_image(stage_images, tiny_base_model, folio_corpus, tmp_path):
    repository, tag = stage_images["stage-base"].rsplit(":", 1)
    root, data = tmp_path / "artifacts", tmp_path / "data"
    shutil.copytree(tiny_base_model.removeprefix("file://"), root / "base/model")
    shutil.copytree(folio_corpus, data / "folio")
    prompts = (ROOT / "examples/prompts/folio-prompts.jsonl").read_text().splitlines()[:4]
    (data / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    for path in [tmp_path, *tmp_path.rglob("*")]:  # the containers' uid writes into the artifact root
        path.chmod(0o777 if path.is_dir() else 0o666)
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"runtime: docker\nartifact_root: {root}\nretries: 0\nbase_models: {{tiny: '{{artifact_root}}/base/model'}}\n"
        f"docker:\n  image: {{repository: {repository}, tag: '{tag}'}}\n  mounts: ['{data}']\n"
    )
    conf = {
        "model_name": "folio-docker",
        "base_model": "tiny",
        "train_data_uri": str(data / "folio"),
        "prompts_uri": str(data / "prompts.jsonl"),
        "tokenize": {"block_size": 64},
        "train": {"rank": 4, "max_steps": 8, "batch_size": 8, "learning_rate": 0.003},
        "evaluate": {"max_eval_docs": 30, "min_relative_improvement": -1, "num_samples": 1, "sample_max_new_tokens": 8},
        "inference": {"max_new_tokens": 8},
    }

    ours = ("ps", "-a", "--filter", "label=app.kubernetes.io/part-of=genai-pipelines", "-q", "--no-trunc")
    before = set(docker(*ours).stdout.split())  # another run's leftovers are not this run's
    local_airflow.migrate()
    run = local_airflow.run_dag("genai_finetune", conf, config)
    states = local_airflow.task_states(run)
    assert str(run.state) == "success", states
    results = {task: local_airflow.xcom(run, task) for task in STAGE_TASKS}
    assert not any(r["cache_hit"] for r in results.values())
    for task, result in results.items():
        manifest = Path(result["manifest_uri"].removeprefix("file://"))
        assert manifest.is_file() and str(manifest).startswith(str(root)), task
    published = Path(results["publish"]["metrics"]["uri"].removeprefix("file://"))
    assert (published / "lineage.json").is_file()
    lineage = (published / "lineage.json").read_text()
    assert f"{repository}/trainer:{tag}" in lineage  # the images that made the model are its lineage
    # Every container was removed after its task.
    assert set(docker(*ours).stdout.split()) - before == set()
