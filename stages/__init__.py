"""GenAI pipeline stages: each module is one stage, run as ``python -m stages.<name>``.

The stage contract (config, artifact layout, manifest commit marker, caching) lives in the shared
library :mod:`stages.core`, which every stage uses and which imports no stage.
"""

__version__ = "0.1.0"
