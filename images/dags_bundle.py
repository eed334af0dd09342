"""The DAGs as a managed Airflow takes them (Cloud Composer, Amazon MWAA, Astronomer), and the pinned list of
what they need on top of Airflow, for that bundle and for the Airflow image alike.

    python3 images/dags_bundle.py --config values/gke/pipeline.yaml --out build/dags-bundle   (make dags-bundle)
    python3 images/dags_bundle.py --image-requirements                             (part of make images-lock)

The bundle is a folder and the same content as ``<out>.zip``:

- ``dags/``: the DAG files and their ``genai_dags`` package, without ``__pycache__``: the service's DAGs folder;
- ``requirements.txt``: pyproject.toml's ``airflow`` extra without Airflow itself (the service provides it) and
  without the Docker provider, plus the filesystem of the config's artifact root (the plan task reads it on the
  worker), each pinned as in pyproject.toml; nothing of ``stages/`` and no torch: each stage has its own image;
- ``pipeline.yaml``: the platform config to edit, copied from ``--config``; where it goes on each service is in
  docs/deploy-composer.md, docs/deploy-mwaa.md and docs/deploy-astronomer.md.

Standard library only, so that it runs before the virtual environment exists.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
IMAGE_REQUIREMENTS = ROOT / "images" / "airflow" / "requirements.txt"
# What every managed service (and the official image) already runs: never installed over it.
AIRFLOW_CORE = ("apache-airflow", "apache-airflow-task-sdk")
# In the `airflow` extra but of no use on a managed service: `runtime: docker` needs a Docker engine beside
# Airflow's workers, which none of them has (the image keeps it for the local docker runtime).
NOT_ON_MANAGED = ("apache-airflow-providers-docker",)
# The pyproject extra that reads each artifact-root scheme (file:// needs none).
STORE_EXTRAS = {"s3": "s3", "gs": "gcs", "abfs": "azure"}
CONFIG_HEADER = """\
# The platform config of the genai-pipelines DAGs on a managed Airflow. Edit it (artifact_root, images, node
# pools, and kubernetes.in_cluster: false with kubernetes.kubernetes_conn_id naming the connection to the
# stage cluster), then give it to Airflow in one of two ways:
#   - the Airflow Variable genai_pipeline_config holding this YAML (or a path to it), or
#   - this file beside the DAGs, named by the environment variable GENAI_PIPELINE_CONFIG.
# Where each goes on Cloud Composer, Amazon MWAA and Astronomer: docs/deploy-composer.md, docs/deploy-mwaa.md,
# docs/deploy-astronomer.md. Copied by images/dags_bundle.py from {source}:
#
"""


def canonical(name: str) -> str:
    """A distribution name as PEP 503 normalises it (lowercase, as Cloud Composer requires)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str]) -> dict[str, str]:
    """{canonical name: version} of ``name==version`` requirements; anything else is a mistake here."""
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)\s*", requirement)
        if not match:
            raise SystemExit(f"pyproject.toml: {requirement!r} is not pinned as name==version")
        found[canonical(match.group(1))] = match.group(3)
    return found


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def airflow_version() -> str:
    return pins(extras()["airflow"])["apache-airflow"]


