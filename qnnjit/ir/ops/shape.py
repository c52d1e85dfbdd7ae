"""Data-movement and shape ops: reshape, transpose, concat, split, slice, pad,
gather, expand, and the small shape-computing ops (shape, range, cast,
constant_of_shape).

Quantized graphs run most of these directly on int8/uint8 data, so every
evaluation is dtype-agnostic and exact (no arithmetic on the values, except
cast and range). Attribute-like ONNX inputs (shape, axes, pads, starts/ends,
split sizes) are IR attributes here: the frontend resolved them at compile
time, axes are positive and lists are complete (`pads` has 2*rank entries).

Shape functions keep symbolic dims: a reshape divides symbolic products
(`_dims`), a slice over the whole of a symbolic axis keeps the symbol, and
anything else that depends on a symbol gets a fresh one.
"""

from __future__ import annotations

import numpy as np

from ... import numerics
from .. import dtypes
from ..types import TensorType
from . import _dims, broadcast_shapes, op

# Slice bounds at or beyond this magnitude mean "to the end" (ONNX uses INT_MAX / INT64_MAX).
_HUGE = (1 << 31) - 1


def _rank(ctx, index: int = 0) -> int:
    t = ctx.type(index)
    if t.shape is None:
        raise ctx.error(f"input {index} must have a known rank")
    return len(t.shape)


# ---- reshape family ------------------------------------------------------------


@op("flatten", summary="reshape to [prod(shape[:axis]), prod(shape[axis:])]")
class Flatten:
    def infer(ctx):
        t = ctx.type(0)
        axis = ctx.attrs["axis"]
        if not 0 <= axis <= _rank(ctx):
            raise ctx.error(f"axis {axis} out of range for rank {len(t.shape)}")
        return [t.with_shape((_dims.product(t.shape[:axis]), _dims.product(t.shape[axis:])))]

    def evaluate(inputs, attrs):
        x, axis = inputs[0], attrs["axis"]
        return [x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))]


def _reshape_target(ctx, shape, target, allowzero) -> tuple:
    """Resolve 0 (copy the input dim, unless allowzero) and -1 (the rest)."""
    out = []
    for index, dim in enumerate(target):
        if dim == 0 and not allowzero:
            if index >= len(shape):
                raise ctx.error(f"shape entry {index} is 0 but the input has rank {len(shape)}")
            out.append(shape[index])
        elif dim < -1:
            raise ctx.error(f"bad shape entry {dim}")
        else:
            out.append(dim)
    if out.count(-1) > 1:
        raise ctx.error("at most one shape entry may be -1")
    total = _dims.product(shape)
    if -1 in out:
        index = out.index(-1)
        rest = _dims.product(d for d in out if d != -1)
        dim = _dims.quotient(total, rest)
        out[index] = dim if dim is not None else _dims.fresh(ctx, f"d{index}")
    elif _dims.is_static([total]) and _dims.is_static(out) and total != _dims.product(out):
        raise ctx.error(f"cannot reshape {shape} to {tuple(target)}")
    return tuple(out)


@op("reshape", summary="reshape to `shape` (0 copies a dim unless allowzero, -1 infers one)")
class Reshape:
    def infer(ctx):
        t = ctx.type(0)
        if t.shape is None:
            raise ctx.error("reshape needs an input of known rank")
        target = _reshape_target(ctx, t.shape, ctx.attrs["shape"], ctx.attrs["allowzero"])
        return [t.with_shape(target)]

    def evaluate(inputs, attrs):
        x = inputs[0]
        target = [
            x.shape[i] if d == 0 and not attrs["allowzero"] else d
            for i, d in enumerate(attrs["shape"])
        ]
        return [x.reshape(target)]


@op("squeeze", summary="drop the size-1 axes `axes`")
class Squeeze:
    def infer(ctx):
        t = ctx.type(0)
        _rank(ctx)
        axes = ctx.attrs["axes"]
        for axis in axes:
            dim = t.shape[axis] if 0 <= axis < len(t.shape) else None
            if dim is None or isinstance(dim, int) and dim != 1:
                raise ctx.error(f"cannot squeeze axis {axis} of shape {t.shape}")
        return [t.with_shape(tuple(d for i, d in enumerate(t.shape) if i not in axes))]

    def evaluate(inputs, attrs):
        return [np.squeeze(inputs[0], axis=tuple(attrs["axes"]))]


@op("unsqueeze", summary="insert size-1 axes at `axes` (positions in the output)")
class Unsqueeze:
    def infer(ctx):
        t = ctx.type(0)
        axes = ctx.attrs["axes"]
        rank = _rank(ctx) + len(axes)
        if len(set(axes)) != len(axes) or any(not 0 <= a < rank for a in axes):
            raise ctx.error(f"bad axes {axes} for output rank {rank}")
        dims = iter(t.shape)
        return [t.with_shape(tuple(1 if i in axes else next(dims) for i in range(rank)))]

    def evaluate(inputs, attrs):
        return [np.expand_dims(inputs[0], tuple(attrs["axes"]))]


