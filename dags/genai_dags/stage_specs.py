"""One description per stage: the command, the node pool, the resources and the time limit.

Every runtime (local subprocess, Kubernetes pod, local container) is built from this table, so what a stage needs
is written once, next to its name. The contract between a task and its stage is the command line
``python -m stages.<name> key=value ...``: DAG code never imports ``stages`` (torch must not load in
the scheduler); ``tests/test_dags_contract.py`` proves the two agree.

Platform teams adjust resources and timeouts per cluster in the pipeline config (``stages:``),
never here: ``PipelineSettings.stage(name)`` applies their overrides. A leaf: it imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

# PID 1 of every stage container (images/stage-base installs it): it forwards signals to the stage, which then
# gets SIGTERM's default action even before its own handler is installed. As PID 1 itself the stage would be
# spared that action: a pod deleted while Python still starts would wait out its grace period.
CONTAINER_INIT = ("dumb-init", "--")


@dataclass(frozen=True)
class StageSpec:
    name: str
    image: str  # which image of images/ runs it: <repository>/<image>:<tag>
    cpu: str
    memory: str
    gpu: int  # > 0: the gpu-spot node pool (its last retry on gpu-on-demand); 0: the cpu pool
    timeout: timedelta
    doc: str
    conf_group: str | None = None  # the run conf's group of this stage's tunables (genai_dags.params.TUNABLES)

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    @property
    def command(self) -> list[str]:
        return ["python", "-m", self.module]

    @property
    def container_command(self) -> list[str]:
        """The command in a container (pod or Docker): the stage under the image's init."""
        return [*CONTAINER_INIT, *self.command]


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "tokenize",
            "tokenizer",
            cpu="4",
            memory="8Gi",
            gpu=0,
            timeout=timedelta(hours=2),
            doc="Ingest, clean, tokenize and pack the training text; split train/validation.",
            conf_group="tokenize",
        ),
        StageSpec(
            "train_lora",
            "trainer",
            cpu="8",
            memory="32Gi",
            gpu=1,
            timeout=timedelta(hours=12),
            doc="LoRA fine-tuning; checkpoints every N steps and on SIGTERM, resumes on retry.",
            conf_group="train",
        ),
        StageSpec(
            "evaluate",
            "evaluator",
            cpu="4",
            memory="16Gi",
            gpu=1,
            timeout=timedelta(hours=2),
            doc="Held-out perplexity before/after, samples, report and the quality-gate verdict.",
            conf_group="evaluate",
        ),
        StageSpec(
            "batch_infer",
            "inferencer",
            cpu="4",
            memory="16Gi",
            gpu=1,
            timeout=timedelta(hours=4),
            doc="Generate completions for a JSONL of prompts (optionally one shard of many).",
            conf_group="inference",
        ),
        StageSpec(
            "merge_predictions",
            "tokenizer",
            cpu="1",
            memory="2Gi",
            gpu=0,
            timeout=timedelta(hours=1),
            doc="Concatenate batch_infer shard outputs, in shard order, into one predictions.jsonl.",
        ),
        StageSpec(
            "drift",
            "evaluator",
            cpu="2",
            memory="8Gi",
            gpu=0,
            timeout=timedelta(hours=1),
            doc="Perplexity ratio and token divergence of a new batch against a model's data; the drift verdict.",
        ),
        StageSpec(
            "publish",
            "tokenizer",
            cpu="1",
            memory="2Gi",
            gpu=0,
            timeout=timedelta(minutes=30),
            doc="Copy adapter, evaluation and lineage to <artifact_root>/models/<name>/<version>/.",
        ),
    )
}

STAGE_NAMES = tuple(STAGES)
