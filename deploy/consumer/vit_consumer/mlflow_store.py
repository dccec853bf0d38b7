"""Which MLflow store a block of code talks to, without leaving process-wide state behind.

MLflow's fluent APIs (``mlflow.artifacts.download_artifacts`` for ``models:/`` URIs,
``Model.log``, ``mlflow.<flavour>.load_model``) read the process-wide tracking and
registry URIs (and export them as ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` for
child processes). Setting them for good would send a later caller in the same
process (another store, a notebook, a test) to the wrong place, so they are set for
one block and put back after it, through MLflow's public setters.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

_lock = threading.RLock()


@contextlib.contextmanager
def store_uris(uri: str | None) -> Iterator[None]:
    """Tracking and registry URI ``uri`` inside the block (None: leave them as they are)."""
    if not uri:
        yield
        return
    import mlflow

    # The setters keep the environment variables in step with the URI they set, so the
    # variables say what was set before (unset: MLflow's own default, restored by None).
    with _lock:
        before = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before[0])  # None unsets its variable too
            mlflow.set_registry_uri(before[1])
            if before[1] is None:  # set_registry_uri(None) leaves its variable set
                os.environ.pop("MLFLOW_REGISTRY_URI", None)
