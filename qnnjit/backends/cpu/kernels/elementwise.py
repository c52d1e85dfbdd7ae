"""Elementwise quantized ops: qadd / qmul (ONNX Runtime's float32 arithmetic,
`ir/ops/qlinear_contrib.py`) and lookup (a table over the index type; 8-bit
codes to 8-bit codes through a byte table, `_bytetable`).

Operands are broadcast to the result's shape first (a NumPy view, copied to
a contiguous array only when it really broadcasts), then one flat loop runs.
qadd keeps ORT's operand order: for the "scalar0" broadcast mode MLAS
receives input 1 as its A, which rounds differently through the two fused
multiply-adds, so the order is chosen per run from the actual shapes.
"""

from __future__ import annotations

import numpy as np

from .... import numerics
from ....ir import dtypes
from ....ir.graph import Node
from ....ir.ops.qlinear_contrib import ort_broadcast_mode
from ..features import select_isa
from ._buffers import empty
from ._bytetable import byte_table, lookup_bytes, vbmi_lookups
from ._lowering import Decline, Kernel, LowerContext, clip_bounds, const_input
from ._numba import U, fma_f32, jit
from ._threads import run_tasks
from .requant import byte_codes, kernel_array, unsigned_view

F32 = np.float32


@jit(inline=True)
def _code(byte, flip, off):
    """The code of a stored byte, in int32 lanes (so the loops vectorize)."""
    return (np.int32(byte) ^ flip) - off


@jit(inline=True)
def _saturated(v, lo, hi):
    """`requant.cvt_saturate` as float selects, so the loops vectorize: x86
    cvtps2dq of v (NaN and |v| >= 2^31 give INT32_MIN), saturated to [lo, hi]
    (qmin, qmax as float32)."""
    r = np.rint(v)
    y = r if r > lo else lo  # NaN, and below: qmin
    y = y if y < hi else hi
    y = y if r < np.float32(2147483648.0) else lo
    return np.int32(y)


@jit()
def qadd_flat(i0, i1, a, b, codes, sc, a_first, out):
    """codes = (flip, off, qmin, qmax); sc = (rA, rB, fixed for (A, B) as MLAS's
    (A, B), fixed for (B, A))."""
    flip, off = np.int32(codes[0]), np.int32(codes[1])
    lo, hi = np.float32(codes[2]), np.float32(codes[3])
    ra, rb = sc[0], sc[1]
    if a_first:  # two loops, not a test per element: each vectorizes
        fixed = sc[2]
        for k in range(i0, i1):
            i = U(k)
            af, bf = np.float32(_code(a[i], flip, off)), np.float32(_code(b[i], flip, off))
            out[i] = _saturated(fma_f32(af, ra, fma_f32(bf, rb, fixed)), lo, hi)
    else:
        fixed = sc[3]
        for k in range(i0, i1):
            i = U(k)
            af, bf = np.float32(_code(a[i], flip, off)), np.float32(_code(b[i], flip, off))
            out[i] = _saturated(fma_f32(bf, rb, fma_f32(af, ra, fixed)), lo, hi)


@jit()
def qmul_flat(i0, i1, a, b, codes, r, zc, out):
    """codes = (flip, off, qmin, qmax, za, zb); (a - za)(b - zb) is exact in
    int32 (8-bit codes)."""
    flip, off = np.int32(codes[0]), np.int32(codes[1])
    lo, hi = np.float32(codes[2]), np.float32(codes[3])
    za, zb = np.int32(codes[4]), np.int32(codes[5])
    for k in range(i0, i1):
        i = U(k)
        p = (_code(a[i], flip, off) - za) * (_code(b[i], flip, off) - zb)
        out[i] = _saturated(np.float32(np.float32(p) * r) + zc, lo, hi)


@jit()
def lookup_flat(i0, i1, x, flip, table, out):
    """out[i] = table[x[i] ^ flip] (x unsigned view: the index is x - qmin)."""
    for k in range(i0, i1):
        i = U(k)
        out[i] = table[U(np.int64(x[i]) ^ flip)]


