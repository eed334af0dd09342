"""The DAGs bundle for a managed Airflow (make dags-bundle; docs/deploy-composer.md, -mwaa.md, -astronomer.md).

    .venv/bin/python -m pytest tests/test_dags_bundle.py

Fast checks of the bundle's contents, its pins and its DAGs parsed here under each way of giving the config,
and one ``integration`` test that installs the bundle's requirements.txt with Airflow, and nothing else, in a
fresh virtual environment (no system site packages), then runs Airflow's own DAG processor on the bundle with
the platform config as an Airflow Variable in the metadata database and as an environment variable. That
environment is kept under build/dags-bundle-venv/, keyed by Python, Airflow and the pinned requirements:
about a minute the first time (pip, from the package index), reused after that.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
BUILDER = ROOT / "images" / "dags_bundle.py"
VENV_CACHE = ROOT / "build" / "dags-bundle-venv"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS, DEPENDENCIES = PROJECT["optional-dependencies"], PROJECT["dependencies"]
# Each cloud's artifact root is read on the worker by its fsspec filesystem.
FILESYSTEM = {"gke": "gcsfs", "eks": "s3fs", "aks": "adlfs"}
NOT_ON_MANAGED = {"apache-airflow", "apache-airflow-task-sdk", "apache-airflow-providers-docker"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(lines: list[str]) -> dict[str, str]:
    """{canonical name: version} of the ``name==version`` lines; comments and blanks skipped."""
    found = {}
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, version = line.strip().partition("==")
            found[canonical(re.sub(r"\[.*\]", "", name))] = version
    return found


AIRFLOW_EXTRA = pinned(EXTRAS["airflow"])
AIRFLOW = AIRFLOW_EXTRA["apache-airflow"]
EVERY_PIN = pinned(DEPENDENCIES + [r for extra in EXTRAS.values() for r in extra])


def build_bundle(cloud: str, out: Path) -> Path:
    """``images/dags_bundle.py`` as ``make dags-bundle CLOUD=<cloud>`` runs it; returns the bundle folder."""
    config = ROOT / "values" / cloud / "pipeline.yaml"
    done = subprocess.run(
        [sys.executable, BUILDER, "--config", config, "--out", out], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return out


def load_builder():
    spec = importlib.util.spec_from_file_location("dags_bundle", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gke_bundle(tmp_path_factory) -> Path:
    return build_bundle("gke", tmp_path_factory.mktemp("bundle") / "dags-bundle")


# ---------------------------------------------------------------------------------------------
# What is in it


def test_the_bundle_is_the_dags_folder_requirements_and_the_platform_config_as_a_folder_and_a_zip(gke_bundle):
    files = sorted(str(p.relative_to(gke_bundle)) for p in gke_bundle.rglob("*") if p.is_file())
    dags = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "dags").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert files == sorted(["pipeline.yaml", "requirements.txt", *dags])
    assert "dags/genai_finetune.py" in files and "dags/genai_batch_inference.py" in files
    assert "dags/.airflowignore" in files  # keeps the DAG processor out of the helper package
    assert not any(part in ("stages", "tests") for f in files for part in Path(f).parts)
    with zipfile.ZipFile(f"{gke_bundle}.zip") as archive:
        assert sorted(n for n in archive.namelist() if not n.endswith("/")) == files
        assert archive.read("requirements.txt") == (gke_bundle / "requirements.txt").read_bytes()


def test_the_platform_config_is_the_clouds_file_under_a_header_that_says_where_it_goes(gke_bundle):
    text = (gke_bundle / "pipeline.yaml").read_text()
    source = (ROOT / "values/gke/pipeline.yaml").read_text()
    header, _, body = text.partition("#\n")
    assert body == source
    for where in ("genai_pipeline_config", "GENAI_PIPELINE_CONFIG", "in_cluster: false", "kubernetes_conn_id"):
        assert where in header
    for doc in ("docs/deploy-composer.md", "docs/deploy-mwaa.md", "docs/deploy-astronomer.md"):
        assert doc in header and (ROOT / doc).is_file()
    assert yaml.safe_load(text) == yaml.safe_load(source)


# ---------------------------------------------------------------------------------------------
# Its requirements.txt: pyproject's pins, nothing the service already runs, nothing of the stages


@pytest.mark.parametrize("cloud", sorted(FILESYSTEM))
def test_the_requirements_are_pyprojects_pins_of_the_providers_and_the_clouds_filesystem(tmp_path, cloud):
    text = (build_bundle(cloud, tmp_path / "bundle") / "requirements.txt").read_text()
    lines = text.splitlines()
    requirements = pinned(lines)
    assert set(requirements) == (set(AIRFLOW_EXTRA) - NOT_ON_MANAGED) | {FILESYSTEM[cloud]}
    assert requirements == {name: EVERY_PIN[name] for name in requirements}
    # gcloud reads one lowercase PEP 508 name a line and skips only whole-line comments.
    assert all(re.fullmatch(r"#.*|[a-z0-9-]+==[^\s#;]+", line) for line in lines), text
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert f"Apache Airflow {AIRFLOW}" in header and "torch" in header
    assert not {"torch", "transformers", "peft"} & set(requirements)


def test_the_airflow_image_takes_the_same_pins_from_the_same_place():
    """images/airflow/requirements.txt is generated too (make images-lock): the bundle's pins plus the image's."""
    image = ROOT / "images/airflow/requirements.txt"
    assert image.read_text() == load_builder().image_requirements(), "run: make images-lock"
    pins = pinned(image.read_text().splitlines())
    assert set(pins) == (set(AIRFLOW_EXTRA) - {"apache-airflow", "apache-airflow-task-sdk"}) | set(FILESYSTEM.values())
    assert pins == {name: EVERY_PIN[name] for name in pins}


def closure(names: list[str]) -> set[str]:
    """The installed distributions these need, themselves included (markers evaluated here)."""
    env, seen, todo = default_environment(), set(), [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({**env, "extra": ""})):
            continue
        seen.add(name)
        with contextlib.suppress(metadata.PackageNotFoundError):
            todo += [Requirement(r) for r in metadata.requires(name) or []]
    return seen


def distribution_of(module: str) -> str | None:
    """The distribution that provides an imported module; None for the standard library and our own."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in ("__future__", "genai_dags"):
        return None
    if module.startswith("airflow.providers."):
        parts = module.split(".")[2:]
        for k in range(len(parts), 0, -1):
            name = "apache-airflow-providers-" + "-".join(parts[:k])
            with contextlib.suppress(metadata.PackageNotFoundError):
                return canonical(metadata.distribution(name).metadata["Name"])
    if top == "airflow":
        return "apache-airflow-core"
    return canonical(metadata.packages_distributions()[top][0])


