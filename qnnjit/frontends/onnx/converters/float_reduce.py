"""Converters for ONNX ReduceMean/Sum/Max/Min (opsets 13 and later).

Axes come from the `axes` attribute (ReduceMean/Max/Min before opset 18) or
the optional `axes` input (ReduceSum from 13, the others from 18). No axes
means all axes, unless noop_with_empty_axes is set: then the node is an
identity and its output is its input.
"""

from __future__ import annotations

from . import converter
from ._common import axes_input_or_attr, present, rank


def _reduce(onnx_op: str, ir_op: str):
    @converter(onnx_op)
    def convert(ctx):
        size = rank(ctx, 0)
        along = axes_input_or_attr(ctx, 1, size) if present(ctx, 1) or ctx.attr("axes") else None
        if not along:
            if ctx.attr("noop_with_empty_axes", 0):
                return [ctx.input(0)]
            along = tuple(range(size))
        attrs = {"axes": tuple(sorted(along)), "keepdims": int(ctx.attr("keepdims", 1))}
        if ir_op in ("reduce_sum", "reduce_mean"):
            attrs["algorithm"] = "ort"  # ONNX Runtime's summation order (ir/ops/reduce.py)
        return ctx.emit(ir_op, [ctx.input(0)], attrs)

    return convert


for _onnx_op, _ir_op in (
    ("ReduceMean", "reduce_mean"),
    ("ReduceSum", "reduce_sum"),
    ("ReduceMax", "reduce_max"),
    ("ReduceMin", "reduce_min"),
):
    _reduce(_onnx_op, _ir_op)
