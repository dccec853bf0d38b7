"""The pull step of ``prefect.yaml``: where a worker runs this project's flows from."""

from __future__ import annotations

import os
from pathlib import Path


def checkout(directory: str) -> dict[str, str]:
    """Enters ``directory``, a checkout of this repository (Prefect's ``set_working_directory``, checked).

    Prefect fills ``{{ $VIT_PIPELINE_CHECKOUT }}`` in from the environment the flow run starts in (the
    worker's; on Kubernetes the pod's image, deploy/Dockerfile): ``prefect deploy`` stores the pull step
    unresolved, so each worker names its own checkout, wherever it is on its host. A worker without it
    crashed every flow run with a traceback about a missing entrypoint under a temporary folder; now it is
    one line that says what to set (on the worker's console; Prefect shows the run Crashed).

    Raises:
        RuntimeError: ``directory`` is not a checkout of this repository.
    """
    path = Path(directory or "").expanduser()
    if not directory or "{{" in directory or not (path / "vit_pipeline" / "flows").is_dir():
        raise RuntimeError(
            "Expected VIT_PIPELINE_CHECKOUT in the worker's environment to name its checkout of vit-pipeline. "
            f"Received: directory={directory!r}; start the worker with VIT_PIPELINE_CHECKOUT=/path/to/checkout "
            "(deploy/local.sh worker sets it; deploy/README.md)"
        )
    os.chdir(path)
    return {"directory": os.getcwd()}
