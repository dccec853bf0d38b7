"""Measurements in a fresh Python: run a child, read the JSON it prints on a marked line.

Memory peaks and training speed are only honest in a process of their own
(nothing loaded before, nothing left behind). The child prints its figures as
``<marker> {json}``; anything else it prints (TensorFlow's chatter) is ignored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_child(argv: list[str], marker: str, timeout: float = 600) -> dict[str, Any]:
    """Runs ``python *argv``; returns the JSON after ``marker`` on its last such stdout line.

    Returns:
        The child's figures, or ``{"error": "<one line>"}`` for a non-zero exit,
        a missing marked line or a timeout (the stderr line naming the error).
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        out = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    found = [line for line in out.stdout.splitlines() if line.startswith(marker)]
    if out.returncode != 0 or not found:
        lines = out.stderr.strip().splitlines() or ["no output"]
        tail = next((line for line in reversed(lines) if "Error:" in line), lines[-1]).strip()
        return {"error": f"exit {out.returncode}: {tail[:200]}"}
    return json.loads(found[-1][len(marker) :])


def report(marker: str, figures: dict[str, Any]) -> None:
    """The child's side: prints ``figures`` on the marked line ``run_child`` reads."""
    print(marker + json.dumps(figures), flush=True)
