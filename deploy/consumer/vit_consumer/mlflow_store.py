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
from pathlib import Path

_lock = threading.RLock()
# Read by MLflow when it is used, which the consumer does only through this module: no usage pings from serving
# pods (no network beyond the store).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


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


def sqlite_file(uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None: another kind of store, or in memory).

    MLflow creates a missing one, empty, on first use: a mistyped path (or its default, ./mlflow.db) then reads
    as "no such model" or "no runs"; callers that only read check it exists first.
    """
    if not uri or not uri.startswith("sqlite:///"):
        return None
    database = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(database) if database and database != ":memory:" else None


def health_problem(uri: str | None, timeout: float = 5.0) -> str | None:
    """None if the store answers, else what went wrong: an HTTP(S) tracking server's ``/health``.

    Any other store (a local file or SQLite store, Databricks) answers None: there is nothing to probe.
    MLflow's own client retries each request for minutes against a server that is down; one probe with
    a short timeout says so in seconds.
    """
    return probe(uri, timeout)[0]


def probe(uri: str | None, timeout: float = 5.0) -> tuple[str | None, bool]:
    """``health_problem``, and whether the problem is an outage (refused, timed out, a 5xx: worth trying
    again) rather than a wrong address or credentials (a 4xx, a URL that cannot be read)."""
    import urllib.error
    import urllib.request

    if not uri or not uri.startswith(("http://", "https://")):
        return None, False
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            return (None, False) if resp.status == 200 else (f"HTTP {resp.status}", resp.status >= 500)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}", exc.code >= 500
    except OSError as exc:  # URLError (refused, unknown host), timeouts
        return str(getattr(exc, "reason", exc)), True
    except ValueError as exc:  # a URL urllib cannot read
        return str(exc), False


def unavailable(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a store that did not answer, not a fault of what it holds.

    The one test of "MLflow was away" (``vit_pipeline.tracking.unavailable`` adds its own error to it): a
    retry may succeed, while a missing or damaged file, a refused value or a bug would fail the same way
    again. Nothing is decided on an outage (a registry verdict, a version refused for good).
    """
    import http.client
    import sqlite3

    outage: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, http.client.IncompleteRead)
    try:
        import requests
        import urllib3

        outage += (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                   urllib3.exceptions.ProtocolError)  # fmt: skip
    except ImportError:  # pragma: no cover - mlflow brings requests
        pass
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, outage):
            return True
        if isinstance(seen, sqlite3.OperationalError) and "locked" in str(seen):  # a busy store
            return True
        # MLflow re-raises these as plain MlflowExceptions with only their text (a download's failures are
        # gathered into one message, their causes dropped).
        if any(text in str(seen) for text in OUTAGE_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# What the errors of a store that did not answer say: refused, dropped before or during the answer, timed out.
OUTAGE_TEXTS = (
    "Max retries exceeded", "Connection refused", "Failed to establish", "Connection broken", "Connection aborted",
    "Connection reset", "RemoteDisconnected", "IncompleteRead", "Response ended prematurely", "Read timed out",
    "database is locked",
)  # fmt: skip
