"""Files that qnnjit's caches keep on disk: where they live, and how one is
written and read so that a damaged file is never used.

Every cache sits under one root: ``$QNNJIT_CACHE_DIR``, else the user's cache
directory (``$XDG_CACHE_HOME/qnnjit``, default ``~/.cache/qnnjit``);
``QNNJIT_CACHE_DIR=""`` (empty) turns every disk cache off. Users of it:
the GEMM microkernels' object files (``backends/cpu/llvmjit``), the thread
team's trampolines (``backends/cpu/spinteam``), the Numba kernels
(``backends/cpu/kernels/_numba``) and optimized graphs (``compiler/graph_cache``).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
from pathlib import Path

__all__ = ["cache_dir", "read_checked", "write_checked"]

_MAGIC = b"QNNJITO1"


def cache_dir() -> Path | None:
    """The caches' root, or None when disabled (``QNNJIT_CACHE_DIR=""``)."""
    env = os.environ.get("QNNJIT_CACHE_DIR")
    if env is not None:
        return Path(env) if env.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qnnjit"


def read_checked(path: Path) -> bytes | None:
    """The payload stored at ``path`` by `write_checked` if it is intact
    (magic and SHA-256 of the payload match); None if absent or damaged.
    LLVM does not survive loading a corrupt object file, and a flipped bit in
    a pickled weight would load without complaint, so nothing unchecked is
    used. The file is mapped, not read: a 12 MB graph is checked in ~8 ms
    instead of ~16 ms."""
    head = len(_MAGIC) + 32
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if len(data) <= head or data[: len(_MAGIC)] != _MAGIC:
                return None
            with memoryview(data) as view:
                if hashlib.sha256(view[head:]).digest() != data[len(_MAGIC) : head]:
                    return None
                return view[head:].tobytes()
    except (OSError, ValueError):  # absent, unreadable, or empty (mmap's ValueError)
        return None


def write_checked(path: Path, payload: bytes) -> None:
    """Store ``payload`` at ``path`` for `read_checked`, atomically: a reader
    in another process sees the old file, the new one, or none."""
    _write_atomic(path, _MAGIC + hashlib.sha256(payload).digest() + payload)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
