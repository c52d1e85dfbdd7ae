"""The optimized-graph cache: a model compiled before skips its frontend and
the compiler passes.

`qnnjit.compile` keys a model by the SHA-256 of its bytes (an .onnx file's or
the bytes passed in), the compile options that change the passes' output, and
a fingerprint of everything else that can change the optimized graph: the
source of every qnnjit module but the CPU backend's (frontends, IR, ops,
passes, the reference interpreter that folds constants) and the versions of
Python, NumPy and ONNX. A hit unpickles the optimized graph: no ONNX import, no
loading, no passes. For ResNet-18 in a fresh process that is ~0.15 s of the
warm compile; the hit itself costs ~40 ms (the fingerprint 5 ms, hashing the
12 MB model 8 ms, checking and unpickling the entry 25 ms).

Entries are files under ``$QNNJIT_CACHE_DIR/graphs`` (`diskcache`), written
atomically with a checksum that is verified before unpickling. The 32 most
recently used entries are kept, at most 2 GiB together. A damaged or
unreadable entry is a miss.

Compiles that neither read nor write the cache:
- an `onnx.ModelProto` (hashing it would first serialize it);
- a model whose bytes contain ``b"location"``: ONNX keeps the file name of
  external weight data under that key, and files the key does not cover
  could change under it;
- a compile whose frontend or passes warned (a hit would not warn again);
- ``QNNJIT_VERIFY`` or ``QNNJIT_DUMP_IR`` set: both ask to watch the passes run;
- ``QNNJIT_GRAPH_CACHE=0``, or every disk cache off (``QNNJIT_CACHE_DIR=""``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import mmap
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import diskcache
from ..ir.graph import Graph

_FORMAT = b"qnnjit-graph-v1"
MAX_ENTRIES = 32
MAX_BYTES = 2 << 30
# ONNX keeps the file name of external weight data under this key.
_EXTERNAL_DATA = b"location"
_PACKAGE = Path(__file__).resolve().parent.parent  # qnnjit/
_NOT_FINGERPRINTED = ("backends/cpu",)  # keyed by its own kernel caches; runs after the graph


@dataclass
class Entry:
    """What `compile` keeps of a model: the optimized graph, and the two
    things its report needs from before the passes."""

    graph: Graph
    before_counts: dict[str, int]
    before_ir: str


def key_for(model, options: dict) -> str | None:
    """The cache key of compiling `model` with `options` (a dict of plain
    values), or None when this compile must not use the cache."""
    if os.environ.get("QNNJIT_GRAPH_CACHE", "").strip() == "0" or _directory() is None:
        return None
    if any(os.environ.get(v, "") not in ("", "0") for v in ("QNNJIT_VERIFY", "QNNJIT_DUMP_IR")):
        return None
    h = hashlib.sha256(_FORMAT)
    h.update(_fingerprint())
    h.update(repr(sorted(options.items())).encode())
    with _model_bytes(model) as data:
        if data is None:
            return None
        h.update(data)
    return h.hexdigest()[:40]


def load(key: str) -> Entry | None:
    """The entry stored under `key`, or None (absent, damaged, stale format)."""
    path = _directory() / f"{key}.pkl"
    payload = diskcache.read_checked(path)
    if payload is None:
        return None
    try:
        entry = pickle.loads(payload)
    except Exception:  # noqa: BLE001 - classes that moved since it was written: a miss
        return None
    if not isinstance(entry, Entry):
        return None
    try:
        os.utime(path)  # most recently used: the last to be evicted
    except OSError:
        pass
    return entry


def store(key: str, entry: Entry, model) -> None:
    """Keep `entry`, compiled from `model`, under `key`; then evict the least
    recently used entries beyond the limits. A model that may keep weights in
    external files is not kept (their content is not in the key), nor is one
    whose graph does not pickle. A cache that cannot be written only costs time."""
    with _model_bytes(model) as data:
        if data is None or data.find(_EXTERNAL_DATA) >= 0:
            return
    try:
        payload = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an attribute that does not pickle: compiled each time
        return  # (tests/test_graph_cache.py checks that every zoo model is stored)
    directory = _directory()
    try:
        diskcache.write_checked(directory / f"{key}.pkl", payload)
        _evict(directory)
    except OSError:
        pass


def _directory() -> Path | None:
    root = diskcache.cache_dir()
    return None if root is None else root / "graphs"


@contextlib.contextmanager
def _model_bytes(model):
    """The model's bytes (a file mapped, not read: hashing ResNet-18's 12 MB
    takes ~9 ms instead of ~15 ms), or None for anything but a readable
    non-empty file or bytes."""
    if isinstance(model, bytes):
        yield model
        return
    if not isinstance(model, (str, os.PathLike)):
        yield None
        return
    try:
        f = open(model, "rb")
    except OSError:
        yield None  # the frontend reports it
        return
    with f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # empty, or not a regular file
            yield None
            return
        with data:
            yield data


@functools.cache
def _fingerprint() -> bytes:
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        relative = path.relative_to(_PACKAGE).as_posix()
        if relative.startswith(_NOT_FINGERPRINTED):
            continue
        h.update(relative.encode())
        h.update(path.read_bytes())
    h.update(sys.version.encode())
    h.update(np.__version__.encode())
    h.update(_onnx_version())
    return h.digest()


def _onnx_version() -> bytes:
    """ONNX's version file, read without importing ONNX (~0.05 s)."""
    spec = importlib.util.find_spec("onnx")
    if spec is None or spec.origin is None:
        return b"no onnx"
    try:
        return (Path(spec.origin).parent / "version.py").read_bytes()
    except OSError:
        stat = os.stat(spec.origin)
        return f"{spec.origin} {stat.st_size} {stat.st_mtime_ns}".encode()


def _evict(directory: Path) -> None:
    entries = []
    for path in directory.glob("*.pkl"):
        try:
            stat = path.stat()
        except OSError:
            continue  # evicted by another process meanwhile
        entries.append((stat.st_mtime_ns, stat.st_size, path))
    entries.sort(reverse=True)  # most recently used first
    kept_bytes = 0
    for index, (_, size, path) in enumerate(entries):
        kept_bytes += size
        if index >= MAX_ENTRIES or kept_bytes > MAX_BYTES:
            try:
                path.unlink()
            except OSError:
                pass
