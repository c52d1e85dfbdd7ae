"""Data movement without arithmetic:

- shape-only ops (flatten, reshape, squeeze, unsqueeze, identity) as
  reshapes: nothing to compile and no copy for the contiguous arrays the
  kernels produce. The result shape is the reference semantics' own (its
  `evaluate` runs once per input shape), then cached, so a step costs one
  `reshape` call;
- gather of one constant index (attention's q, k, v = qkv[0], qkv[1],
  qkv[2]): a view of the input's slice when the slice is contiguous (no
  dims of size > 1 before the axis), else NumPy's copy;
- transpose: `transpose_rows`, a copy through `run_tasks` (so a replayed
  run repeats it: a NumPy copy made outside the recorded calls would make
  its step run again through Python each time), over the permutation with
  runs of source-contiguous dims merged, at most `_TRANSPOSE_RANK` left;
- concat: `np.concatenate`, a single C loop over memory already.
The copies are listed as copies in the plan, not as fallbacks: no number
changes on the way, so there is no numerics to compile."""

from __future__ import annotations

import numpy as np

from ....ir import ops
from ....ir.graph import Node
from ._buffers import empty
from ._lowering import Decline, Kernel, LowerContext, const_input, numpy_kernel
from ._numba import U, jit
from ._threads import run_tasks
from .layout import UNSIGNED

SHAPE_OPS = ("flatten", "reshape", "squeeze", "unsqueeze", "identity")
COPY_OPS = ("concat",)
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

    return Kernel(f"view:{node.op}", run, [node.inputs[0]], node.outputs, [node])


def lower_copy(node: Node, ctx: LowerContext) -> Kernel:
    return numpy_kernel(node, "numpy-copy")


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
    for t in range(t0, t1):
        i2 = t % d2
        i1 = (t // d2) % d1
        i0 = t // (d2 * d1)
        base = i0 * s0 + i1 * s1 + i2 * s2
        row = t * d3
        if s3 == 1:
            for i3 in range(d3):
                out[U(row + i3)] = src[U(base + i3)]
        else:
            for i3 in range(d3):
                out[U(row + i3)] = src[U(base + i3 * s3)]


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

    return Kernel(f"transpose[{perm}]", run, [node.inputs[0]], node.outputs, [node])
