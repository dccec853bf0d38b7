"""Atomic file writes: a crash never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


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
