"""Data movement without arithmetic:

- shape-only ops (flatten, reshape, squeeze, unsqueeze, identity) as
  reshapes: nothing to compile, and no copy where NumPy can make the
  result a view, channels-last inputs included (a ViT's patch embedding,
  [N, C, H, W] in NHWC memory, flattened to [N, C, H*W]: a strided view).
  The result shape is the reference semantics' own (its `evaluate` runs
  once per input shape), then cached, so a step costs one `reshape` call;
- gather of one constant index (attention's q, k, v = qkv[0], qkv[1],
  qkv[2]): a view of the input's slice when the slice is contiguous (no
  dims of size > 1 before the axis), else NumPy's copy;
- transpose: a view where the transposed input is C-contiguous (it undoes
  a channels-last layout: the ViT's patches, [N, C, H*W] in NHWC memory,
  to [N, H*W, C]); else `transpose_rows`, a copy through `run_tasks` (so a
  replayed run repeats it: a NumPy copy made outside the recorded calls
  would make its step run again through Python each time), over the
  permutation with runs of source-contiguous dims merged, at most
  `_TRANSPOSE_RANK` left;
- concat along the channels of 4-D tensors: `concat_channels`, one copy
  kernel call per operand through `run_tasks` into its channel segment of a
  channels-last result (`layout.py`), reading each operand's NHWC memory
  in place (a conv's result) or its NCHW memory (a transposing read), so
  the step replays and the convolutions and pools reading the result get
  their NHWC bytes without a transpose. Every other concat (any rank and
  axis, a ViT's class token and patches for one): `concat_rows`, each
  operand seen as [dims before the axis, the rest] copied into its segment
  of the result's rows, one call per operand, so the step replays too.
The copies are listed as copies in the plan, not as fallbacks: no number
changes on the way, so there is no numerics to compile."""

from __future__ import annotations

import math

import numpy as np

from ....ir import ops
from ....ir.graph import Node
from ._buffers import empty
from ._lowering import Decline, Kernel, LowerContext, const_input, numpy_kernel
from ._numba import U, jit
from ._threads import run_tasks
from .layout import UNSIGNED, channels_last_output, is_channels_last
from .requant import unsigned_view

SHAPE_OPS = ("flatten", "reshape", "squeeze", "unsqueeze", "identity")
_TRANSPOSE_RANK = 4  # dims `transpose_rows` walks (after merging)


def lower_view(node: Node, ctx: LowerContext) -> Kernel:
    for index in range(1, len(node.inputs)):
        const_input(node, index, "shape operand")  # Decline when not constant
    opdef = ops.get(node.op)
    template = [None if v is None else v.const for v in node.inputs]
    attrs = node.attrs
    if template[0] is not None:  # a constant operand: the result is a constant too
        result = opdef.evaluate(template, attrs)[0]
        return Kernel(f"view:{node.op}", lambda: [result], [], node.outputs, [node])
    shapes: dict[tuple, tuple] = {}

    def run(x):
        shape = shapes.get(x.shape)
        if shape is None:
            args = list(template)
            args[0] = x
            shape = shapes[x.shape] = opdef.evaluate(args, attrs)[0].shape
        return [x.reshape(shape)]

    return Kernel(
        f"view:{node.op}", run, [node.inputs[0]], node.outputs, [node], strided_inputs=True
    )


# ---- concat --------------------------------------------------------------------------


@jit()
def concat_channels(t0, t1, src, geo, out):
    """Pixel rows t0..t1 (image, h) of one operand of a channel concat into
    its channel segment of the channels-last result out [N, H, W, total]
    (flat): out[p * total + offset + c] = the operand's channel c at pixel p
    (over all images), read from its NHWC memory, src[p * C + c], or with
    `nchw` from its NCHW memory, src[(n * C + c) * HW + p - n * HW].
    geo = (C, W, HW, total, offset, nchw)."""
    C, W, HW, total, offset, nchw = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    for t in range(t0, t1):
        p0 = t * W
        if nchw == 0:
            for p in range(p0, p0 + W):
                s, d = p * C, p * total + offset
                for c in range(C):
                    out[U(d + c)] = src[U(s + c)]
        else:
            n = p0 // HW
            s0 = n * C * HW + p0 - n * HW  # (n, channel 0, pixel p0)
            for c in range(C):
                s, d = s0 + c * HW, p0 * total + offset + c
                for i in range(W):
                    out[U(d + i * total)] = src[U(s + i)]


def _concat_operand(array: np.ndarray) -> tuple[np.ndarray, int]:
    """(flat unsigned view of `array`'s memory, 1 if that memory is NCHW else 0
    for NHWC): in place when it is either and writable, else a C-contiguous
    copy (Numba types read-only arrays apart)."""
    unsigned = UNSIGNED[array.dtype.itemsize]
    hwc = array.transpose(0, 2, 3, 1)
    if hwc.flags.c_contiguous and hwc.flags.writeable:
        return hwc.view(unsigned).reshape(-1), 0
    return _flat_bytes(array), 1


