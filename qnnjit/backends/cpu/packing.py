"""Weights (the GEMM's B operand) packed once, at compile time, for the microkernels.

Layout ``"k4n"`` (the SIMD paths), for a panel width NR (a multiple of the
vector's i32 lanes):

    data[p, g, 4*n + q] = B[4*g + q, p*NR + n]      (int8; zero outside B)

``p`` is the panel (NR consecutive columns), ``g`` the group of four
consecutive k. One group of one panel is NR*4 contiguous bytes: NR/16 zmm (or
NR/8 ymm) vectors whose i32 lane ``n`` holds column n's four k, exactly the
operand ``vpdpbusd`` / ``vpmaddubsw`` multiply against a broadcast of four A
bytes. K is padded to a multiple of 4 and N to a multiple of NR with zeros, so
padding adds nothing. A panel's groups are contiguous, so a KC block of a panel
is a plain offset: the packing depends on NR only, not on KC, MC or NC.

Layout ``"kn"`` (the portable path) differs only inside a group:
``data[p, g, q*NR + n] = B[4*g + q, p*NR + n]``, each k a contiguous row of NR
bytes, which plain loops vectorize (3-4x faster there than ``"k4n"``). Group
and panel offsets are the same, so the drivers do not care.

Packing also precomputes what the kernels' epilogue-free init needs:

- ``col_sums[n] = sum_k B[k, n]`` (int64, exact);
- ``s8_init[n] = wrap32(-128 * col_sums[n])``: signed activations run as
  ``a + 128`` (u8), and ``sum_k (a+128)*b - 128*sum_k b = sum_k a*b``, exact
  modulo 2**32 like every i32 accumulation here;
- the distinct (positive part, negative part) sums of each vpmaddubsw pair
  ``(B[2i, n], B[2i+1, n])``, so ``i16_pairs_safe`` can prove or refute, for an
  activation range, that no pair sum saturates i16 (the AVX2 fast path).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import weight_arena

__all__ = ["PackedB", "pack_b", "aligned_empty", "wrap_int32"]

I16_MIN, I16_MAX = -(1 << 15), (1 << 15) - 1


def wrap_int32(x) -> np.ndarray:
    """Integers reduced modulo 2**32 into int32 (two's complement wraparound)."""
    return np.asarray(x, dtype=np.int64).astype(np.uint32).view(np.int32)


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an ``align``-byte
    boundary (vector loads then never straddle a cache line needlessly)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


@dataclass(frozen=True, eq=False)
class PackedB:
    """B[K, N] (int8) in the microkernel layout for panel width ``nr``."""

    data: np.ndarray  # int8 [panels, k_groups, nr*4], 64-byte aligned
    k: int
    n: int
    nr: int
    layout: str  # "k4n" (SIMD kernels) | "kn" (portable kernel)
    col_sums: np.ndarray  # int64 [n]
    s8_init: np.ndarray  # int32 [panels*nr]: wrap32(-128 * col_sums), zero padded
    zero_init: np.ndarray  # int32 [panels*nr] zeros

    @functools.cached_property
    def addresses(self) -> tuple[int, int, int]:
        """Addresses of ``data``, ``zero_init`` and ``s8_init`` (for the drivers)."""
        return (self.data.ctypes.data, self.zero_init.ctypes.data, self.s8_init.ctypes.data)

    @functools.cached_property
    def _pair_sums(self) -> np.ndarray:
        """int32 [u, 2]: the distinct (pos, neg) pair sums of B's columns
        (`_distinct_pair_sums`), from the packed data: only the AVX2 path
        asks (`i16_pairs_safe`), and for ResNet-18's weights they took 40 ms
        of a 0.27 s compile."""
        k4 = self.k_groups * 4
        if self.layout == "k4n":  # [p, g, n, q] -> [g, q, p, n]
            b = self.data.reshape(self.panels, self.k_groups, self.nr, 4).transpose(1, 3, 0, 2)
        else:  # "kn": [p, g, q, n] -> [g, q, p, n]
            b = self.data.reshape(self.panels, self.k_groups, 4, self.nr).transpose(1, 2, 0, 3)
        return _distinct_pair_sums(b.reshape(k4, self.n_padded)[:, : self.n])

    @property
    def k_groups(self) -> int:
        return self.data.shape[1]

    @property
    def panels(self) -> int:
        return self.data.shape[0]

    @property
    def n_padded(self) -> int:
        return self.panels * self.nr

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.s8_init.nbytes + self.zero_init.nbytes

    def pair_bounds(self, a_lo: int, a_hi: int) -> tuple[int, int]:
        """Min and max over every vpmaddubsw pair of ``a0*b0 + a1*b1`` with
        ``a0, a1`` in [a_lo, a_hi] (the u8 values the kernel multiplies)."""
        if not 0 <= a_lo <= a_hi <= 255:
            raise ValueError(f"u8 activation range must satisfy 0 <= lo <= hi <= 255: {a_lo, a_hi}")
        if self._pair_sums.size == 0:
            return 0, 0
        pos = self._pair_sums[:, 0].astype(np.int64)
        neg = self._pair_sums[:, 1].astype(np.int64)
        hi = int(np.max(a_hi * pos + a_lo * neg))
        lo = int(np.min(a_lo * pos + a_hi * neg))
        return lo, hi

    def i16_pairs_safe(self, a_lo: int = 0, a_hi: int = 255) -> bool:
        """True iff ``vpmaddubsw`` cannot saturate for u8 activations in
        [a_lo, a_hi]: every pair sum fits int16 (then the AVX2 fast path is exact).
        Always true for 7-bit weights ([-64, 63], ORT's reduce_range)."""
        lo, hi = self.pair_bounds(a_lo, a_hi)
        return I16_MIN <= lo and hi <= I16_MAX


def _distinct_pair_sums(b: np.ndarray) -> np.ndarray:
    """The distinct (sum of positive parts, sum of negative parts) of the pairs
    ``(b[2i, n], b[2i+1, n])`` (K even): int32 [u, 2]. Both sums are small
    (pos in [0, 254], neg in [-256, 0]), so an occupancy table dedups in O(K*N)."""
    pairs = b.reshape(b.shape[0] // 2, 2, b.shape[1]).astype(np.int16)
    pos = np.maximum(pairs, 0).sum(axis=1, dtype=np.int32).ravel()
    neg = np.minimum(pairs, 0).sum(axis=1, dtype=np.int32).ravel()
    seen = np.zeros(255 * 257, dtype=bool)
    seen[pos * 257 + (neg + 256)] = True
    keys = np.flatnonzero(seen)
    return np.stack([keys // 257, keys % 257 - 256], axis=1).astype(np.int32)


LAYOUTS = ("k4n", "kn")


def pack_b(b: np.ndarray, nr: int, layout: str = "k4n") -> PackedB:
    """Pack ``b`` (int8 [K, N]) for microkernels with panel width ``nr``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    b = np.asarray(b)
    if b.dtype != np.int8 or b.ndim != 2:
        raise TypeError(f"B must be a 2-D int8 array, got {b.dtype} {b.shape}")
    if nr < 1 or nr % 8:
        raise ValueError(f"panel width NR must be a positive multiple of 8, got {nr}")
    k, n = b.shape
    k_groups = -(-k // 4)
    panels = max(1, -(-n // nr))
    # B's columns as padded rows (B^T [N, K]): then each group of 4 K bytes
    # is one int32, and the panel layout is a transpose of int32s, not of
    # bytes (ResNet-18's weights: 8 -> 2 ms for a 512x512x3x3). A B that is
    # the transpose of a C-contiguous [N, K] array (a conv's weights) is read
    # in order.
    rows = np.zeros((panels * nr, k_groups * 4), dtype=np.int8)
    rows[:n, :k] = b.T
    arena = weight_arena.current()  # the model's, while it is lowered
    shape = (panels, k_groups, nr * 4)
    data = aligned_empty(shape, np.int8) if arena is None else arena.empty(shape, np.int8)
    if layout == "k4n":  # [p, n, g] int32s -> [p, g, n]
        quads = rows.view(np.int32).reshape(panels, nr, k_groups)
        data.view(np.int32).reshape(panels, k_groups, nr)[...] = quads.transpose(0, 2, 1)
    else:  # "kn": [p, n, g, q] -> [p, g, q, n]
        by_group = rows.reshape(panels, nr, k_groups, 4).transpose(0, 2, 3, 1)
        data.reshape(panels, k_groups, 4, nr)[...] = by_group
    col_sums = rows[:n].sum(axis=1, dtype=np.int64)
    s8_init = aligned_empty((panels * nr,), np.int32)
    s8_init[:] = 0
    s8_init[:n] = wrap_int32(-128 * col_sums)
    zero_init = aligned_empty((panels * nr,), np.int32)
    zero_init[:] = 0
    for arr in (data, s8_init, zero_init, col_sums):
        arr.flags.writeable = False
    return PackedB(data, k, n, nr, layout, col_sums, s8_init, zero_init)
