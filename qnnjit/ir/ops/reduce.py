"""Reductions over a set of axes: mean, sum, max, min.

`axes` is a sorted tuple of positive axes, never empty (the frontend turns
ONNX's "no axes" into all axes, or into an identity under
noop_with_empty_axes). `keepdims` keeps reduced axes as size 1.

Values reduce in the input's type (mean: sum in the input's type divided by
the count; integers divide with truncation as C does). Sums of float32 follow
NumPy's order, or with `algorithm="ort"` (reduce_sum / reduce_mean; what the
ONNX frontend sets) ONNX Runtime's (`ort_float_sum`), so that float islands
of quantized models round as in ORT. Reducing an empty set
gives the identity of the reduction: 0 for sum, NaN for mean, the lowest
(highest) value of the type for max (min), as ONNX specifies.
"""

from __future__ import annotations

import numpy as np

from ..types import TensorType
from . import op


def _reduce_infer(ctx):
    t = ctx.type(0)
    if t.shape is None:
        raise ctx.error("reduction needs an input of known rank")
    axes = ctx.attrs["axes"]
    if any(not 0 <= a < len(t.shape) for a in axes):
        raise ctx.error(f"axes {axes} out of range for rank {len(t.shape)}")
    if ctx.attrs["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
    else:
        shape = tuple(d for i, d in enumerate(t.shape) if i not in axes)
    return [TensorType(t.dtype, shape)]


def _extreme(dtype: np.dtype, low: bool):
    """The lowest (or highest) value of a dtype: the identity of max (min)."""
    if dtype == np.bool_:
        return not low
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return info.min if low else info.max
    return -np.inf if low else np.inf


def _reducer(name: str, summary: str, function):
    def evaluate(inputs, attrs):
        x = inputs[0]
        axes, keepdims = tuple(attrs["axes"]), bool(attrs["keepdims"])
        if attrs.get("algorithm", "numpy") == "ort" and x.dtype == np.float32 and x.size:
            total = ort_float_sum(x, axes)
            if name == "reduce_mean":
                count = int(np.prod([x.shape[a] for a in axes]))
                total = (total / np.float32(count)).astype(np.float32)
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
            total = total.reshape(shape)
            return [total if keepdims else total.reshape(_kept(x.shape, axes))]
        result = function(x, axes, keepdims)
        return [np.asarray(result).astype(x.dtype, copy=False)]

    op(name, summary)(type(name, (), {"infer": _reduce_infer, "evaluate": evaluate}))


def _kept(shape, axes):
    return tuple(d for i, d in enumerate(shape) if i not in axes)


# ---- ONNX Runtime's float32 summation orders ---------------------------------

_F32 = np.float32


def _eigen_row_sums(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Eigen's vectorized `sum()` (SSE, packets of 4 floats) of each row, the
    row starting `offsets[r]` elements after a 16-byte-aligned address: the
    unaligned head and the tail are added one by one after the packets, which
    run in two interleaved accumulators, then reduce as (p0+p2)+(p1+p3)."""
    count, n = rows.shape
    out = np.empty(count, dtype=_F32)
    for start in range(4):
        sel = np.nonzero((-offsets) % 4 == start)[0]
        if not len(sel):
            continue
        x = rows[sel]
        head = min(start, n)
        size = (n - head) // 4 * 4
        size2 = (n - head) // 8 * 8
        end, end2 = head + size, head + size2
        if not size:
            res = x[:, 0].copy()
            for i in range(1, n):
                res = (res + x[:, i]).astype(_F32)
            out[sel] = res
            continue
        p0 = x[:, head : head + 4].copy()
        if size > 4:
            p1 = x[:, head + 4 : head + 8].copy()
            for i in range(head + 8, end2, 8):
                p0 = (p0 + x[:, i : i + 4]).astype(_F32)
                p1 = (p1 + x[:, i + 4 : i + 8]).astype(_F32)
            p0 = (p0 + p1).astype(_F32)
            if end > end2:
                p0 = (p0 + x[:, end2 : end2 + 4]).astype(_F32)
        pair = (p0[:, :2] + p0[:, 2:]).astype(_F32)
        res = (pair[:, 0] + pair[:, 1]).astype(_F32)
        for i in [*range(head), *range(end, n)]:
            res = (res + x[:, i]).astype(_F32)
        out[sel] = res
    return out


def _mlas_m1_sum(blocks: np.ndarray) -> np.ndarray:
    """Sum over axis 1 of [B, R, N] in MLAS's M=1 SGEMM order (a row of ones
    times the [R, N] block, `MlasSgemmKernelM1Avx`): rows in groups of four,
    ((r0 + r1) + r2) + r3, each group then added to the running result; a
    remaining pair as (r0 + r1), a last row alone."""
    rows = blocks.shape[1]
    total = None
    k = 0
    while rows - k >= 2:
        step = 4 if rows - k >= 4 else 2
        part = blocks[:, k]
        for j in range(1, step):
            part = (part + blocks[:, k + j]).astype(_F32)
        total = part if total is None else (part + total).astype(_F32)
        k += step
    if k < rows:
        total = blocks[:, k].copy() if total is None else (blocks[:, k] + total).astype(_F32)
    return total


def ort_float_sum(x: np.ndarray, axes) -> np.ndarray:
    """The float32 sum over `axes` in ONNX Runtime 1.31's order (its fast
    reductions): runs of kept (K) / reduced (R) dims merged (a leading kept
    run of size 1 dropped), then

    - R, KR: each contiguous row by Eigen's vectorized sum;
    - RK: row after row, element-wise;
    - KRK: per outer index, MLAS's M=1 SGEMM with a row of ones;
    - RKR: 0 + the Eigen sum of each inner row, outer index after index;
    - anything else (ORT's generic loop): from 0, element after element of
      the reduced dims in row-major order.

    Returns the sums in x's kept-dims order, flat. Matched against ORT 1.31.1
    on 60 shape/axes cases (tests/test_float_ops.py)."""
    runs: list[list] = []  # [reduced?, size]
    for i, d in enumerate(x.shape):
        reduced = i in axes
        if runs and runs[-1][0] == reduced:
            runs[-1][1] *= d
        else:
            runs.append([reduced, d])
    if len(runs) > 1 and not runs[0][0] and runs[0][1] == 1:
        runs.pop(0)  # a leading kept run of size 1 does not count
    kinds = "".join("R" if r else "K" for r, _ in runs)
    sizes = [d for _, d in runs]
    flat = np.ascontiguousarray(x, dtype=_F32).reshape(-1)
    if kinds in ("", "K"):
        return flat.copy()
    if kinds in ("R", "KR"):
        k, n = (1, sizes[0]) if kinds == "R" else sizes
        return _eigen_row_sums(flat.reshape(k, n), np.arange(k) * n)
    if kinds == "RK":
        rows = flat.reshape(sizes)
        total = rows[0].copy()
        for r in range(1, sizes[0]):
            total = (total + rows[r]).astype(_F32)
        return total
    if kinds == "KRK":
        return _mlas_m1_sum(flat.reshape(sizes)).reshape(-1)
    if kinds == "RKR":
        r1, k, r2 = sizes
        blocks = flat.reshape(r1, k, r2)
        total = np.zeros(k, dtype=_F32)
        offsets = np.arange(k) * r2
        for i in range(r1):
            total = (total + _eigen_row_sums(blocks[i], offsets + i * k * r2)).astype(_F32)
        return total
    # Any other pattern: ORT's generic loop, each output summed from 0 over its
    # reduced elements in row-major order.
    kept = [i for i in range(x.ndim) if i not in axes]
    count = int(np.prod([x.shape[a] for a in axes]))
    moved = np.transpose(x, kept + sorted(axes)).reshape(-1, count)
    total = np.zeros(moved.shape[0], dtype=_F32)
    for j in range(moved.shape[1]):
        total = (total + moved[:, j]).astype(_F32)
    return total


def _mean(x, axes, keepdims):
    count = int(np.prod([x.shape[a] for a in axes]))
    total = np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)
    if np.issubdtype(x.dtype, np.integer):
        return np.trunc(total / count) if count else np.zeros_like(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / x.dtype.type(count)


def _max(x, axes, keepdims):
    return np.max(x, axis=axes, keepdims=keepdims, initial=_extreme(x.dtype, low=True))


def _min(x, axes, keepdims):
    return np.min(x, axis=axes, keepdims=keepdims, initial=_extreme(x.dtype, low=False))


def _sum(x, axes, keepdims):
    return np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)


_reducer("reduce_mean", "mean over axes", _mean)
_reducer("reduce_sum", "sum over axes", _sum)
_reducer("reduce_max", "maximum over axes (lowest value of the type if empty)", _max)
_reducer("reduce_min", "minimum over axes (highest value of the type if empty)", _min)