def dag_requirements(stores: list[str], leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """What the DAGs need on top of Airflow: the ``airflow`` extra less Airflow itself, plus the store extras."""
    project = extras()
    airflow = {n: v for n, v in pins(project["airflow"]).items() if n not in AIRFLOW_CORE + leave_out}
    filesystems: dict[str, str] = {}
    for extra in stores:
        filesystems |= pins(project[extra])
    return airflow | filesystems


def requirements_text(header: str, stores: list[str], leave_out: tuple[str, ...] = ()) -> str:
    """A requirements file: one ``name==version`` a line, full-line comments only (what gcloud accepts)."""
    airflow = dag_requirements([], leave_out)
    filesystems = {n: v for n, v in dag_requirements(stores).items() if n not in airflow and n not in leave_out}
    lines = [header.rstrip("\n"), "# The providers and the Kubernetes client: the `airflow` extra less Airflow."]
    lines += [f"{n}=={v}" for n, v in sorted(airflow.items())]
    if filesystems:
        named = f"extra{'s' if len(stores) > 1 else ''} {', '.join(stores)}"
        lines.append(f"# The artifact root's filesystem ({named}), which the plan task reads on the worker.")
        lines += [f"{n}=={v}" for n, v in sorted(filesystems.items())]
    return "\n".join(lines) + "\n"


def bundle_requirements(stores: list[str]) -> str:
    version, sdk = airflow_version(), pins(extras()["airflow"])["apache-airflow-task-sdk"]
    header = f"""\
# What the genai-pipelines DAGs need on a managed Apache Airflow {version} (Cloud Composer, Amazon MWAA,
# Astronomer), on top of what the service installs. Made for Airflow {version} (task SDK {sdk}). Not here: Airflow
# itself (the service provides it), the stage code and torch (each stage runs from its own image), the Docker
# provider (runtime: docker needs a Docker engine beside the workers).
# Generated by images/dags_bundle.py (make dags-bundle) from the pins in pyproject.toml; do not edit by hand."""
    return requirements_text(header, stores, NOT_ON_MANAGED)


def image_requirements() -> str:
    header = f"""\
# What our DAGs need on top of the official Airflow image (apache/airflow:{airflow_version()}), with every
# object-store filesystem. Installed by images/airflow/Dockerfile; the managed-Airflow bundle
# (make dags-bundle) takes the same pins, less the Docker provider, with the one filesystem its config uses.
# Generated by images/dags_bundle.py --image-requirements (make images-lock) from pyproject.toml; do not edit."""
    return requirements_text(header, sorted(set(STORE_EXTRAS.values())))


def store_extras(config_text: str) -> list[str]:
    """The extra that reads the config's artifact root (none for a local path or file://)."""
    match = re.search(r"""^artifact_root:\s*["']?([a-z][a-z0-9+.-]*)://""", config_text, re.MULTILINE)
    extra = STORE_EXTRAS.get(match.group(1)) if match else None
    return [extra] if extra else []


def build(config: Path, out: Path) -> Path:
    """Write the bundle folder ``out`` and ``out.zip``; returns the zip's path."""
    text = config.read_text(encoding="utf-8")
    if out.is_dir() and any(out.iterdir()) and not (out / "requirements.txt").is_file():
        raise SystemExit(f"--out {out}: not empty and not a bundle made here; refusing to replace it")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(DAGS, out / "dags", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests"))
    (out / "requirements.txt").write_text(bundle_requirements(store_extras(text)))
    source = config.resolve().relative_to(ROOT) if config.resolve().is_relative_to(ROOT) else config
    (out / "pipeline.yaml").write_text(CONFIG_HEADER.format(source=source) + text)
    return Path(shutil.make_archive(str(out), "zip", root_dir=out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "values/gke/pipeline.yaml", help="platform config")
    parser.add_argument("--out", type=Path, default=ROOT / "build/dags-bundle", help="bundle folder (and <out>.zip)")
    parser.add_argument("--image-requirements", action="store_true", help=f"rewrite {IMAGE_REQUIREMENTS.name} only")
    args = parser.parse_args(argv)
    if args.image_requirements:
        IMAGE_REQUIREMENTS.write_text(image_requirements())
        print(f"wrote {IMAGE_REQUIREMENTS.relative_to(ROOT)}")
        return 0
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file (values/<cloud>/pipeline.yaml or your own)")
    archive = build(args.config, args.out)
    size = archive.stat().st_size / 1024
    print(f"{args.out}/: dags/, requirements.txt, pipeline.yaml (from {args.config}); {args.out}.zip ({size:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
