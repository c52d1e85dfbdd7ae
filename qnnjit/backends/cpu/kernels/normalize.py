"""layer_norm: one task per row of the normalized axes, each row's mean,
1/std and normalized values computed in one kernel call, in exactly the
order of the reference (`ir/ops/nn.py`, `LayerNorm`):

- "ort_mlas" (float32 x and stash, rows of at least 8 elements), as
  `mlas_layer_norm`: the mean from a float64 sum in 4 lanes, reduced as
  (l0 + l2) + (l1 + l3), the n % 4 tail added after; the variance from 8
  float32 lanes of fma(d, d, lane), reduced as
  ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)), of the n % 8 tail a group of 4
  added as rounded products, the rest with fma; inv_std = 1 / sqrtf(var / n
  + eps); y = fma(f32(d * inv_std), scale, bias) (f32(d * inv_std) * scale
  without a bias);
- "two_pass" (and "ort_mlas" on shorter rows), as NumPy computes it in the
  stash type T (float32 or float64): each sum is NumPy's pairwise sum
  (`_pairwise`) started from 0, divided by n in float64 and rounded to T:
  mean = T(sum(x) / n), c = x - mean, var = T(sum(T(c * c)) / n),
  inv_std = 1 / sqrt(var + T(eps)), y = X((c * inv_std) * scale [+ bias]).

Scale and bias are broadcast to the normalized shape and cast to T once per
shape (constants) or viewed in place (run-time operands of that shape), so
a step's only work is its `run_tasks` call and it is replayed.

Declined: float types other than float32 and float64, stash types other than
those, and a scale or bias of more dimensions than the normalized axes (the
reference broadcasts those against x, not against one row).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ....ir import dtypes
from ....ir.graph import Node
from ._buffers import empty
from ._lowering import Decline, Kernel, LowerContext
from ._numba import U, fma_f32, jit
from ._threads import run_tasks
from .quantize import code_params, quantized_code
from .requant import unsigned_view

# Work per element in `run_tasks` units (2^18 of them ~ 15 us): one thread
# takes 0.8 ns per element ("ort_mlas") to 1.1 ns ("two_pass"), its sums in
# scalar lanes (a ViT's 197 x 192 rows: 30 and 40 us), so rows of 192 split
# over threads from about 80 of them.
_WORK_PER_ELEMENT = 16

# NumPy's pairwise summation (`@TYPE@_pairwise_sum`, umath/loops_utils.h.src):
# blocks of at most this many elements are summed in 8 lanes.
_PW_BLOCKSIZE = 128


@jit(inline=True)
def _pairwise_block(a, lo, n, zero):
    """NumPy's sum of a block a[lo:lo + n], n <= 128: fewer than 8 elements
    one after another from `zero`, else 8 lanes (element i into lane i % 8,
    the first 8 starting them) reduced as ((r0+r1) + (r2+r3)) + ((r4+r5) +
    (r6+r7)), the n % 8 tail added after."""
    if n < 8:
        res = zero
        for i in range(lo, lo + n):
            res += a[U(i)]
        return res
    r0, r1, r2, r3 = a[U(lo)], a[U(lo + 1)], a[U(lo + 2)], a[U(lo + 3)]
    r4, r5, r6, r7 = a[U(lo + 4)], a[U(lo + 5)], a[U(lo + 6)], a[U(lo + 7)]
    end = lo + n - n % 8
    for i in range(lo + 8, end, 8):
        r0 += a[U(i)]
        r1 += a[U(i + 1)]
        r2 += a[U(i + 2)]
        r3 += a[U(i + 3)]
        r4 += a[U(i + 4)]
        r5 += a[U(i + 5)]
        r6 += a[U(i + 6)]
        r7 += a[U(i + 7)]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(end, lo + n):
        res += a[U(i)]
    return res


@jit()
def _pairwise(a, n, zero, frames, partial):
    """NumPy's pairwise sum of a[:n] in a's type: blocks of at most 128
    (`_pairwise_block`); a longer range is split at n / 2 rounded down to a
    multiple of 8 and its halves' sums added. The recursion runs on explicit
    stacks (Numba's cache cannot hold a recursive function): `frames` [64, 3]
    (start, length, halves done) and `partial` [64], the pending sums."""
    if n <= _PW_BLOCKSIZE:
        return _pairwise_block(a, 0, n, zero)
    frames[0, 0], frames[0, 1], frames[0, 2] = 0, n, 0
    top, pending = 0, 0
    while top >= 0:
        lo, m, done = frames[top, 0], frames[top, 1], frames[top, 2]
        if m <= _PW_BLOCKSIZE:
            partial[pending] = _pairwise_block(a, lo, m, zero)
            pending += 1
            top -= 1
            continue
        half = m // 2
        half -= half % 8
        if done == 2:  # both halves summed: combine them
            partial[pending - 2] = partial[pending - 2] + partial[pending - 1]
            pending -= 1
            top -= 1
            continue
        frames[top, 2] = done + 1
        top += 1
        if done == 0:
            frames[top, 0], frames[top, 1], frames[top, 2] = lo, half, 0
        else:
            frames[top, 0], frames[top, 1], frames[top, 2] = lo + half, m - half, 0
    return partial[0]


@jit()
def layer_norm_two_pass(t0, t1, x2, scale, bias, has_bias, eps, one, zero, y2, mean, inv_std):
    """Rows t0..t1 of x2 [R, n] (type X) in the stash type T of `mean`,
    `inv_std`, `scale`, `bias`, `eps`, `one` and `zero` (module doc)."""
    n = x2.shape[1]
    c = np.empty(n, mean.dtype)  # the row in T, then centered
    sq = np.empty(n, mean.dtype)
    frames, partial = np.empty((64, 3), np.int64), np.empty(64, mean.dtype)
    count = np.float64(n)
    for r in range(t0, t1):
        row, y = x2[r], y2[r]
        for i in range(n):
            c[U(i)] = row[U(i)]
        mean[r] = np.float64(zero + _pairwise(c, n, zero, frames, partial)) / count
        m = mean[r]
        for i in range(n):
            d = c[U(i)] - m
            c[U(i)] = d
            sq[U(i)] = d * d
        inv_std[r] = np.float64(zero + _pairwise(sq, n, zero, frames, partial)) / count
        inv_std[r] = one / np.sqrt(inv_std[r] + eps)  # from the variance, rounded to T
        inv = inv_std[r]
        if has_bias:
            for i in range(n):
                y[U(i)] = c[U(i)] * inv * scale[U(i)] + bias[U(i)]
        else:
            for i in range(n):
                y[U(i)] = c[U(i)] * inv * scale[U(i)]


@jit(inline=True)
def _mlas_row(row, scale, bias, has_bias, eps, y):
    """One row of `layer_norm_mlas` (module doc) into y; returns (mean, inv_std)."""
    n = row.shape[0]
    n4, n8 = n - n % 4, n - n % 8
    grouped = n8 + 4 * ((n - n8) // 4)  # the tail's first group of 4
    count = np.float32(n)
    s0, s1 = np.float64(row[0]), np.float64(row[1])
    s2, s3 = np.float64(row[2]), np.float64(row[3])
    for i in range(4, n4, 4):
        s0 += np.float64(row[U(i)])
        s1 += np.float64(row[U(i + 1)])
        s2 += np.float64(row[U(i + 2)])
        s3 += np.float64(row[U(i + 3)])
    total = (s0 + s2) + (s1 + s3)
    for i in range(n4, n):
        total += np.float64(row[U(i)])
    m = np.float32(total / np.float64(n))
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0)
    for i in range(0, n8, 8):
        d0, d1 = row[U(i)] - m, row[U(i + 1)] - m
        d2, d3 = row[U(i + 2)] - m, row[U(i + 3)] - m
        d4, d5 = row[U(i + 4)] - m, row[U(i + 5)] - m
        d6, d7 = row[U(i + 6)] - m, row[U(i + 7)] - m
        a0 = fma_f32(d0, d0, a0)
        a1 = fma_f32(d1, d1, a1)
        a2 = fma_f32(d2, d2, a2)
        a3 = fma_f32(d3, d3, a3)
        a4 = fma_f32(d4, d4, a4)
        a5 = fma_f32(d5, d5, a5)
        a6 = fma_f32(d6, d6, a6)
        a7 = fma_f32(d7, d7, a7)
    var = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
    for i in range(n8, n):
        d = row[U(i)] - m
        if i < grouped:
            var = var + d * d
        else:
            var = fma_f32(d, d, var)
    inv = np.float32(1) / np.sqrt(var / count + eps)
    if has_bias:
        for i in range(n):
            y[U(i)] = fma_f32((row[U(i)] - m) * inv, scale[U(i)], bias[U(i)])
    else:
        for i in range(n):
            y[U(i)] = ((row[U(i)] - m) * inv) * scale[U(i)]
    return m, inv


@jit()
def layer_norm_mlas(t0, t1, x2, scale, bias, has_bias, eps, y2, mean, inv_std):
    """Rows t0..t1 of the float32 x2 [R, n], n >= 8, as ONNX Runtime's MLAS
    kernel (module doc)."""
    for r in range(t0, t1):
        mean[r], inv_std[r] = _mlas_row(x2[r], scale, bias, has_bias, eps, y2[r])


@jit()
def layer_norm_mlas_codes(t0, t1, c2, dq, dscale, scale, bias, has_bias, eps, qscale, qzp, lims,
                          out2):  # fmt: skip
    """dequantize -> layer_norm ("ort_mlas") -> quantize, all per tensor, on
    rows t0..t1 of the 8-bit codes c2 [R, n] (stored bytes) into out2 (stored
    bytes), n >= 8: each float row lives in a row buffer only. dq = (flip,
    off, zero point): the code is `(byte ^ flip) - off`, its value
    f32(f32(code - zp) * dscale) (`quantize.dequantize_flat`); the result's
    code `quantize.quantized_code`."""
    n = c2.shape[1]
    flip, off, dzp = dq[0], dq[1], dq[2]
    xr, yr = np.empty(n, np.float32), np.empty(n, np.float32)
    params = code_params(lims, qzp)
    for r in range(t0, t1):
        row, dst = c2[r], out2[r]
        for i in range(n):
            xr[U(i)] = np.float32(((np.int64(row[U(i)]) ^ flip) - off) - dzp) * dscale
        _mlas_row(xr, scale, bias, has_bias, eps, yr)
        for i in range(n):
            dst[U(i)] = quantized_code(yr[U(i)], qscale, params)


def layer_norm_on_codes(stage, dequant, quant, codes: np.ndarray) -> np.ndarray | None:
    """dequantize (`quantize.DequantizeStage`) -> this layer norm (`stage`) ->
    quantize (`quantize.QuantizeStage`) of the 8-bit `codes`, by
    `layer_norm_mlas_codes`; None when the rows are shorter than 8 (the
    reference normalizes those in two passes)."""
    shape, axis = codes.shape, stage.axis
    size = math.prod(shape[axis:])
    if size < 8:
        return None
    rows = math.prod(shape[:axis])
    scale, bias = stage.rows(shape[axis:])
    out = empty(shape, quant.dtype.numpy)
    run_tasks(
        layer_norm_mlas_codes, rows, _WORK_PER_ELEMENT * rows * size, stage.threads,
        unsigned_view(codes).reshape(rows, size), dequant.codes, dequant.scale, scale,
        scale if bias is None else bias, stage.has_bias, stage.eps, quant.scale,
        quant.zero_point, quant.lims, unsigned_view(out).reshape(rows, size),
    )  # fmt: skip
    return out


@dataclass
class LayerNormStage:
    """What `step_fusion` needs to run an "ort_mlas" layer norm with constant
    scale and bias on codes (`layer_norm_mlas_codes`): its axis, epsilon,
    and `rows(normalized shape)`, the scale and bias rows."""

    axis: int
    eps: np.float32
    has_bias: bool
    rows: Callable[[tuple], tuple]
    threads: int


def lower_layer_norm(node: Node, ctx: LowerContext) -> Kernel:
    x = node.inputs[0]
    dt = x.type.dtype
    if dt not in (dtypes.float32, dtypes.float64):
        raise Decline(f"{dt} input (float32 and float64 only)")
    stash = dtypes.by_name(node.attrs.get("stash_dtype", "float32"))
    if stash not in (dtypes.float32, dtypes.float64):
        raise Decline(f"stash type {stash} (float32 and float64 only)")
    rank, axis = x.type.rank, node.attrs["axis"]
    if rank is None:
        raise Decline("input of unknown rank")
    params = [node.input(i) for i in (1, 2)]
    for value in params:
        if value is not None and (value.type.rank is None or value.type.rank > rank - axis):
            raise Decline(f"{value.name} has more dimensions than the normalized axes")
    mlas = node.attrs.get("algorithm", "two_pass") == "ort_mlas"
    mlas = mlas and dt == dtypes.float32 and stash == dtypes.float32
    t = stash.numpy.type
    eps = t(node.attrs["epsilon"])
    has_bias = params[1] is not None
    runtime = [v for v in (x, *params) if v is not None and not v.is_constant]
    prepared: dict[tuple, tuple] = {}  # normalized shape -> (scale, bias) of constants

    def row_params(norm, arrays):
        """scale and bias as contiguous rows of T: constants once per shape,
        run-time operands of the row's shape as views."""
        key = tuple(norm)
        if key in prepared:
            return prepared[key]
        rows = []
        for value, array in zip(params, arrays, strict=True):
            if value is None:
                rows.append(None)
                continue
            full = np.broadcast_to(array, norm)
            rows.append(np.ascontiguousarray(full, t).reshape(-1))
        if all(v is None or v.is_constant for v in params):
            prepared[key] = tuple(rows)
        return tuple(rows)

    def run(x_array, *operands):
        feed = iter(operands)
        arrays = [None if v is None else v.const if v.is_constant else next(feed) for v in params]
        shape = x_array.shape
        norm = shape[axis:]
        size = math.prod(norm)
        rows = math.prod(shape[:axis])
        scale, bias = row_params(norm, arrays)
        if bias is None:
            bias = scale  # not read
        y = empty(shape, dt.numpy)
        stats = (*shape[:axis], *(1,) * (len(shape) - axis))
        mean, inv_std = empty(stats, t), empty(stats, t)
        x2, y2 = x_array.reshape(rows, size), y.reshape(rows, size)
        m1, s1 = mean.reshape(rows), inv_std.reshape(rows)
        work = _WORK_PER_ELEMENT * rows * size
        if mlas and size >= 8:
            run_tasks(layer_norm_mlas, rows, work, ctx.num_threads, x2, scale, bias, has_bias,
                      eps, y2, m1, s1)  # fmt: skip
        else:
            run_tasks(layer_norm_two_pass, rows, work, ctx.num_threads, x2, scale, bias,
                      has_bias, eps, t(1), t(0), y2, m1, s1)  # fmt: skip
        return [y, mean, inv_std]

    algorithm = "ort_mlas" if mlas else "two_pass"
    name = f"layer_norm[{algorithm} {dt} stash={stash}]"
    stage = None
    if mlas and runtime == [x]:  # constant scale and bias: runnable on codes
        consts = [None if v is None else v.const for v in params]
        stage = LayerNormStage(
            axis, eps, has_bias, lambda norm: row_params(norm, consts), ctx.num_threads
        )
    return Kernel(name, run, runtime, node.outputs, [node], stage=stage)
