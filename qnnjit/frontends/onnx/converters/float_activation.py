"""Converters for ONNX activations and softmax (opsets 13 and later).

ONNX defaults become explicit IR attributes (LeakyRelu alpha 0.01,
HardSigmoid alpha 0.2 / beta 0.5, Gelu approximate "none", Softmax axis -1
made positive). Clip's min/max inputs must be constants; they become
attributes (None when omitted).
"""

from __future__ import annotations

from . import converter
from ._common import axis, present, rank, scalar


def _simple(onnx_op: str, ir_op: str, since: int | None = None):
    @converter(onnx_op, since=since)
    def convert(ctx):
        return ctx.emit(ir_op, [ctx.input(0)])

    return convert


for _onnx_op, _ir_op, _since in (
    ("Relu", "relu", None),
    ("Sigmoid", "sigmoid", None),
    ("Tanh", "tanh", None),
    ("HardSwish", "hard_swish", 14),
):
    _simple(_onnx_op, _ir_op, _since)


# ONNX Runtime's MLAS erf (the ONNX preset's numerics), see ir/ops/activation.py.
ORT_MLAS = {"algorithm": "ort_mlas"}


@converter("Erf")
def erf(ctx):
    return ctx.emit("erf", [ctx.input(0)], ORT_MLAS)


@converter("LeakyRelu")
def leaky_relu(ctx):
    return ctx.emit("leaky_relu", [ctx.input(0)], {"alpha": float(ctx.attr("alpha", 0.01))})


@converter("PRelu")
def prelu(ctx):
    return ctx.emit("prelu", [ctx.input(0), ctx.input(1)])


@converter("HardSigmoid")
def hard_sigmoid(ctx):
    attrs = {"alpha": float(ctx.attr("alpha", 0.2)), "beta": float(ctx.attr("beta", 0.5))}
    return ctx.emit("hard_sigmoid", [ctx.input(0)], attrs)


@converter("Gelu", since=20)
def gelu(ctx):
    approximate = ctx.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ctx.error(f"unknown approximate={approximate!r}")
    return ctx.emit("gelu", [ctx.input(0)], {"approximate": approximate, **ORT_MLAS})


@converter("Clip")
def clip(ctx):
    bounds = {}
    for index, name in ((1, "min"), (2, "max")):
        bounds[name] = scalar(ctx.const(index, name)) if present(ctx, index) else None
    return ctx.emit("clip", [ctx.input(0)], bounds)


def _softmax(onnx_op: str, ir_op: str):
    @converter(onnx_op)
    def convert(ctx):
        attrs = {"axis": axis(ctx, ctx.attr("axis", -1), rank(ctx, 0))}
        return ctx.emit(ir_op, [ctx.input(0)], attrs)

    return convert


_softmax("Softmax", "softmax")
_softmax("LogSoftmax", "log_softmax")
