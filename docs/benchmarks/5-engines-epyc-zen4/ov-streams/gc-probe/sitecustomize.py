"""GC probe: prints every collection of 5 ms or more (put this folder on PYTHONPATH).

GCPROBE_NOFREEZE=1 makes ``gc.freeze`` a no-op: the service as it was before it froze its heap.
"""

import gc
import os
import sys
import time

_started: dict[str, float] = {}


def _callback(phase: str, info: dict) -> None:
    if phase == "start":
        _started["t"] = time.perf_counter()
        return
    ms = (time.perf_counter() - _started.get("t", time.perf_counter())) * 1e3
    if ms > 5:
        print(f"GCPROBE pid={os.getpid()} {sys.argv[0][-20:]} gen={info['generation']} ms={ms:.1f} "
              f"collected={info['collected']}", file=sys.stderr, flush=True)  # fmt: skip


gc.callbacks.append(_callback)
if os.environ.get("GCPROBE_NOFREEZE") == "1":
    gc.freeze = lambda: None