@jit()
def lookup_flat_bytes(i0, i1, x, table, vbmi, out):
    """out[i] = table[x[i]]: 8-bit codes to 8-bit codes through a byte table
    (`_bytetable`)."""
    lookup_bytes(x.ctypes.data + i0, out.ctypes.data + i0, i1 - i0, table, vbmi)


# ---- lowering ------------------------------------------------------------------------


def _operand(node: Node, index: int):
    """(Value, constant array or None) of operand `index`."""
    value = node.inputs[index]
    return value, (value.const if value.is_constant else None)


def _flat(array: np.ndarray, shape) -> np.ndarray:
    if array.shape != tuple(shape):
        array = np.broadcast_to(array, shape)
    return unsigned_view(array).reshape(-1)


def _flat_operands(*constants):
    """`_flat` for a kernel whose operands may be the constants given: a
    constant that broadcasts is copied once per result shape, not per call,
    so the kernel's calls pass the same arrays and its step is replayed
    (`replay.py`; a bias qadd after a matmul, for one)."""
    held = {id(c) for c in constants if c is not None}  # alive in the kernel's closure
    cache: dict[tuple, np.ndarray] = {}

    def flat(array: np.ndarray, shape) -> np.ndarray:
        if id(array) not in held:
            return _flat(array, shape)
        key = (id(array), tuple(shape))
        found = cache.get(key)
        if found is None:
            found = cache[key] = _flat(array, shape)
        return found

    return flat


def _scalar_f32(v) -> np.float32:
    return F32(np.asarray(v, dtype=np.float32).reshape(-1)[0])


def _scalar_int(v) -> int:
    return 0 if v is None else int(np.asarray(v).reshape(-1)[0])


def _binary(node: Node, ctx: LowerContext, make_run, name: str) -> Kernel:
    if len(node.inputs) < 8 or any(node.inputs[i] is None for i in (1, 4, 6)):
        raise Decline("missing scale operands")
    params = [const_input(node, i, "scale/zero point") for i in (1, 2, 4, 5, 6, 7)]
    a, a_const = _operand(node, 0)
    b, b_const = _operand(node, 3)
    dtype = node.outputs[0].type.dtype
    if dtype.bits != 8:
        raise Decline(f"{dtype} operands")
    flip, off = byte_codes(dtype)
    inputs = [v for v, c in ((a, a_const), (b, b_const)) if c is None]
    kernel_run = make_run(params, flip, off, dtype, _flat_operands(a_const, b_const))

    def run(*arrays):
        arrays = list(arrays)
        x = a_const if a_const is not None else arrays.pop(0)
        y = b_const if b_const is not None else arrays.pop(0)
        return kernel_run(x, y)

    return Kernel(f"{name}[{dtype}]", run, inputs, node.outputs, [node])


def lower_qadd(node: Node, ctx: LowerContext) -> Kernel:
    def make_run(params, flip, off, dtype, operand):
        sa, za, sb, zb, sc, zc = params
        sa, sb, sc = _scalar_f32(sa), _scalar_f32(sb), _scalar_f32(sc)
        za, zb, zc = _scalar_int(za), _scalar_int(zb), _scalar_int(zc)
        with np.errstate(all="ignore"):
            ra, rb = F32(sa / sc), F32(sb / sc)
            fixed_ab = F32(F32(zc) - numerics.fma_f32(ra, F32(za), F32(rb * F32(zb))))
            fixed_ba = F32(F32(zc) - numerics.fma_f32(rb, F32(zb), F32(ra * F32(za))))
        sc_arr = np.array([ra, rb, fixed_ab, fixed_ba], np.float32)
        codes = np.array([flip, off, dtype.qmin, dtype.qmax], np.int64)

        def run(x, y):
            shape = np.broadcast_shapes(x.shape, y.shape)
            out = empty(shape, dtype.numpy)
            a_first = ort_broadcast_mode(x.shape, y.shape) != "scalar0"
            flat = unsigned_view(out).reshape(-1)
            a, b = operand(x, shape), operand(y, shape)
            run_tasks(qadd_flat, flat.size, 8 * flat.size, ctx.num_threads, a, b, codes, sc_arr,
                      a_first, flat)  # fmt: skip
            return [out]

        return run

    return _binary(node, ctx, make_run, "qadd_flat")


