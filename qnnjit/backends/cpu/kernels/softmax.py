"""qsoftmax (ONNX Runtime's QLinearSoftmax), bit for bit the reference's
arithmetic (`ir/ops/qlinear_contrib.py`, `QSoftmax`). Per row of D codes:

    t_j = table[255 - (xmax - x_j)]          the exp table of (x_scale, D)
    s   = ((0 + t_0) + t_1) + ...            float32, in order
    y_j = saturate(cvtps2dq(f32(f32(t_j * Y) / s)) + y_zp),  Y = f32(floor(f32(1 / y_scale)))

Codes are read as bytes (`requant.unsigned_view`); `c = byte ^ flip` orders
signed and unsigned codes alike and `xmax - x_j = cmax - c_j`, so the table
index is `255 - cmax + c_j` for both types. The table depends on D, so it is
built once per row length (at the first run on a shape whose D is new) and
kept: a run passes the same table object each time, which is what lets a
recorded run replay the step (`replay.py`).

The tensor is seen as [outer, D, inner]: softmax runs over the middle axis
(`flatten`: D is every dim from `axis` on, inner = 1). A row is
contiguous when inner = 1 (`softmax_rows`, one task per row); otherwise the
rows of one `outer` index run side by side down the D axis, a block of
inner positions per task (`softmax_columns`), each row's sum still in the
order j = 0, 1, ..., so no operand is moved to make its rows contiguous.
"""

from __future__ import annotations

import math

import numpy as np

from ....ir.graph import Node
from ....ir.ops.qlinear_contrib import softmax_exp_table
from ._buffers import empty
from ._lowering import Decline, Kernel, LowerContext, const_input
from ._numba import U, jit
from ._threads import run_tasks
from .requant import byte_codes, unsigned_view

F32 = np.float32

# Inner positions per `softmax_columns` task: a few vectors of running sums.
_COLUMN_BLOCK = 64
# run_tasks work per element, so that MIN_PARALLEL_WORK is about 15 us: one
# thread takes about 1.1 ns per element (ViT's 197-element rows), most of it
# the sequential sum and the division.
_WORK_PER_ELEMENT = 16

# codes slots: (flip, y_zp, qmin, qmax)
C_FLIP, C_ZP, C_QMIN, C_QMAX = range(4)


@jit(inline=True)
def _quantize(t, big, s, lo, hi, zp):
    """saturate(cvtps2dq(f32(f32(t * big) / s)) + zp), without branches (so
    the loops vectorize): clamping the rounded value to [lo, hi] = [qmin - zp,
    qmax - zp] before adding zp saturates alike, and a value x86 converts to
    INT32_MIN (NaN, or outside [-2^31, 2^31)) ends at qmin."""
    r = np.rint((t * big) / s)
    v = r if r > lo else lo  # NaN -> lo
    v = v if v < hi else hi
    v = v if r < np.float32(2147483648.0) else lo
    return np.int32(v) + zp


@jit(inline=True)
def _row_base(row, fl):
    """255 - the row's largest code (flipped bytes compare as codes do)."""
    cmax = np.uint8(0)
    for j in range(row.shape[0]):
        c = row[U(j)] ^ fl
        cmax = c if c > cmax else cmax
    return 255 - np.int64(cmax)


@jit(inline=True)
def _store_row(dst, e, s, big, lo, hi, zp):
    for j in range(dst.shape[0]):
        dst[U(j)] = np.uint8(_quantize(e[U(j)], big, s, lo, hi, zp) & 0xFF)


