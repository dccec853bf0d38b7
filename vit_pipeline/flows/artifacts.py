"""Prefect artifacts (a flow run's table or summary page), attached as a courtesy.

Everything an artifact shows is also in the MLflow run, which is the record. So a Prefect
API that is gone when the artifact is written (a server restarted after the register stage)
costs the artifact and a warning, not the run: it failed the run whose version had just
become champion (a champion from a FAILED run).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def table(key: str, rows: Any, description: str) -> None:
    """``prefect.artifacts.create_table_artifact``, best effort."""
    from prefect.artifacts import create_table_artifact

    _attach(key, lambda: create_table_artifact(key=key, table=rows, description=description))


def markdown(key: str, text: str, description: str) -> None:
    """``prefect.artifacts.create_markdown_artifact``, best effort."""
    from prefect.artifacts import create_markdown_artifact

    _attach(key, lambda: create_markdown_artifact(key=key, markdown=text, description=description))


def _attach(key: str, create) -> None:
    try:
        create()
    except Exception as exc:  # the Prefect API away: the MLflow run holds the same figures
        log.warning("Prefect artifact %r not attached (%s: %s); the MLflow run holds its figures", key,
                    type(exc).__name__, str(exc)[:300])  # fmt: skip
