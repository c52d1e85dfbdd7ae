"""Float (and integer) elementwise ops with NumPy broadcasting.

Binary ops compute in the inputs' dtype, as ONNX does: float32 stays float32
(NumPy would otherwise promote scalars), integers wrap in their width.
"""

from __future__ import annotations

import numpy as np

from ..types import TensorType
from . import broadcast_shapes, op


def _binary_infer(ctx):
    a, b = ctx.type(0), ctx.type(1)
    if a.dtype != b.dtype:
        raise ctx.error(f"operand types differ: {a.dtype} and {b.dtype}")
    return [TensorType(a.dtype, broadcast_shapes(ctx, a.shape, b.shape))]


def _binary(name: str, summary: str, function):
    def evaluate(inputs, attrs):
        a, b = inputs
        with np.errstate(all="ignore"):
            result = function(a, b)
        return [np.asarray(result).astype(a.dtype, copy=False)]

    op(name, summary)(type(name, (), {"infer": _binary_infer, "evaluate": evaluate}))


def _integer_div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        # ONNX integer Div truncates toward zero (C semantics), unlike NumPy's floor.
        return np.trunc(a.astype(np.float64) / b.astype(np.float64)).astype(a.dtype)
    return a / b


_binary("add", "a + b (broadcasting)", np.add)
_binary("sub", "a - b (broadcasting)", np.subtract)
_binary("mul", "a * b (broadcasting)", np.multiply)
_binary("div", "a / b (broadcasting; integers truncate toward zero)", _integer_div)