def lower_qmul(node: Node, ctx: LowerContext) -> Kernel:
    def make_run(params, flip, off, dtype, operand):
        sa, za, sb, zb, sc, zc = params
        sa, sb, sc = _scalar_f32(sa), _scalar_f32(sb), _scalar_f32(sc)
        za, zb, zc = _scalar_int(za), _scalar_int(zb), _scalar_int(zc)
        with np.errstate(all="ignore"):
            r = F32(F32(sa * sb) / sc)
        codes = np.array([flip, off, dtype.qmin, dtype.qmax, za, zb], np.int64)
        zcf = F32(zc)

        def run(x, y):
            shape = np.broadcast_shapes(x.shape, y.shape)
            out = empty(shape, dtype.numpy)
            flat = unsigned_view(out).reshape(-1)
            run_tasks(qmul_flat, flat.size, 8 * flat.size, ctx.num_threads,
                      operand(x, shape), operand(y, shape), codes, r, zcf, flat)  # fmt: skip
            return [out]

        return run

    return _binary(node, ctx, make_run, "qmul_flat")


def lower_lookup(node: Node, ctx: LowerContext) -> Kernel:
    x = node.inputs[0]
    table = const_input(node, 1, "table")
    x_dt = x.type.dtype
    if not x_dt.is_int or x_dt.bits not in (8, 16):
        raise Decline(f"index of type {x_dt}")
    flip, _ = byte_codes(x_dt)
    out_dt = table.dtype
    if table.dtype.kind in "iu" and table.dtype.itemsize in (1, 2, 4):
        table_k = unsigned_view(table)
    elif table.dtype in (np.float32, np.float64):
        table_k = kernel_array(table)
    else:
        raise Decline(f"table of {table.dtype}")

    bytes_only = x_dt.bits == 8 and out_dt.kind in "iu" and out_dt.itemsize == 1
    bytes_only = bytes_only and table.shape == (256,)
    if bytes_only:
        table_k = byte_table(table, flip)
        vbmi = vbmi_lookups(select_isa())

    def run(x_array):
        out = empty(x_array.shape, out_dt)
        view = unsigned_view(out) if out_dt.kind in "iu" else out
        flat, xs = view.reshape(-1), unsigned_view(x_array).reshape(-1)
        if bytes_only:
            run_tasks(lookup_flat_bytes, flat.size, flat.size // 4, ctx.num_threads, xs, table_k,
                      vbmi, flat)  # fmt: skip
        else:
            run_tasks(lookup_flat, flat.size, 2 * flat.size, ctx.num_threads, xs, flip, table_k,
                      flat)  # fmt: skip
        return [out]

    kind = "lookup_flat_bytes" if bytes_only else "lookup_flat"
    return Kernel(f"{kind}[{x_dt}->{dtypes.from_numpy(out_dt)}]", run, [x], node.outputs, [node])


@jit()
def clip_flat(i0, i1, x, flip, lo, hi, out):
    """out = min(max(x, lo), hi) on codes compared as flipped unsigned values
    (lo and hi flipped alike), which orders signed codes correctly."""
    for k in range(i0, i1):
        i = U(k)
        v = np.int64(x[i]) ^ flip
        v = lo if v < lo else v
        v = hi if v > hi else v
        out[i] = v ^ flip


def lower_clip(node: Node, ctx: LowerContext) -> Kernel:
    """Integer clip (a relu/clip left on integers). The bounds are cast to x's
    type as the reference does (`astype`, C conversion), then applied max
    first, min second."""
    x = node.inputs[0]
    dt = x.type.dtype
    if not dt.is_int or dt.bits not in (8, 16):
        raise Decline(f"{dt} input (float clip runs in NumPy)")
    flip, _ = byte_codes(dt)
    mask = (1 << dt.bits) - 1
    lo, hi = ((code & mask) ^ flip for code in clip_bounds(node, dt))

    def run(x_array):
        out = empty(x_array.shape, dt.numpy)
        flat = unsigned_view(out).reshape(-1)
        run_tasks(clip_flat, flat.size, 2 * flat.size, ctx.num_threads,
                  unsigned_view(x_array).reshape(-1), flip, lo, hi, flat)  # fmt: skip
        return [out]

    return Kernel(f"clip_flat[{dt}]", run, [x], node.outputs, [node])