@jit()
def softmax_rows(t0, t1, x2, table, big, codes, out2):
    """Rows t0..t1 of the contiguous [rows, D] bytes x2 into out2, four rows
    at a time: their four sums advance side by side, element j of each in
    turn, so the rows' float32 additions (each row's still in order) overlap
    instead of each waiting on the one before (ViT's [3, 197, 197]: 0.133 ->
    0.083 ms)."""
    fl, zp = np.uint8(codes[C_FLIP]), np.int32(codes[C_ZP])
    lo, hi = np.float32(codes[C_QMIN] - zp), np.float32(codes[C_QMAX] - zp)
    big = big[0]
    D = x2.shape[1]
    exps = np.empty((4, D), np.float32)  # the rows' t_j
    e0, e1, e2, e3 = exps[0], exps[1], exps[2], exps[3]
    r = t0
    while r + 4 <= t1:
        x0, x1, x2_, x3 = x2[U(r)], x2[U(r + 1)], x2[U(r + 2)], x2[U(r + 3)]
        b0, b1 = _row_base(x0, fl), _row_base(x1, fl)
        b2, b3 = _row_base(x2_, fl), _row_base(x3, fl)
        s0 = s1 = s2 = s3 = np.float32(0)
        for j in range(D):
            v0 = table[U(b0 + (x0[U(j)] ^ fl))]
            v1 = table[U(b1 + (x1[U(j)] ^ fl))]
            v2 = table[U(b2 + (x2_[U(j)] ^ fl))]
            v3 = table[U(b3 + (x3[U(j)] ^ fl))]
            e0[U(j)], e1[U(j)], e2[U(j)], e3[U(j)] = v0, v1, v2, v3
            s0 += v0
            s1 += v1
            s2 += v2
            s3 += v3
        _store_row(out2[U(r)], e0, s0, big, lo, hi, zp)
        _store_row(out2[U(r + 1)], e1, s1, big, lo, hi, zp)
        _store_row(out2[U(r + 2)], e2, s2, big, lo, hi, zp)
        _store_row(out2[U(r + 3)], e3, s3, big, lo, hi, zp)
        r += 4
    for last in range(r, t1):  # the last rows, one at a time
        row = x2[U(last)]
        b0 = _row_base(row, fl)
        s0 = np.float32(0)
        for j in range(D):
            v0 = table[U(b0 + (row[U(j)] ^ fl))]
            e0[U(j)] = v0
            s0 += v0
        _store_row(out2[U(last)], e0, s0, big, lo, hi, zp)


@jit()
def softmax_columns(t0, t1, x3, table, big, codes, out3):
    """Tasks t0..t1 of (outer index o, block of `_COLUMN_BLOCK` inner
    positions) of the [outer, D, inner] bytes x3: the rows x3[o, :, i] of
    the block side by side, into out3."""
    fl, zp = np.uint8(codes[C_FLIP]), np.int32(codes[C_ZP])
    lo, hi = np.float32(codes[C_QMIN] - zp), np.float32(codes[C_QMAX] - zp)
    big = big[0]
    D, inner = x3.shape[1], x3.shape[2]
    blocks = (inner + _COLUMN_BLOCK - 1) // _COLUMN_BLOCK
    base = np.empty(_COLUMN_BLOCK, np.int64)
    sums = np.empty(_COLUMN_BLOCK, np.float32)
    exps = np.empty((D, _COLUMN_BLOCK), np.float32)  # the block's t_j
    for t in range(t0, t1):
        o, b = t // blocks, t % blocks
        i0 = b * _COLUMN_BLOCK
        width = min(_COLUMN_BLOCK, inner - i0)
        first = x3[U(o), 0, i0 : i0 + width]
        for i in range(width):
            base[U(i)] = np.int64(first[U(i)] ^ fl)
        for j in range(1, D):
            row = x3[U(o), U(j), i0 : i0 + width]
            for i in range(width):
                c = np.int64(row[U(i)] ^ fl)
                base[U(i)] = c if c > base[U(i)] else base[U(i)]
        for i in range(width):
            base[U(i)] = 255 - base[U(i)]
            sums[U(i)] = np.float32(0)
        for j in range(D):
            row = x3[U(o), U(j), i0 : i0 + width]
            e = exps[U(j)]
            for i in range(width):
                t_ = table[U(base[U(i)] + (row[U(i)] ^ fl))]
                e[U(i)] = t_
                sums[U(i)] += t_
        for j in range(D):
            e = exps[U(j)]
            dst = out3[U(o), U(j), i0 : i0 + width]
            for i in range(width):
                dst[U(i)] = np.uint8(_quantize(e[U(i)], big, sums[U(i)], lo, hi, zp) & 0xFF)