def _flat_bytes(array: np.ndarray) -> np.ndarray:
    """`array`'s elements in C order as flat unsigned integers (in place when
    it is C-contiguous and writable)."""
    return unsigned_view(array).reshape(-1)


@jit()
def concat_rows(t0, t1, src, geo, out):
    """Rows t0..t1 of one operand of a concat seen as [outer, inner] (the
    dims up to the axis, the rest) into its segment of the result's rows
    [outer, total]: out[t * total + offset + i] = src[t * inner + i].
    geo = (inner, total, offset)."""
    inner, total, offset = geo[0], geo[1], geo[2]
    for t in range(t0, t1):
        s, d = t * inner, t * total + offset
        for i in range(inner):
            out[U(d + i)] = src[U(s + i)]


def lower_concat(node: Node, ctx: LowerContext) -> Kernel:
    """Concat along axis 1 of 4-D tensors with a channels-last operand: a
    channels-last result, one `concat_channels` call per operand; every
    other concat: a C-ordered result, one `concat_rows` call per operand
    (both replay: a transformer's class token and patches, for one)."""
    shape = node.outputs[0].type.shape
    dtype = node.outputs[0].type.dtype.numpy
    if np.dtype(dtype).itemsize not in UNSIGNED:
        return numpy_kernel(node, "numpy-copy")
    axis = node.attrs["axis"]
    # constant operands, and their kernel views, made once (the same arrays every call)
    template = [np.array(v.const, order="C") if v.is_constant else None for v in node.inputs]
    constants = {
        i: _concat_operand(a) for i, a in enumerate(template) if a is not None and a.ndim == 4
    }
    constant_rows = {i: _flat_bytes(a) for i, a in enumerate(template) if a is not None}
    runtime = [i for i, v in enumerate(node.inputs) if not v.is_constant]
    plans: dict[tuple, list] = {}

    def run(*arrays):
        operands = list(template)
        for index, array in zip(runtime, arrays):
            operands[index] = array
        rank = operands[0].ndim
        if not all(a.ndim == rank for a in operands) or not -rank <= axis < rank:
            return [np.concatenate(operands, axis=axis)]  # NumPy's error
        if rank == 4 and axis % 4 == 1:
            n, _, h, w = operands[0].shape
            same = all((a.shape[0], *a.shape[2:]) == (n, h, w) for a in operands)
            if same and any(is_channels_last(a) for a in arrays):
                return [channels(operands, n, h, w)]
        return [rows(operands, axis % rank)]

    def channels(operands, n, h, w):
        sources = [constants.get(i) or _concat_operand(a) for i, a in enumerate(operands)]
        key = ("channels",) + tuple((a.shape, nchw) for a, (_, nchw) in zip(operands, sources))
        geos = plans.get(key)
        if geos is None:  # per operand, the same array every call (replay needs that)
            total = sum(a.shape[1] for a in operands)
            offsets = np.cumsum([0] + [a.shape[1] for a in operands])
            geos = plans[key] = [
                np.array([a.shape[1], w, h * w, total, offset, nchw], np.int64)
                for a, (_, nchw), offset in zip(operands, sources, offsets)
            ]
        out, flat = channels_last_output((n, int(geos[0][3]), h, w), dtype)
        for a, (src, _), geo in zip(operands, sources, geos):
            if a.size:
                run_tasks(concat_channels, n * h, a.size, ctx.num_threads, src, geo, flat)
        return out

    def rows(operands, ax):
        first = operands[0].shape
        if any(a.shape[:ax] + a.shape[ax + 1 :] != first[:ax] + first[ax + 1 :] for a in operands):
            return np.concatenate(operands, axis=ax)  # NumPy's error
        key = ("rows", ax) + tuple(a.shape for a in operands)
        geos = plans.get(key)
        outer = math.prod(first[:ax])
        if geos is None:
            inners = [math.prod(a.shape[ax:]) for a in operands]
            offsets = np.cumsum([0] + inners)
            geos = plans[key] = [
                np.array([inner, offsets[-1], offset], np.int64)
                for inner, offset in zip(inners, offsets)
            ]
        out = empty((*first[:ax], sum(a.shape[ax] for a in operands), *first[ax + 1 :]), dtype)
        flat = out.view(UNSIGNED[out.dtype.itemsize]).reshape(-1)
        for i, (a, geo) in enumerate(zip(operands, geos)):
            if a.size:
                src = constant_rows[i] if i in constant_rows else _flat_bytes(a)
                run_tasks(concat_rows, outer, a.size, ctx.num_threads, src, geo, flat)
        return out

    inputs = [node.inputs[i] for i in runtime]
    kind = (
        "concat_channels"
        if shape is not None and len(shape) == 4 and axis % 4 == 1
        else "concat_rows"
    )
    name = f"{kind}[{node.outputs[0].type.dtype}]"
    return Kernel(name, run, inputs, node.outputs, [node], strided_inputs=True)


