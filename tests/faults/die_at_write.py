"""Run a stage and SIGKILL it in the middle of its n-th write to the artifact store.

    python tests/faults/die_at_write.py <stage> <n> key=value ...      # n = 0: never die, count the writes

The n-th write is left torn, as a real kill leaves it: half of the bytes at the destination for a
streamed upload or copy, half of them in the temp file of an atomic small write (manifest.json
included). What was torn goes to ``$FAULT_RECORD`` as JSON (uri, sha256 of the torn bytes); with
n = 0 the number of writes goes there when the stage ends. The stage is the real one, unchanged.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import runpy
import signal
import sys
from pathlib import Path

from stages.core import store, uris

STAGE, KILL_AT = sys.argv[1], int(sys.argv[2])
RECORD = Path(os.environ["FAULT_RECORD"])
writes = 0


def _die(uri: str, data: bytes, atomic: bool) -> None:
    torn = data[: len(data) // 2]
    target = uris.local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.with_name(f".{target.name}.tmp-killed") if atomic else target).write_bytes(torn)
    RECORD.write_text(json.dumps({"uri": uri, "atomic": atomic, "sha256": hashlib.sha256(torn).hexdigest()}))
    os.kill(os.getpid(), signal.SIGKILL)


def _counting(original, atomic: bool, uri_of, data_of):
    def write(*args, **kwargs):
        global writes
        uri = uri_of(*args)
        # The write probe and the attempt records (stages.core.costs: bookkeeping beside the outputs, written
        # again after the commit) are not the stage's writes.
        if not uri.endswith("/.write-probe") and "/.attempts/" not in uri:
            writes += 1
            if writes == KILL_AT:
                _die(uri, data_of(*args), atomic)
        return original(*args, **kwargs)

    return write


store.write_bytes = _counting(store.write_bytes, True, lambda uri, data, *_: uri, lambda uri, data, *_: data)
store._upload = _counting(store._upload, False, lambda local, uri: uri, lambda local, uri: Path(local).read_bytes())
store.copy_file = _counting(store.copy_file, False, lambda src, dst: dst, lambda src, dst: store.read_bytes(src))
if KILL_AT == 0:
    atexit.register(lambda: RECORD.write_text(json.dumps({"writes": writes})))
sys.argv = [f"stages.{STAGE}", *sys.argv[3:]]
runpy.run_module(f"stages.{STAGE}", run_name="__main__", alter_sys=True)
