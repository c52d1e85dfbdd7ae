"""Converters for ONNX elementwise ops: arithmetic, unary math, comparisons,
variadic Min/Max and Where. All map one to one onto IR ops of the same
meaning (see qnnjit/ir/ops/elementwise.py)."""

from __future__ import annotations

from . import converter


def _binary(onnx_op: str, ir_op: str):
    @converter(onnx_op)
    def convert(ctx):
        return ctx.emit(ir_op, [ctx.input(0), ctx.input(1)])

    return convert


for _onnx_op, _ir_op in (("Add", "add"), ("Sub", "sub"), ("Mul", "mul"), ("Div", "div")):
    _binary(_onnx_op, _ir_op)

for _onnx_op, _ir_op in (
    ("Pow", "pow"),
    ("Equal", "equal"),
    ("Less", "less"),
    ("LessOrEqual", "less_or_equal"),
    ("Greater", "greater"),
    ("GreaterOrEqual", "greater_or_equal"),
    ("And", "and"),
    ("Or", "or"),
    ("Xor", "xor"),
):
    _binary(_onnx_op, _ir_op)


def _unary(onnx_op: str, ir_op: str):
    @converter(onnx_op)
    def convert(ctx):
        return ctx.emit(ir_op, [ctx.input(0)])

    return convert


for _onnx_op, _ir_op in (
    ("Neg", "neg"),
    ("Abs", "abs"),
    ("Sign", "sign"),
    ("Exp", "exp"),
    ("Log", "log"),
    ("Sqrt", "sqrt"),
    ("Reciprocal", "reciprocal"),
    ("Floor", "floor"),
    ("Ceil", "ceil"),
    ("Round", "round"),
):
    _unary(_onnx_op, _ir_op)


@converter("Not", since=1)  # one schema version: the same at every opset
def not_(ctx):
    return ctx.emit("not", [ctx.input(0)])


def _variadic(onnx_op: str, ir_op: str):
    @converter(onnx_op)
    def convert(ctx):
        return ctx.emit(ir_op, [v for v in ctx.inputs if v is not None])

    return convert


_variadic("Min", "min")
_variadic("Max", "max")
_variadic("Sum", "sum")


@converter("Where")
def where(ctx):
    return ctx.emit("where", [ctx.input(0), ctx.input(1), ctx.input(2)])