def test_every_module_the_dags_import_comes_with_airflow_or_the_requirements(gke_bundle):
    dags = gke_bundle / "dags"
    needed: set[tuple[str, str]] = set()
    for path in dags.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            needed |= {(str(path.relative_to(dags)), d) for m in modules if (d := distribution_of(m))}
    requirements = list(pinned((gke_bundle / "requirements.txt").read_text().splitlines()))
    provided = closure([f"apache-airflow=={AIRFLOW}", *requirements])
    # Only the docker runtime's module needs what a managed service never runs (a Docker engine beside it).
    assert {(f, d) for f, d in needed if d not in provided} == {
        ("genai_dags/docker_operator.py", "apache-airflow-providers-docker"),
        ("genai_dags/docker_operator.py", "docker"),
    }


# ---------------------------------------------------------------------------------------------
# Its DAGs parse here with the config as an Airflow Variable or an environment variable (offline; the
# integration test below does the same with Airflow's DAG processor in an environment without the stages)


@pytest.mark.parametrize("given_as", ["GENAI_PIPELINE_CONFIG", "variable holding the YAML", "variable naming a file"])
def test_the_bundles_dags_parse_with_its_config_given_as(gke_bundle, tmp_path, monkeypatch, given_as):
    from airflow.dag_processing.dagbag import BundleDagBag

    config = tmp_path / "genai_pipeline.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((gke_bundle / "pipeline.yaml").read_text()), "owner": given_as}))
    monkeypatch.delenv("GENAI_PIPELINE_CONFIG", raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_GENAI_PIPELINE_CONFIG", raising=False)
    if given_as == "GENAI_PIPELINE_CONFIG":
        monkeypatch.setenv("GENAI_PIPELINE_CONFIG", str(config))
    else:  # Airflow reads AIRFLOW_VAR_<KEY> first, then its secrets backends, then the metadata database
        monkeypatch.setenv(
            "AIRFLOW_VAR_GENAI_PIPELINE_CONFIG", config.read_text() if "YAML" in given_as else str(config)
        )
    dags = gke_bundle / "dags"
    bag = BundleDagBag(dag_folder=str(dags), bundle_path=str(dags), bundle_name="genai-bundle")
    assert bag.import_errors == {}
    assert sorted(bag.dags) == [
        "genai_batch_inference",
        "genai_finetune",
        "genai_monitor",
        "genai_promote",
        "genai_retrain",
    ]
    for dag in bag.dags.values():
        assert dag.owner == given_as and "kubernetes" in dag.tags
    assert type(bag.dags["genai_finetune"].get_task("train_lora")).__name__ == "StagePodOperator"


# ---------------------------------------------------------------------------------------------
# It installs with Airflow alone and Airflow's DAG processor parses it


NETWORK_ERROR = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Network is unreachable"
    r"|Failed to establish a new connection|ProxyError"
)


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that points at the project or its Airflow."""
    drop = ("AIRFLOW", "GENAI_", "PYTHONPATH", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.fixture(scope="module")
def clean_venv(gke_bundle) -> Path:
    """A virtual environment with apache-airflow and the bundle's requirements.txt only, made once per pin set."""
    requirements = gke_bundle / "requirements.txt"
    pins = "\n".join(sorted(f"{n}=={v}" for n, v in pinned(requirements.read_text().splitlines()).items()))
    key = hashlib.sha256(f"{sys.version}\napache-airflow=={AIRFLOW}\n{pins}".encode()).hexdigest()[:16]
    venv = VENV_CACHE / key
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    with open(VENV_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be making the same one
        if not (venv / ".complete").is_file():
            for old in VENV_CACHE.iterdir():  # a few hundred MB each: keep the current one only
                if old.is_dir():
                    shutil.rmtree(old)
            subprocess.run([sys.executable, "-m", "venv", venv], check=True, env=clean_environment())
            done = subprocess.run(
                [
                    venv / "bin/python",
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    f"apache-airflow=={AIRFLOW}",
                    "-r",
                    requirements,
                ],
                capture_output=True,
                text=True,
                env=clean_environment(),
                timeout=900,
            )
            if done.returncode != 0:
                shutil.rmtree(venv)
                if NETWORK_ERROR.search(done.stderr):
                    pytest.skip(f"no package index reachable to install Airflow: {done.stderr.strip()[-300:]}")
                pytest.fail(f"the bundle's requirements do not install with Airflow {AIRFLOW}:\n{done.stderr[-4000:]}")
            (venv / ".complete").write_text(pins + "\n")
    return venv


# Runs in the clean environment: for each case, set or clear the Airflow Variable in the metadata database, run
# Airflow's DAG processor once over the bundle, and report what it stored (owner, tags, task types) or its errors.
PARSE = r"""
import importlib.util, json, os, subprocess, sys
from pathlib import Path
from airflow.models.errors import ParseImportError
from airflow.models.serialized_dag import SerializedDagModel
from airflow.models.variable import Variable
from airflow.utils.session import create_session

airflow = Path(sys.executable).parent / "airflow"
results = {"modules": {m: bool(importlib.util.find_spec(m)) for m in ("stages", "torch", "transformers")}}
for case in json.loads(sys.argv[1]):
    Variable.delete("genai_pipeline_config")
    if case["variable"] is not None:
        Variable.set("genai_pipeline_config", case["variable"])
    done = subprocess.run(
        [airflow, "dag-processor", "--num-runs", "1"], env={**os.environ, **case["env"]},
        capture_output=True, text=True, timeout=300,
    )
    with create_session() as session:
        errors = {e.filename: e.stacktrace[-2000:] for e in session.query(ParseImportError)}
    dags = {}
    for dag_id in ("genai_finetune", "genai_batch_inference", "genai_promote", "genai_monitor", "genai_retrain"):
        dag = SerializedDagModel.get_dag(dag_id)
        dags[dag_id] = dag and {
            "owners": sorted({t.owner for t in dag.tasks}),
            "tags": sorted(dag.tags),
            "task_types": sorted({t.task_type for t in dag.tasks}),
        }
    results[case["name"]] = {"rc": done.returncode, "errors": errors, "dags": dags, "log": done.stderr[-2000:]}
print(json.dumps(results))
"""


@pytest.mark.integration
def test_the_bundle_installs_with_airflow_alone_and_parses_with_the_config_as_a_variable_or_an_environment_variable(
    gke_bundle, clean_venv, tmp_path
):
    config = yaml.safe_load((gke_bundle / "pipeline.yaml").read_text())

    def config_file(owner: str) -> Path:
        path = tmp_path / f"{owner}.yaml"
        path.write_text(yaml.safe_dump({**config, "owner": owner}))
        return path

    cases = [  # each config tells itself apart by its owner
        {"name": "variable holding the YAML", "owner": "yaml-in-variable", "env": {}},
        {"name": "variable naming a file", "owner": "file-in-variable", "env": {}},
        {"name": "environment variable", "owner": "file-in-env", "variable": None},
    ]
    cases[0]["variable"] = config_file(cases[0]["owner"]).read_text()
    cases[1]["variable"] = str(config_file(cases[1]["owner"]))
    cases[2]["env"] = {"GENAI_PIPELINE_CONFIG": str(config_file(cases[2]["owner"]))}
    home = tmp_path / "airflow-home"
    env = clean_environment() | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(gke_bundle / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # Store every parse: by default a DAG parsed again within 30 s keeps its previous serialization.
        "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "0",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
    }
    airflow = clean_venv / "bin" / "airflow"
    run = {"env": env, "cwd": tmp_path, "capture_output": True, "text": True}  # cwd: not the repository's stages
    migrate = subprocess.run([airflow, "db", "migrate"], **run, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    done = subprocess.run([clean_venv / "bin/python", "-c", PARSE, json.dumps(cases)], **run, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])

    assert results.pop("modules") == {"stages": False, "torch": False, "transformers": False}
    for case in cases:
        result = results[case["name"]]
        assert result["rc"] == 0 and result["errors"] == {}, (case["name"], result)
        for dag_id, dag in result["dags"].items():
            assert dag["owners"] == [case["owner"]], (case["name"], dag_id, dag)
            assert "kubernetes" in dag["tags"], (case["name"], dag)
            if dag_id not in ("genai_promote", "genai_retrain"):  # they run no stage
                assert "StagePodOperator" in dag["task_types"], (case["name"], dag)
