"""What a crash does not leave behind: atomic writes, one scratch folder per process, no orphaned children."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

SCRATCH_PREFIX = "vit-pipeline-"
LOCK_NAME = ".owner.lock"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it into place on success.

    ``suffix``: the temporary name's ending, for writers that insist on one (Keras: ``.weights.h5``);
    default ``path``'s own suffix.

    The temporary file lives in the same directory so that ``os.replace`` is an
    atomic rename on POSIX. On error the temporary file is removed and ``path`` is
    left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name that the writer creates itself, so the usual umask applies
    # (mkstemp would leave every artifact readable by its owner only).
    tmp_path = path.with_name(
        f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix if suffix is None else suffix}"
    )
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` atomically and returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@functools.cache
def scratch_root() -> Path:
    """This process's folder for temporary files (downloads, exports, benchmark files), removed when it exits.

    The folders of processes that died before removing theirs (SIGKILL, the OOM killer) are removed when the
    next one starts: each killed nightly run left a checkpoint copy in the temporary folder, and the weekly
    benchmark left its ONNX files there even when it ended well. Each folder holds a lock its process (and
    any child it forks) keeps while alive: a folder whose lock can be taken has no live owner, whatever
    process table, container or reused PID (``vit-pipeline-<pid>-*`` names it for people only).
    """
    base = Path(tempfile.gettempdir())
    for stale in base.glob(f"{SCRATCH_PREFIX}*"):
        _remove_if_abandoned(stale)
    root = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=base))
    # Locked, then named: a cleaner starting meanwhile never finds the lock untaken.
    lock = os.open(root / f"{LOCK_NAME}.new", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held until the process (and its forked children) end
    os.rename(root / f"{LOCK_NAME}.new", root / LOCK_NAME)
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def scratch_dir(prefix: str) -> Path:
    """A new folder under ``scratch_root`` (removed with it)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))


def _remove_if_abandoned(folder: Path) -> None:
    """Removes ``folder`` if its lock can be taken (its owner died); one just made, still without a lock, stays."""
    try:
        lock = os.open(folder / LOCK_NAME, os.O_RDWR)
    except OSError:  # no lock yet (being made), or not ours to open
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its process lives
        os.close(lock)
        return
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(lock)


def own_session_ended_with_parent() -> Callable[[], None]:
    """A ``Popen`` ``preexec_fn``: the child in a session of its own (a Ctrl-C at the terminal does not reach
    it: its parent stops it in order) that gets SIGTERM when the thread that started it ends, SIGKILLed
    process included (Linux's parent-death signal; SIGKILL runs no ``finally`` to stop it: a killed run's
    consumer kept its port).

    ``prctl`` is looked up here, in the parent: the forked child of a threaded process only makes system
    calls (a ``dlopen`` there can deadlock on a lock another thread held at the fork).
    """
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    pr_set_pdeathsig = 1

    def in_child() -> None:
        os.setsid()
        if prctl is not None:
            prctl(pr_set_pdeathsig, signal.SIGTERM)

    return in_child