@op("transpose", summary="permute axes: output axis i is input axis perm[i]")
class Transpose:
    def infer(ctx):
        t = ctx.type(0)
        perm = ctx.attrs["perm"]
        if sorted(perm) != list(range(_rank(ctx))):
            raise ctx.error(f"perm {perm} is not a permutation of rank {len(t.shape)}")
        return [t.with_shape(tuple(t.shape[p] for p in perm))]

    def evaluate(inputs, attrs):
        return [np.ascontiguousarray(np.transpose(inputs[0], attrs["perm"]))]


@op("expand", summary="broadcast to `shape` (bidirectional, as ONNX Expand)")
class Expand:
    """`shape` holds ints or symbolic dims. With symbolic entries (a dynamic
    batch) the optional input 1, the int64 shape tensor computed at run
    time, gives the sizes; `shape` then only types the result."""

    def infer(ctx):
        t = ctx.type(0)
        target = tuple(ctx.attrs["shape"])
        if ctx.has(1):
            shape = ctx.type(1)
            if shape.dtype != dtypes.int64 or shape.shape not in (None, (len(target),)):
                raise ctx.error(f"shape input must be int64 of shape ({len(target)},)")
        elif not all(isinstance(d, int) for d in target):
            raise ctx.error(f"symbolic target {target} needs the run-time shape input")
        return [t.with_shape(broadcast_shapes(ctx, t.shape, target))]

    def evaluate(inputs, attrs):
        x = inputs[0]
        if len(inputs) > 1 and inputs[1] is not None:
            target = tuple(int(d) for d in np.asarray(inputs[1]).reshape(-1))
        else:
            target = tuple(attrs["shape"])
        shape = np.broadcast_shapes(x.shape, target)
        return [np.broadcast_to(x, shape).copy()]


# ---- joining and splitting -------------------------------------------------------


def _merge_dim(ctx, dims, axis: int):
    """One dim from several that must agree (a static one wins over symbols)."""
    static = {d for d in dims if isinstance(d, int)}
    if len(static) > 1:
        raise ctx.error(f"inputs disagree on axis {axis}: {sorted(static)}")
    return static.pop() if static else dims[0]


@op("concat", summary="join inputs along `axis`")
class Concat:
    def infer(ctx):
        types = [ctx.type(i) for i in range(len(ctx.types))]
        first = types[0]
        if any(t.dtype != first.dtype for t in types):
            raise ctx.error(f"input types differ: {[str(t.dtype) for t in types]}")
        if any(t.shape is None for t in types):
            return [TensorType(first.dtype, None)]
        axis, rank = ctx.attrs["axis"], len(first.shape)
        if any(len(t.shape) != rank for t in types) or not 0 <= axis < rank:
            raise ctx.error(f"cannot concatenate shapes {[t.shape for t in types]} on axis {axis}")
        shape = [
            _dims.total(ctx, [t.shape[i] for t in types], f"d{i}")
            if i == axis
            else _merge_dim(ctx, [t.shape[i] for t in types], i)
            for i in range(rank)
        ]
        return [TensorType(first.dtype, tuple(shape))]

    def evaluate(inputs, attrs):
        return [np.concatenate(inputs, axis=attrs["axis"])]


@op("split", summary="cut along `axis` into pieces of sizes `split` (one output each)")
class Split:
    def infer(ctx):
        t = ctx.type(0)
        axis, sizes = ctx.attrs["axis"], ctx.attrs["split"]
        if not 0 <= axis < _rank(ctx):
            raise ctx.error(f"axis {axis} out of range for rank {len(t.shape)}")
        dim = t.shape[axis]
        if isinstance(dim, int) and sum(sizes) != dim:
            raise ctx.error(f"split sizes {sizes} do not add up to {dim}")
        if not isinstance(dim, int) and len(sizes) != 1:
            raise ctx.error(f"cannot split symbolic axis {axis} ({dim}) into {sizes}")
        shapes = [
            t.shape[:axis] + (s if isinstance(dim, int) else dim,) + t.shape[axis + 1 :]
            for s in sizes
        ]
        return [t.with_shape(shape) for shape in shapes]

    def evaluate(inputs, attrs):
        x, axis = inputs[0], attrs["axis"]
        cuts = np.cumsum(attrs["split"])[:-1]
        return [np.ascontiguousarray(piece) for piece in np.split(x, cuts, axis=axis)]


