"""Converters for ONNX elementwise arithmetic."""

from __future__ import annotations

from . import converter


def _binary(onnx_op: str, ir_op: str):
    @converter(onnx_op)
    def convert(ctx):
        return ctx.emit(ir_op, [ctx.input(0), ctx.input(1)])

    return convert


for _onnx_op, _ir_op in (("Add", "add"), ("Sub", "sub"), ("Mul", "mul"), ("Div", "div")):
    _binary(_onnx_op, _ir_op)
