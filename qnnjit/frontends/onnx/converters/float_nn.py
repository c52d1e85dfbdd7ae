"""Converters for ONNX float NN ops: Conv, Gemm, MatMul, pooling and the
normalizations (opsets 13 and later).

ONNX defaults are resolved here and auto_pad becomes explicit pads, so the
IR ops see one normalized form. SAME padding with stride 1 does not depend on
the input size (total pad = dilated kernel - 1) and works for symbolic spatial
dims; any other SAME padding needs static spatial dims.
"""

from __future__ import annotations

from . import converter
from ._common import axis, check_outputs, rank


def _same_pads(ctx, sizes, kernel, strides, dilations, upper: bool) -> tuple[int, ...]:
    n = len(kernel)
    begin, end = [0] * n, [0] * n
    for i in range(n):
        span = dilations[i] * (kernel[i] - 1) + 1
        if strides[i] == 1:
            total = span - 1
        elif isinstance(sizes[i], int):
            out = -(-sizes[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + span - sizes[i])
        else:
            raise ctx.error(
                f"auto_pad SAME with stride {strides[i]} needs a static spatial size, "
                f"got {sizes[i]!r}"
            )
        small, large = total // 2, total - total // 2
        begin[i], end[i] = (small, large) if upper else (large, small)
    return tuple(begin + end)


def _window_attrs(ctx, kernel) -> dict:
    """strides, dilations and explicit pads of a Conv/pool node."""
    n = len(kernel)
    strides = tuple(ctx.attr("strides", [1] * n))
    dilations = tuple(ctx.attr("dilations", [1] * n))
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = tuple(ctx.attr("pads", [0] * 2 * n))
    elif auto_pad == "VALID":
        pads = (0,) * 2 * n
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        sizes = ctx.input(0).type.shape[2:]
        pads = _same_pads(ctx, sizes, kernel, strides, dilations, auto_pad == "SAME_UPPER")
    else:
        raise ctx.error(f"unknown auto_pad {auto_pad!r}")
    for name, values, length in (
        ("strides", strides, n),
        ("dilations", dilations, n),
        ("pads", pads, 2 * n),
    ):
        if len(values) != length:
            raise ctx.error(f"{name} has {len(values)} entries, expected {length}")
    if any(s < 1 for s in strides) or any(d < 1 for d in dilations) or any(p < 0 for p in pads):
        raise ctx.error("strides and dilations must be positive, pads non-negative")
    return {"strides": strides, "pads": pads, "dilations": dilations}


def _present_inputs(ctx, count: int) -> list:
    """The first `count` inputs with trailing omitted ones dropped."""
    inputs = [ctx.input(i) for i in range(count)]
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


@converter("Conv")
def conv(ctx):
    rank(ctx, 0)
    weight_rank = rank(ctx, 1)
    kernel = ctx.attr("kernel_shape") or ctx.input(1).type.shape[2:]
    if len(kernel) != weight_rank - 2 or not all(isinstance(k, int) for k in kernel):
        raise ctx.error(f"kernel shape {list(kernel)} does not match the weight")
    attrs = _window_attrs(ctx, kernel)
    attrs["group"] = ctx.attr("group", 1)
    return ctx.emit("conv", _present_inputs(ctx, 3), attrs)


@converter("MatMul")
def matmul(ctx):
    return ctx.emit("matmul", [ctx.input(0), ctx.input(1)])


@converter("Gemm")
def gemm(ctx):
    attrs = {
        "alpha": float(ctx.attr("alpha", 1.0)),
        "beta": float(ctx.attr("beta", 1.0)),
        "trans_a": int(ctx.attr("transA", 0)),
        "trans_b": int(ctx.attr("transB", 0)),
    }
    return ctx.emit("gemm", _present_inputs(ctx, 3), attrs)


def _pool(ctx, ir_op: str, extra: dict):
    x_rank = rank(ctx, 0)
    kernel = tuple(ctx.attr("kernel_shape", ()))
    if len(kernel) != x_rank - 2:
        raise ctx.error(f"kernel_shape {list(kernel)} does not fit an input of rank {x_rank}")
    attrs = _window_attrs(ctx, kernel)
    attrs.update(kernel_shape=kernel, ceil_mode=int(ctx.attr("ceil_mode", 0)), **extra)
    return ctx.emit(ir_op, [ctx.input(0)], attrs)


@converter("MaxPool")
def max_pool(ctx):
    check_outputs(ctx, 1, "MaxPool's Indices output is not supported by qnnjit")
    return _pool(ctx, "max_pool", {})


@converter("AveragePool")
def average_pool(ctx):
    return _pool(ctx, "average_pool", {"count_include_pad": int(ctx.attr("count_include_pad", 0))})


@converter("GlobalAveragePool")
def global_average_pool(ctx):
    return ctx.emit("global_average_pool", [ctx.input(0)])


@converter("GlobalMaxPool")
def global_max_pool(ctx):
    return ctx.emit("global_max_pool", [ctx.input(0)])


@converter("LayerNormalization", since=17)
def layer_normalization(ctx):
    stash_type = ctx.attr("stash_type", 1)
    if stash_type != 1:
        raise ctx.error(f"stash_type {stash_type} is not supported (only 1, float32)")
    attrs = {
        "axis": axis(ctx, ctx.attr("axis", -1), rank(ctx, 0)),
        "epsilon": float(ctx.attr("epsilon", 1e-5)),
        "stash_dtype": "float32",
        # ONNX Runtime's kernel (the ONNX preset's numerics), see ir/ops/nn.py.
        "algorithm": "ort_mlas",
    }
    return ctx.emit("layer_norm", _present_inputs(ctx, 3), attrs)


@converter("BatchNormalization")
def batch_normalization(ctx):
    if ctx.attr("training_mode", 0):
        raise ctx.error("training_mode=1 is not supported (qnnjit compiles inference graphs)")
    check_outputs(ctx, 1, "running statistics exist only in training mode")
    inputs = [ctx.input(i) for i in range(5)]
    return ctx.emit("batch_norm", inputs, {"epsilon": float(ctx.attr("epsilon", 1e-5))})
