"""Where the CPU kernels' results live.

Kernels allocate their results with `empty`, which is `np.empty` except
inside a `pooled(pool)` block. There (the recording of a run,
`backends/cpu/replay.py`), each result is carved from a buffer of the
`Pool` that no live tensor uses, so a recorded run, which keeps its buffers
for every later run on its shapes, holds about as much memory as the
largest set of tensors live at once, not the sum of all its tensors
(ResNet-18 at batch 8: 22.7 MB of results). The recorder says which tensors
are live before each step (`Pool.hold_only`); a replay repeats the steps in
the recorded order, so a buffer is rewritten only after the last reader of
the tensor it held before.
"""

from __future__ import annotations

import math
import threading

import numpy as np

_ALIGN = 64  # bytes: a cache line, and a whole AVX-512 vector


class Pool:
    """Byte buffers that results are carved from, each holding one tensor at a
    time (and views of it)."""

    def __init__(self) -> None:
        self._buffers: list[np.ndarray] = []
        self._busy: set[int] = set()  # ids of the buffers live tensors use

    def hold_only(self, arrays) -> None:
        """Keep the buffers under `arrays` (the live tensors) and free the rest."""
        self._busy = {id(root(a)) for a in arrays if isinstance(a, np.ndarray)}

    def take(self, nbytes: int) -> np.ndarray:
        """`nbytes` bytes, 64-byte aligned, from the smallest free buffer that
        holds them (a new one if none does); busy until `hold_only` frees it."""
        free = [b for b in self._buffers if id(b) not in self._busy and b.size >= nbytes + _ALIGN]
        if free:
            raw = min(free, key=lambda b: b.size)
        else:
            raw = np.empty(nbytes + _ALIGN, np.uint8)
            self._buffers.append(raw)
        self._busy.add(id(raw))
        offset = -raw.ctypes.data % _ALIGN
        return raw[offset : offset + nbytes]

    @property
    def nbytes(self) -> int:
        return sum(b.size for b in self._buffers)


def root(array: np.ndarray) -> np.ndarray:
    """The array that owns `array`'s memory (the end of its chain of views)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class pooled:
    """`with pooled(pool):` this thread's `empty` calls draw from `pool`."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def __enter__(self) -> Pool:
        self._outer = getattr(_ACTIVE, "pool", None)
        _ACTIVE.pool = self.pool
        return self.pool

    def __exit__(self, *exc) -> None:
        _ACTIVE.pool = self._outer


def empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous result array: `np.empty`, or from this
    thread's pool inside `pooled`."""
    pool = getattr(_ACTIVE, "pool", None)
    if pool is None:
        return np.empty(shape, dtype)
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    return pool.take(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


_ACTIVE = threading.local()