def lower_qsoftmax(node: Node, ctx: LowerContext) -> Kernel:
    x = node.inputs[0]
    dt = x.type.dtype
    if not dt.is_int or dt.bits != 8:
        raise Decline(f"input of type {dt}")
    if node.input(1) is None or node.input(2) is None:
        raise Decline("missing scale operands")
    x_scale = const_input(node, 1, "x scale")
    y_scale = const_input(node, 2, "y scale")
    y_zp = const_input(node, 3, "y zero point")
    x_scale = F32(np.asarray(x_scale, np.float32).reshape(-1)[0])
    y_scale = F32(np.asarray(y_scale, np.float32).reshape(-1)[0])
    zp = 0 if y_zp is None else int(np.asarray(y_zp).reshape(-1)[0])
    if abs(zp) > 1 << 20:  # [qmin - zp, qmax - zp] must be exact in float32
        raise Decline(f"y zero point {zp}")
    with np.errstate(all="ignore"):  # as the reference: y_scale 0 gives Y = inf
        big = np.array([np.floor(F32(1) / y_scale)], np.float32)
    flip, _ = byte_codes(dt)
    codes = np.array([flip, zp, dt.qmin, dt.qmax], np.int64)
    axis = int(node.attrs["axis"])
    flatten = bool(node.attrs.get("flatten", False))
    tables: dict[int, np.ndarray] = {}  # row length D -> exp table (module doc)

    def table_for(length: int) -> np.ndarray:
        table = tables.get(length)
        if table is None:
            table = tables[length] = softmax_exp_table(x_scale, max(length, 1))
        return table

    shape = x.type.shape
    try:  # the static shape's table now, at compile time; else a check of x_scale
        if shape is not None and all(isinstance(d, int) for d in shape):
            table_for(_dims(tuple(shape), axis, flatten)[1])
        else:
            softmax_exp_table(x_scale, 1)
    except (ArithmeticError, ValueError) as exc:  # x_scale 0 (the table divides by it)
        raise Decline(f"no exp table for x scale {x_scale}: {exc}") from exc

    def run(x_array):
        outer, length, inner = _dims(x_array.shape, axis, flatten)
        out = empty(x_array.shape, dt.numpy)
        if out.size == 0:
            return [out]
        table = table_for(length)
        work = _WORK_PER_ELEMENT * x_array.size
        if inner == 1:
            x2 = unsigned_view(x_array).reshape(outer, length)
            out2 = unsigned_view(out).reshape(outer, length)
            run_tasks(softmax_rows, outer, work, ctx.num_threads, x2, table, big, codes, out2)
        else:
            x3 = unsigned_view(x_array).reshape(outer, length, inner)
            out3 = unsigned_view(out).reshape(outer, length, inner)
            tasks = outer * -(-inner // _COLUMN_BLOCK)
            run_tasks(softmax_columns, tasks, work, ctx.num_threads, x3, table, big, codes, out3)
        return [out]

    where = "flatten" if flatten else "axis"
    return Kernel(f"softmax[{dt} {where}={axis}]", run, [x], node.outputs, [node])


def _dims(shape: tuple, axis: int, flatten: bool) -> tuple[int, int, int]:
    """(outer, D, inner): the softmax runs over D, the rows are (outer, inner)."""
    if not shape:
        return 1, 1, 1
    outer = math.prod(shape[:axis])
    if flatten:
        return outer, math.prod(shape[axis:]), 1
    return outer, shape[axis], math.prod(shape[axis + 1 :])
