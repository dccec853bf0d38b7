"""The pull step of ``prefect.yaml``: where a worker runs this project's flows from."""

from __future__ import annotations

import os
from pathlib import Path


def checkout(directory: str) -> dict[str, str]:
    """Enters ``directory``, a checkout of this repository (Prefect's ``set_working_directory``, checked).

    ``prefect deploy`` fills ``{{ $VIT_PIPELINE_CHECKOUT }}`` in when it runs; unset then, the deployment
    holds an empty or unfilled path and every flow run crashed with a traceback about a missing
    entrypoint under a temporary folder. Now it is one line that says what to do.

    Raises:
        RuntimeError: ``directory`` is not a checkout of this repository.
    """
    path = Path(directory or "").expanduser()
    if not directory or "{{" in directory or not (path / "vit_pipeline" / "flows").is_dir():
        raise RuntimeError(
            f"Expected VIT_PIPELINE_CHECKOUT to name a checkout of vit-pipeline when `prefect deploy` ran. "
            f"Received: directory={directory!r}; redeploy with VIT_PIPELINE_CHECKOUT=$PWD prefect --no-prompt "
            "deploy --all (deploy/README.md)"
        )
    os.chdir(path)
    return {"directory": os.getcwd()}
