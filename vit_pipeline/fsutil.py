"""Files a crash does not leave behind: atomic writes, and one scratch folder per process."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

SCRATCH_PREFIX = "vit-pipeline-"


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

    The folders of this host's processes that died before removing theirs (SIGKILL, the OOM killer) are
    removed when the next one starts: each killed nightly run left a checkpoint copy in the temporary
    folder, and the weekly benchmark left its ONNX files there even when it ended well. Named
    ``vit-pipeline-<host>-<pid>-*``: a process of another host (or container) sharing the folder is not
    judged by this host's process table.
    """
    base, host = Path(tempfile.gettempdir()), _host()
    for stale in base.glob(f"{SCRATCH_PREFIX}{host}-*-*"):
        pid = stale.name[len(SCRATCH_PREFIX) + len(host) + 1 :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{host}-{os.getpid()}-", dir=base))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def scratch_dir(prefix: str) -> Path:
    """A new folder under ``scratch_root`` (removed with it)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
