"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every artefact a run leaves (config, history, checkpoint, ledger, model, registry) is written
through these helpers: the data goes to a temporary file in the same folder, is flushed and
fsync'ed, and replaces the target with ``os.replace`` (atomic on POSIX, rename(2)).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save"]


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *,
                 mode: int | None = None) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, then move it into place.

    ``mode`` sets the file's permissions before it becomes visible (``0o600`` for secrets).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        else:  # mkstemp creates 0600; a plain artefact gets the umask's usual mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda fh: fh.write(data), mode=mode)


def atomic_write_text(path: str | Path, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (torch is imported only when called)."""
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))