def slice_bounds(start: int, end: int, step: int, dim: int) -> tuple[int, int, int]:
    """ONNX Slice: negative start/end count from the end, then clamp to
    [0, dim] (step > 0) or start to [0, dim-1], end to [-1, dim-1] (step < 0).
    Returns (start, end, length)."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        length = max(0, -(-(end - start) // step))
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        length = max(0, -(-(start - end) // -step))
    return start, end, length


def _whole_axis(start: int, end: int, step: int) -> bool:
    """Whether a slice keeps a whole axis of any size, in order or reversed."""
    if step == 1:
        return (start == 0 or start <= -_HUGE) and end >= _HUGE
    if step == -1:
        return (start == -1 or start >= _HUGE) and end <= -_HUGE
    return False


@op("slice", summary="strided slice: starts/ends/steps along axes, ONNX clamping")
class Slice:
    def infer(ctx):
        t = ctx.type(0)
        shape = list(t.shape) if t.shape is not None else None
        if shape is None:
            raise ctx.error("slice needs an input of known rank")
        a = ctx.attrs
        for start, end, axis, step in zip(
            a["starts"], a["ends"], a["axes"], a["steps"], strict=True
        ):
            if not 0 <= axis < len(shape) or step == 0:
                raise ctx.error(f"bad axis {axis} or step {step}")
            dim = shape[axis]
            if isinstance(dim, int):
                shape[axis] = slice_bounds(start, end, step, dim)[2]
            elif not _whole_axis(start, end, step):
                shape[axis] = _dims.fresh(ctx, f"d{axis}")
        return [t.with_shape(tuple(shape))]

    def evaluate(inputs, attrs):
        x = inputs[0]
        index = [slice(None)] * x.ndim
        for start, end, axis, step in zip(
            attrs["starts"], attrs["ends"], attrs["axes"], attrs["steps"], strict=True
        ):
            lo, hi, _ = slice_bounds(start, end, step, x.shape[axis])
            index[axis] = slice(lo, None if hi < 0 else hi, step)
        return [np.ascontiguousarray(x[tuple(index)])]


@op("pad", summary="pad (or crop, for negative pads) every axis; mode constant|reflect|edge|wrap")
class Pad:
    def infer(ctx):
        t = ctx.type(0)
        rank = _rank(ctx)
        pads = ctx.attrs["pads"]
        if len(pads) != 2 * rank:
            raise ctx.error(f"pads has {len(pads)} entries, expected {2 * rank}")
        shape = []
        for axis, dim in enumerate(t.shape):
            grow = pads[axis] + pads[rank + axis]
            if isinstance(dim, int):
                shape.append(dim + grow)
            else:
                shape.append(dim if grow == 0 else _dims.fresh(ctx, f"d{axis}"))
        return [t.with_shape(tuple(shape))]

    def evaluate(inputs, attrs):
        x, pads, rank = inputs[0], attrs["pads"], inputs[0].ndim
        crop = tuple(
            slice(max(-pads[i], 0), x.shape[i] - max(-pads[rank + i], 0)) for i in range(rank)
        )
        x = x[crop]
        widths = [(max(pads[i], 0), max(pads[rank + i], 0)) for i in range(rank)]
        mode = attrs["mode"]
        if mode == "constant":
            value = np.asarray(attrs["value"]).astype(x.dtype)
            return [np.pad(x, widths, mode="constant", constant_values=value)]
        return [
            np.pad(x, widths, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])
        ]


@op("gather", summary="take entries of data along `axis` at integer indices (negative wrap)")
class Gather:
    def infer(ctx):
        data, indices = ctx.type(0), ctx.type(1)
        if not indices.dtype.is_int:
            raise ctx.error(f"indices must be integers, got {indices.dtype}")
        axis = ctx.attrs["axis"]
        if not 0 <= axis < _rank(ctx):
            raise ctx.error(f"axis {axis} out of range for rank {len(data.shape)}")
        if indices.shape is None:
            return [TensorType(data.dtype, None)]
        shape = data.shape[:axis] + indices.shape + data.shape[axis + 1 :]
        return [TensorType(data.dtype, shape)]

    def evaluate(inputs, attrs):
        data, indices = inputs
        axis = attrs["axis"]
        size = data.shape[axis]
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < -size or indices.max() >= size):
            raise IndexError(f"gather index out of range [-{size}, {size - 1}]")
        return [np.take(data, np.where(indices < 0, indices + size, indices), axis=axis)]


# ---- shape computations ----------------------------------------------------------


@op("shape", summary="the input's shape[start:end] as int64")
class Shape:
    def infer(ctx):
        rank = _rank(ctx)
        start, end = ctx.attrs["start"], ctx.attrs["end"]
        return [TensorType(dtypes.int64, (len(range(rank)[start:end]),))]

    def evaluate(inputs, attrs):
        return [np.array(inputs[0].shape[attrs["start"] : attrs["end"]], dtype=np.int64)]


@op("size", summary="the input's number of elements as an int64 scalar")
class Size:
    def infer(ctx):
        return [TensorType(dtypes.int64, ())]

    def evaluate(inputs, attrs):
        return [np.array(inputs[0].size, dtype=np.int64)]


@op("constant_of_shape", summary="a tensor of `shape` filled with the scalar `value` (no inputs)")
class ConstantOfShape:
    def infer(ctx):
        value = np.asarray(ctx.attrs["value"])
        return [TensorType(dtypes.from_numpy(value.dtype), tuple(ctx.attrs["shape"]))]

    def evaluate(inputs, attrs):
        value = np.asarray(attrs["value"])
        return [np.full(tuple(attrs["shape"]), value.reshape(()), dtype=value.dtype)]


@op("range", summary="start + i * delta for i in [0, ceil((limit - start) / delta))")
class Range:
    def infer(ctx):
        start, limit, delta = (
            ctx.const(i, what) for i, what in enumerate(("start", "limit", "delta"))
        )
        if len({ctx.type(i).dtype for i in range(3)}) != 1:
            raise ctx.error("start, limit and delta must have one type")
        (out,) = Range.evaluate([start, limit, delta], ctx.attrs)
        return [TensorType(ctx.type(0).dtype, out.shape)]

    def evaluate(inputs, attrs):
        start, limit, delta = (np.asarray(v).reshape(()) for v in inputs)
        dtype = start.dtype
        # float16/bfloat16 step in float32 (ONNX's default stash_type); others in their type.
        work = np.float32 if dtype in (np.float16, dtypes.bfloat16.numpy) else dtype
        first, step = start.astype(work), delta.astype(work)
        span = np.float64(limit.astype(work)) - np.float64(first)
        count = int(max(np.ceil(span / np.float64(step)), 0))
        values = first + np.arange(count).astype(work) * step
        return [values.astype(dtype)]


# ---- cast ----------------------------------------------------------------------

_FLOAT8 = (dtypes.float8e4m3fn, dtypes.float8e4m3fnuz, dtypes.float8e5m2, dtypes.float8e5m2fnuz)


def _to_e8m0(x: np.ndarray, saturate: bool, round_mode: str) -> np.ndarray:
    """float -> float8e8m0 (a bare power-of-two exponent) from the float32
    bits: keep the exponent field, add one when rounding `up` (any fraction),
    `nearest` (fraction above 1/2, or exactly 1/2 above the subnormals), or
    never (`down`). Saturation stops at the largest exponent 0xFE instead of
    reaching NaN (0xFF); the sign is ignored (negative inputs are undefined)."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.uint16)
    mantissa = bits & 0x7FFFFF
    if round_mode == "up":
        bump = mantissa > 0
    elif round_mode == "nearest":
        bump = ((mantissa & 0x400000) > 0) & (((mantissa & 0x3FFFFF) > 0) | (exponent > 0))
    elif round_mode == "down":
        bump = np.zeros(bits.shape, dtype=bool)
    else:
        raise ValueError(f"unknown round_mode {round_mode!r}")
    special = exponent == 0xFF
    bump &= ~special
    if saturate:
        bump &= exponent != 0xFE
    return (exponent + bump).astype(np.uint8).view(dtypes.float8e8m0.numpy)


