"""One description per stage: the command, the node pool, the resources and the time limit.

Every runtime (local subprocess, Kubernetes pod) is built from this table, so what a stage needs
is written once, next to its name. The contract between a task and its stage is the command line
``python -m stages.<name> key=value ...``: DAG code never imports ``stages`` (torch must not load in
the scheduler); ``tests/test_dags_contract.py`` proves the two agree.

Platform teams adjust resources and timeouts per cluster in the pipeline config (``stages:``),
never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from genai_dags.settings import PipelineSettings


@dataclass(frozen=True)
class StageSpec:
    name: str
    image: str  # which image of images/ runs it: <repository>/<image>:<tag>
    node_pool: str  # "cpu" or "gpu-spot" (a gpu-spot stage's last retry runs on "gpu-on-demand")
    cpu: str
    memory: str
    gpu: int
    timeout: timedelta
    doc: str

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    @property
    def command(self) -> list[str]:
        return ["python", "-m", self.module]


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "tokenize",
            "tokenizer",
            "cpu",
            cpu="4",
            memory="8Gi",
            gpu=0,
            timeout=timedelta(hours=2),
            doc="Ingest, clean, tokenize and pack the training text; split train/validation.",
        ),
        StageSpec(
            "train_lora",
            "trainer",
            "gpu-spot",
            cpu="8",
            memory="32Gi",
            gpu=1,
            timeout=timedelta(hours=12),
            doc="LoRA fine-tuning; checkpoints every N steps and on SIGTERM, resumes on retry.",
        ),
        StageSpec(
            "evaluate",
            "evaluator",
            "gpu-spot",
            cpu="4",
            memory="16Gi",
            gpu=1,
            timeout=timedelta(hours=2),
            doc="Held-out perplexity before/after, samples, report and the quality-gate verdict.",
        ),
        StageSpec(
            "batch_infer",
            "inferencer",
            "gpu-spot",
            cpu="4",
            memory="16Gi",
            gpu=1,
            timeout=timedelta(hours=4),
            doc="Generate completions for a JSONL of prompts (optionally one shard of many).",
        ),
        StageSpec(
            "merge_predictions",
            "tokenizer",
            "cpu",
            cpu="1",
            memory="2Gi",
            gpu=0,
            timeout=timedelta(hours=1),
            doc="Concatenate batch_infer shard outputs, in shard order, into one predictions.jsonl.",
        ),
        StageSpec(
            "publish",
            "tokenizer",
            "cpu",
            cpu="1",
            memory="2Gi",
            gpu=0,
            timeout=timedelta(minutes=30),
            doc="Copy adapter, evaluation and lineage to <artifact_root>/models/<name>/<version>/.",
        ),
    )
}


@dataclass(frozen=True)
class ResolvedStage:
    """A stage spec with the platform's per-stage overrides applied."""

    spec: StageSpec
    cpu: str
    memory: str
    gpu: int
    timeout: timedelta
    image: str
    priority_class: str = ""  # empty: the node pool's

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def uses_gpu(self) -> bool:
        return self.gpu > 0

    @property
    def node_pool(self) -> str:
        """Where the pod runs: the GPU request decides (a platform may run evaluate on CPUs with gpu: 0)."""
        return "gpu-spot" if self.uses_gpu else "cpu"


def resolve(name: str, settings: PipelineSettings) -> ResolvedStage:
    spec = STAGES[name]
    o = settings.stage_override(name)
    return ResolvedStage(
        spec=spec,
        cpu=o.cpu or spec.cpu,
        memory=o.memory or spec.memory,
        gpu=spec.gpu if o.gpu is None else o.gpu,
        timeout=timedelta(minutes=o.timeout_minutes) if o.timeout_minutes else spec.timeout,
        image=settings.image_for(name),
        priority_class=o.priority_class or "",
    )
