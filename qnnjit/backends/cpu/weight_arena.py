"""Where a compiled model's packed GEMM weights live: one arena per model,
filled in the order the lowering packs them (the order the steps run), in
memory advised to use huge pages.

Why. Between two runs of a model, its weights leave the caches (ResNet-18's
11.7 MB of them share the L3 with the rest of the run and with whatever else
runs on the machine), so every GEMM starts on weights in memory. Each
microkernel prefetches the B bytes ``kg`` groups past its block
(ukernels PREFETCH_DOC); past a GEMM's last panel that lands on the bytes
that follow its weights in memory, which here are the next GEMM's first
panel, so a step's first weights arrive while the step before it finishes.
And on 4 KiB pages the weights need a TLB entry each (2900 for ResNet-18,
as many as a core's second-level TLB holds), on 2 MiB pages six.
ResNet-18 at one thread, end to end, minimum of 200 runs, four processes
each, alternated: 8.59-8.83 ms with each weight its own allocation,
8.56-8.68 contiguous on 4 KiB pages, 8.55-8.62 contiguous on huge pages;
the median of the 200 runs fell more (8.96-9.61 -> 8.71-8.89 ms).

Use. The executor lowers a model inside ``filling(arena)``; ``packing``
takes the packed weights' arrays from the `current` arena, each 64-byte
aligned right after the one before (outside, an allocation of their own:
a GEMM packed alone, in tests or the tuner). Arrays are views of the
arena's chunks and keep them alive.
"""

from __future__ import annotations

import contextlib
import mmap
import threading

import numpy as np

__all__ = ["WeightArena", "filling", "current"]

_ALIGN = 64  # bytes: a cache line, and a whole AVX-512 vector
_HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
_CHUNK = 4 << 20  # the first chunk's size (pages never touched cost no memory)


class WeightArena:
    """Chunks of memory handed out front to back (`take`)."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self._used = 0  # bytes of the last chunk handed out
        self.nbytes = 0  # bytes handed out, alignment included

    def take(self, nbytes: int) -> np.ndarray:
        """`nbytes` uint8 bytes, 64-byte aligned, right after the last ones taken
        (in a new chunk where the last one has no room)."""
        start = _round_up(self._used, _ALIGN)
        if not self.chunks or start + nbytes > self.chunks[-1].size:
            # each chunk twice the last: few breaks in the order, little left unused
            last = self.chunks[-1].size if self.chunks else 0
            self.chunks.append(_huge_page_chunk(max(_CHUNK, 2 * last, nbytes)))
            start = 0
        self._used = start + nbytes
        self.nbytes += nbytes
        return self.chunks[-1][start : start + nbytes]

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialized C-contiguous array of `take`'s bytes."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self.take(nbytes).view(dtype).reshape(shape)

    def describe(self) -> str:
        size = f"{self.nbytes / 2**20:.1f} MiB" if self.nbytes >= 2**20 else f"{self.nbytes} bytes"
        return f"packed weights: {size} in {len(self.chunks)} arena chunk(s)"


def _huge_page_chunk(nbytes: int) -> np.ndarray:
    """At least `nbytes` zeroed bytes starting on a huge-page boundary, advised
    to be backed by huge pages where the OS takes the advice (Linux's
    transparent huge pages in "madvise" or "always" mode; elsewhere plain
    pages)."""
    size = _round_up(nbytes, _HUGE_PAGE)
    if hasattr(mmap, "MAP_PRIVATE"):  # (a shared mapping would be shmem: no huge pages)
        private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        region = mmap.mmap(-1, size + _HUGE_PAGE, flags=private)  # zeroed, page-aligned
    else:
        region = mmap.mmap(-1, size + _HUGE_PAGE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(region, np.uint8)  # keeps `region` mapped while a view lives
    start = -raw.ctypes.data % _HUGE_PAGE
    return raw[start : start + size]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


_current = threading.local()


@contextlib.contextmanager
def filling(arena: WeightArena):
    """Within the block, on this thread, `current` is `arena`."""
    saved = current()
    _current.arena = arena
    try:
        yield arena
    finally:
        _current.arena = saved


def current() -> WeightArena | None:
    """The arena being filled on this thread (`filling`), if any."""
    return getattr(_current, "arena", None)