# ---- gather of one index -----------------------------------------------------------


def lower_gather(node: Node, ctx: LowerContext) -> Kernel:
    indices = const_input(node, 1, "indices")
    if indices.size != 1:
        raise Decline("more than one index (a NumPy take copies)")
    if node.inputs[0].is_constant:
        raise Decline("constant data")
    axis = node.attrs["axis"]
    index = int(indices.reshape(-1)[0])
    index_shape = indices.shape

    def run(x):
        size = x.shape[axis]
        if not -size <= index < size:
            raise IndexError(f"gather index {index} out of range [-{size}, {size - 1}]")
        taken = x[(slice(None),) * axis + (index % size,)]
        out_shape = x.shape[:axis] + index_shape + x.shape[axis + 1 :]
        return [np.ascontiguousarray(taken).reshape(out_shape)]  # a view when contiguous

    return Kernel("view:gather", run, [node.inputs[0]], node.outputs, [node])


# ---- transpose -----------------------------------------------------------------------


@jit()
def transpose_rows(t0, t1, src, dims, strides, out):
    """Rows t0..t1 of a transposed copy. The result, C order, is
    [dims[0], dims[1], dims[2], dims[3]]; its element (i0, i1, i2, i3) is
    src[i0*s0 + i1*s1 + i2*s2 + i3*s3] (strides in elements); row t is
    (i0, i1, i2) in C order."""
    d1, d2, d3 = dims[1], dims[2], dims[3]
    s0, s1, s2, s3 = strides[0], strides[1], strides[2], strides[3]
    # (i0, i1, i2) of row t0, then counted up: three divisions a row cost
    # more than copying its 64 bytes (attention's q/k/v split)
    i2, i1, i0 = t0 % d2, (t0 // d2) % d1, t0 // (d2 * d1)
    for t in range(t0, t1):
        base = i0 * s0 + i1 * s1 + i2 * s2
        row = t * d3
        if s3 == 1:
            for i3 in range(d3):
                out[U(row + i3)] = src[U(base + i3)]
        else:
            for i3 in range(d3):
                out[U(row + i3)] = src[U(base + i3 * s3)]
        i2 += 1
        if i2 == d2:
            i2 = 0
            i1 += 1
            if i1 == d1:
                i1 = 0
                i0 += 1


def transpose_plan(shape: tuple, perm) -> tuple[np.ndarray, np.ndarray] | None:
    """(dims, strides) for `transpose_rows` of a C-contiguous array of `shape`
    permuted by `perm`: the result's dims with their source strides (in
    elements), size-1 dims dropped and neighbours that are contiguous in the
    source merged, padded to `_TRANSPOSE_RANK` at the front; None if more
    dims remain."""
    source = [1] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        source[axis] = source[axis + 1] * shape[axis + 1]
    dims, strides = [], []
    for axis in perm:
        if shape[axis] == 1:
            continue
        if dims and strides[-1] == source[axis] * shape[axis]:
            dims[-1] *= shape[axis]  # the previous dim continues into this one
            strides[-1] = source[axis]
            continue
        dims.append(shape[axis])
        strides.append(source[axis])
    if len(dims) > _TRANSPOSE_RANK:
        return None
    pad = _TRANSPOSE_RANK - len(dims)
    return (
        np.array([1] * pad + dims, np.int64),
        np.array([0] * pad + strides, np.int64),
    )


def lower_transpose(node: Node, ctx: LowerContext) -> Kernel:
    perm = list(node.attrs["perm"])
    if node.inputs[0].is_constant:
        raise Decline("constant data")
    plans: dict[tuple, tuple | None] = {}

    def run(x):
        view = np.transpose(x, perm)
        if view.flags.c_contiguous:
            return [view]
        x = np.ascontiguousarray(x)  # a strided input: the copy the executor would make
        shape = x.shape
        if shape not in plans:
            plans[shape] = transpose_plan(shape, perm)
        plan = plans[shape]
        out_shape = tuple(shape[p] for p in perm)
        if plan is None or x.dtype.itemsize not in UNSIGNED:
            return [np.ascontiguousarray(np.transpose(x, perm))]
        dims, strides = plan
        out = empty(out_shape, x.dtype)
        rows = int(dims[0] * dims[1] * dims[2])
        if x.size:
            src = x.view(UNSIGNED[x.dtype.itemsize]).reshape(-1)
            flat = out.view(UNSIGNED[x.dtype.itemsize]).reshape(-1)
            run_tasks(transpose_rows, rows, x.size, ctx.num_threads, src, dims, strides, flat)
        return [out]

    return Kernel(
        f"transpose[{perm}]", run, [node.inputs[0]], node.outputs, [node], strided_inputs=True
    )
