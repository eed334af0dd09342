"""GenAI pipeline stages: each module is one stage, run as ``python -m stages.<name>``.

The stage contract (config, artifact layout, manifest commit marker, caching) lives in
``stages.config``, ``stages.store``, ``stages.manifest`` and ``stages.runner``.
"""

__version__ = "0.1.0"
