"""Converters for ONNX data-movement and shape ops (opsets 13 and later).

Attribute-like inputs (Reshape's shape, Slice's starts/ends/axes/steps,
Squeeze/Unsqueeze axes, Pad's pads/constant_value/axes, Split's split,
Expand's shape, ConstantOfShape's shape) must be constants at compile time;
they become IR attributes with negative axes made positive and defaults
filled in. Reshape's shape may also be computed from symbolic dims (a dynamic
batch read by Shape): `symbolic_ints` resolves it by evaluating the
computation for two sizes of the symbols, and the entries that follow a dim
become 0 (copy) or -1 (infer). Opset differences handled here: Split's `split` input (13) or
`num_outputs` attribute (18), Pad's `axes` input (18) and wrap mode (19),
Shape's start/end (15), Reshape's allowzero (14), Cast's saturate (19) and
round_mode (24).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ....ir import dtypes, ops
from ..loader import onnx_dtype
from . import converter
from ._common import axes, axis, ints, present, rank, scalar, symbolic_ints


@converter("Flatten")
def flatten(ctx):
    size = rank(ctx, 0)
    value = ctx.attr("axis", 1)
    if not -size <= value <= size:
        raise ctx.error(f"axis {value} is out of range for rank {size}")
    return ctx.emit("flatten", [ctx.input(0)], {"axis": value + size if value < 0 else value})


@converter("Reshape")
def reshape(ctx):
    allowzero = int(ctx.attr("allowzero", 0))
    x_shape = ctx.input(0).type.shape or ()
    target = symbolic_ints(ctx, 1, "shape", like=x_shape)
    if not all(isinstance(d, int) for d in target):
        # A shape computed from a symbolic dim (dynamic batch): an entry equal
        # to the input's dim at the same place copies it (0), one other
        # symbolic entry is inferred (-1).
        shape = []
        for i, d in enumerate(target):
            copies = d is not None and not allowzero and i < len(x_shape) and x_shape[i] == d
            shape.append(0 if copies else d)
        unknown = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(unknown) > 1 or (unknown and -1 in shape):
            raise ctx.error(
                f"the target shape {list(target)} depends on symbolic dims in a way qnnjit "
                "cannot express; give the input a static shape"
            )
        target = tuple(-1 if not isinstance(d, int) else d for d in shape)
    return ctx.emit("reshape", [ctx.input(0)], {"shape": target, "allowzero": allowzero})


@converter("Transpose")
def transpose(ctx):
    size = rank(ctx, 0)
    perm = ctx.attr("perm")
    perm = tuple(range(size))[::-1] if perm is None else axes(ctx, perm, size, "perm")
    return ctx.emit("transpose", [ctx.input(0)], {"perm": perm})


@converter("Concat")
def concat(ctx):
    inputs = [v for v in ctx.inputs if v is not None]
    return ctx.emit("concat", inputs, {"axis": axis(ctx, ctx.attr("axis"), rank(ctx, 0))})


def _split_sizes(ctx, dim, parts: int, uneven: bool) -> tuple[int, ...]:
    if not isinstance(dim, int):
        raise ctx.error(f"splitting a symbolic axis ({dim!r}) needs explicit split sizes")
    if not uneven:
        if dim % parts:
            raise ctx.error(f"axis of size {dim} does not split into {parts} equal parts")
        return (dim // parts,) * parts
    chunk = -(-dim // parts)
    return tuple(min(chunk, max(dim - i * chunk, 0)) for i in range(parts))


@converter("Split")
def split(ctx):
    size = rank(ctx, 0)
    along = axis(ctx, ctx.attr("axis", 0), size)
    outputs = len(ctx.node.output)
    if present(ctx, 1):
        sizes = ints(ctx.const(1, "split"))
    elif ctx.attr("num_outputs") is not None:
        sizes = _split_sizes(ctx, ctx.input(0).type.shape[along], ctx.attr("num_outputs"), True)
    else:
        sizes = _split_sizes(ctx, ctx.input(0).type.shape[along], outputs, False)
    if len(sizes) != outputs:
        raise ctx.error(f"{len(sizes)} split sizes for {outputs} outputs")
    return ctx.emit("split", [ctx.input(0)], {"axis": along, "split": sizes})


@converter("Slice")
def slice_(ctx):
    size = rank(ctx, 0)
    starts, ends = ints(ctx.const(1, "starts")), ints(ctx.const(2, "ends"))
    if present(ctx, 3):
        along = axes(ctx, ctx.const(3, "axes"), size)
    else:
        along = tuple(range(len(starts)))
    steps = ints(ctx.const(4, "steps")) if present(ctx, 4) else (1,) * len(starts)
    if not len(starts) == len(ends) == len(along) == len(steps):
        raise ctx.error("starts, ends, axes and steps must have the same length")
    if 0 in steps:
        raise ctx.error("slice steps must be nonzero")
    attrs = {"starts": starts, "ends": ends, "axes": along, "steps": steps}
    return ctx.emit("slice", [ctx.input(0)], attrs)


@converter("Squeeze")
def squeeze(ctx):
    size = rank(ctx, 0)
    if present(ctx, 1):
        along = axes(ctx, ctx.const(1, "axes"), size)
    else:
        shape = ctx.input(0).type.shape
        if any(isinstance(d, str) for d in shape):
            raise ctx.error(f"Squeeze without axes needs a static shape, got {shape}")
        along = tuple(i for i, d in enumerate(shape) if d == 1)
    return ctx.emit("squeeze", [ctx.input(0)], {"axes": tuple(sorted(along))})


@converter("Unsqueeze")
def unsqueeze(ctx):
    values = ctx.const(1, "axes").reshape(-1)
    along = axes(ctx, values, rank(ctx, 0) + values.size)
    return ctx.emit("unsqueeze", [ctx.input(0)], {"axes": tuple(sorted(along))})


@converter("Pad")
def pad(ctx):
    size = rank(ctx, 0)
    pads = ints(ctx.const(1, "pads"))
    along = axes(ctx, ctx.const(3, "axes"), size) if present(ctx, 3) else tuple(range(size))
    if len(pads) != 2 * len(along):
        raise ctx.error(f"pads has {len(pads)} entries for {len(along)} axes")
    full = [0] * 2 * size
    for i, a in enumerate(along):
        full[a], full[size + a] = pads[i], pads[len(along) + i]
    mode = ctx.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise ctx.error(f"unknown pad mode {mode!r}")
    value = scalar(ctx.const(2, "constant_value")) if present(ctx, 2) else 0
    attrs = {"pads": tuple(full), "mode": mode, "value": value}
    return ctx.emit("pad", [ctx.input(0)], attrs)


@converter("Gather")
def gather(ctx):
    attrs = {"axis": axis(ctx, ctx.attr("axis", 0), rank(ctx, 0))}
    return ctx.emit("gather", [ctx.input(0), ctx.input(1)], attrs)


@converter("Expand")
def expand(ctx):
    target = symbolic_ints(ctx, 1, "shape", like=ctx.input(0).type.shape)
    if all(isinstance(d, int) for d in target):
        return ctx.emit("expand", [ctx.input(0)], {"shape": target})
    if None in target:
        raise ctx.error(f"the target shape {list(target)} depends on symbolic dims in a way "
                        "qnnjit cannot express; give the input a static shape")  # fmt: skip
    # Symbolic entries type the result; the run-time shape tensor sizes it.
    return ctx.emit("expand", [ctx.input(0), ctx.input(1)], {"shape": target})


@converter("Shape")
def shape(ctx):
    dims = ctx.input(0).type.shape
    if dims is None:
        raise ctx.error("input 0 must have a known rank")
    start, end = ctx.attr("start", 0), ctx.attr("end", len(dims))
    start, end = (min(max(v + len(dims) if v < 0 else v, 0), len(dims)) for v in (start, end))
    part = dims[start:end]
    if all(isinstance(d, int) for d in part):
        return [ctx.constant(np.array(part, dtype=np.int64), "shape")]
    return ctx.emit("shape", [ctx.input(0)], {"start": start, "end": end})


@converter("Size")
def size(ctx):
    dims = ctx.input(0).type.shape
    if dims is not None and all(isinstance(d, int) for d in dims):
        return [ctx.constant(np.array(int(np.prod(dims)), dtype=np.int64), "size")]
    return ctx.emit("size", [ctx.input(0)])


def _cast(ctx, to):
    if ctx.input(0).type.dtype == to:
        # A cast to the input's own type is the identity (the TorchScript
        # exporter puts one after every QuantizeLinear of a torch.ao model);
        # reusing the value keeps its quantization visible to the compiler.
        return [ctx.input(0)]
    attrs = {
        "to": to.name,
        "saturate": bool(ctx.attr("saturate", 1)),
        "round_mode": ctx.attr("round_mode", "up"),
    }
    return ctx.emit("cast", [ctx.input(0)], attrs)


@converter("Cast")
def cast(ctx):
    return _cast(ctx, onnx_dtype(ctx.attr("to"), f"node {ctx.name!r} (Cast) target type"))


@converter("CastLike", since=15)
def cast_like(ctx):
    return _cast(ctx, ctx.input(1).type.dtype)


@converter("Range")
def range_(ctx):
    inputs = [ctx.input(i) for i in range(3)]
    for index, what in enumerate(("start", "limit", "delta")):
        ctx.const(index, what)  # the output length depends on the values
    return ctx.emit("range", inputs)


@converter("ConstantOfShape")
def constant_of_shape(ctx):
    tensor = ctx.attr("value")
    value = np.zeros(1, np.float32) if tensor is None else numpy_helper.to_array(tensor)
    attrs = {"shape": ints(ctx.const(0, "shape")), "value": value.reshape(-1)[:1].reshape(())}
    (array,) = ops.evaluate("constant_of_shape", [], attrs)
    return [ctx.constant(array, "filled")]


def _sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), dense.shape)
    dense.reshape(-1)[indices] = values
    return dense


_CONSTANT_KINDS = {
    "value": numpy_helper.to_array,
    "sparse_value": _sparse_to_dense,
    "value_float": lambda v: np.array(v, dtype=np.float32),
    "value_floats": lambda v: np.array(v, dtype=np.float32),
    "value_int": lambda v: np.array(v, dtype=np.int64),
    "value_ints": lambda v: np.array(v, dtype=np.int64),
}


@converter("Constant")
def constant(ctx):
    given = [name for name in ctx.attrs if name.startswith(("value", "sparse_value"))]
    if len(given) != 1:
        raise ctx.error(f"Constant needs exactly one value attribute, got {given}")
    kind = given[0]
    if kind not in _CONSTANT_KINDS:
        raise ctx.error(f"Constant {kind} is not supported (qnnjit has no string tensors)")
    array = _CONSTANT_KINDS[kind](ctx.attrs[kind])
    try:
        dtypes.from_numpy(array.dtype)
    except TypeError:
        raise ctx.error(f"Constant of element type {array.dtype} is not supported") from None
    return [ctx.constant(array, "value")]
