"""The ``genaiStage`` run facet: what a stage task's OpenLineage events say beyond datasets.

Its JSON Schema is ``docs/openlineage/GenaiStageRunFacet.json`` (the facet's ``_schemaURL``); a custom facet
in OpenLineage is an attrs class deriving from the client's ``RunFacet``, fields in camelCase. Imported only
when an event is built (``genai_dags.lineage``): the OpenLineage client is not needed to parse the DAGs.
"""

from __future__ import annotations

from typing import Any

import attr
from openlineage.client.facet_v2 import RunFacet

PRODUCER = "https://github.com/genai-pipelines/genai-pipelines"
SCHEMA_URL = (
    "https://raw.githubusercontent.com/genai-pipelines/genai-pipelines/main/docs/openlineage/"
    "GenaiStageRunFacet.json#/$defs/GenaiStageRunFacet"
)


@attr.define
class GenaiStageRunFacet(RunFacet):
    """One stage's run: how its output was made (or found already made) and what it measured."""

    stage: str
    """The stage: ``python -m stages.<stage>``."""
    cacheHit: bool | None = attr.field(default=None)
    """True when the stage found its output committed for the same inputs, config and code, and did no work."""
    cacheKey: str | None = attr.field(default=None)
    """sha256 of the stage, its config, its inputs' content hashes and its code: what makes the output reusable."""
    codeVersion: str | None = attr.field(default=None)
    """The stages package version."""
    sourceSha256: str | None = attr.field(default=None)
    """sha256 of the code the stage ran (its module and the shared library)."""
    image: str | None = attr.field(default=None)
    """The container image that ran the stage (kubernetes and docker runtimes)."""
    manifestUri: str | None = attr.field(default=None)
    """The committed manifest.json: inputs with hashes, resolved config, outputs with hashes."""
    metrics: dict[str, Any] | None = attr.field(default=None)
    """The stage's metrics, as its result line has them (evaluate: scores and the quality gate)."""
    publishedModel: dict[str, str] | None = attr.field(default=None)
    """publish: ``model_name``, ``version`` and ``uri`` of the model version it published."""

    def __attrs_post_init__(self) -> None:
        self._producer = self._producer or PRODUCER
        super().__attrs_post_init__()

    @staticmethod
    def _get_schema() -> str:
        return SCHEMA_URL