def cast_array(x: np.ndarray, to: dtypes.DType, saturate: bool = True, round_mode: str = "up"):
    """ONNX Cast. Floats to integers truncate toward zero, integers wrap to
    the target width, anything nonzero is True. float8/float4 targets round
    to nearest even from float32 (via qnnjit.numerics, with the ONNX
    saturation table); float8e8m0 follows `round_mode`."""
    if to.is_float and to.bits <= 8:
        wide = np.asarray(x).astype(np.float32)
        if to == dtypes.float8e8m0:
            return _to_e8m0(wide, saturate, round_mode)
        # quantize with scale 1 and no zero point is exactly the Cast table.
        return numerics.quantize(wide, np.float32(1), None, to, saturate=saturate)
    with np.errstate(all="ignore"):
        if to == dtypes.bool_:
            return np.asarray(x != 0, dtype=np.bool_)
        return np.asarray(x).astype(to.numpy)


@op("cast", summary="convert to dtype `to` (float8: `saturate`; float8e8m0: `round_mode`)")
class Cast:
    def infer(ctx):
        t = ctx.type(0)
        return [TensorType(dtypes.by_name(ctx.attrs["to"]), t.shape)]

    def evaluate(inputs, attrs):
        to = dtypes.by_name(attrs["to"])
        return [
            cast_array(inputs[0], to, attrs.get("saturate", True), attrs.get("round_mode", "up"))
        ]
