"""GenAI pipeline stages: each module is one stage, run as ``python -m stages.<name>``.

The stage contract (config, artifact layout, manifest commit marker, caching) lives in the shared
library :mod:`stages.core`, which every stage uses and which imports no stage.
"""

import os
import signal
import sys

__version__ = "0.1.0"

# In a container the stage is PID 1, which the kernel spares from SIGTERM's default action: a pod deleted
# (or a spot node reclaimed) while the stage still imports its libraries would wait out the grace period
# and end in SIGKILL. Exit 143 at once instead; the stage contract installs its own handler before work.
if os.getpid() == 1:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
