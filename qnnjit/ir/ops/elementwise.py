"""Float (and integer) elementwise ops with NumPy broadcasting.

Binary ops compute in the inputs' dtype, as ONNX does: float32 stays float32
(NumPy would otherwise promote scalars), integers wrap in their width.
Unary math (neg, abs, exp, sqrt, round, ...) keeps its input's type; `unary`
is the shared constructor (activation.py uses it too). Comparisons give bool;
min/max are variadic; where selects with three-way broadcasting.
"""

from __future__ import annotations

import numpy as np

from .. import dtypes
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


# ---- unary math ---------------------------------------------------------------


def unary(name: str, summary: str, function, *, floats_only=False, uses_attrs=False):
    """Register a one-input op whose output has the input's type and shape.

    `function(x)` computes it, or `function(x, attrs)` with `uses_attrs`.
    """

    def infer(ctx):
        t = ctx.type(0)
        if floats_only and not t.dtype.is_float:
            raise ctx.error(f"{name} needs a float input, got {t.dtype}")
        return [TensorType(t.dtype, t.shape)]

    def evaluate(inputs, attrs):
        x = inputs[0]
        with np.errstate(all="ignore"):
            result = function(x, attrs) if uses_attrs else function(x)
        return [np.asarray(result).astype(x.dtype, copy=False)]

    op(name, summary)(type(name, (), {"infer": infer, "evaluate": evaluate}))


unary("neg", "-x", np.negative)
unary("abs", "|x|", np.abs)
unary("sign", "-1, 0 or 1", np.sign)
unary("exp", "e^x", np.exp, floats_only=True)
unary("log", "natural logarithm", np.log, floats_only=True)
unary("sqrt", "square root", np.sqrt, floats_only=True)
unary("reciprocal", "1 / x", np.reciprocal, floats_only=True)
unary("floor", "round toward -inf", np.floor, floats_only=True)
unary("ceil", "round toward +inf", np.ceil, floats_only=True)
unary("round", "round half to even", np.rint, floats_only=True)


# ---- binary ops with their own typing ----------------------------------------


@op("pow", summary="x ** y; y may have another type, the result has x's type")
class Pow:
    def infer(ctx):
        x, y = ctx.type(0), ctx.type(1)
        return [TensorType(x.dtype, broadcast_shapes(ctx, x.shape, y.shape))]

    def evaluate(inputs, attrs):
        x, y = inputs
        with np.errstate(all="ignore"):
            if np.issubdtype(x.dtype, np.integer):
                # Integer powers in float64 (exact for results below 2^53), so a
                # negative integer exponent does not raise as NumPy's does.
                result = np.power(x.astype(np.float64), y.astype(np.float64))
            else:
                result = np.power(x, y.astype(x.dtype))
        return [np.asarray(result).astype(x.dtype)]


def _variadic_infer(ctx):
    first = ctx.type(0)
    for index in range(1, len(ctx.types)):
        if ctx.type(index).dtype != first.dtype:
            raise ctx.error(f"input {index} is {ctx.type(index).dtype}, input 0 is {first.dtype}")
    shape = broadcast_shapes(ctx, *(ctx.type(i).shape for i in range(len(ctx.types))))
    return [TensorType(first.dtype, shape)]


def _variadic(name: str, summary: str, function):
    def evaluate(inputs, attrs):
        result = inputs[0]
        for other in inputs[1:]:
            result = function(result, other)
        return [np.asarray(result).astype(inputs[0].dtype, copy=False)]

    op(name, summary)(type(name, (), {"infer": _variadic_infer, "evaluate": evaluate}))


_variadic("min", "elementwise minimum of n inputs (broadcasting; NaN propagates)", np.minimum)
_variadic("max", "elementwise maximum of n inputs (broadcasting; NaN propagates)", np.maximum)
_variadic("sum", "elementwise sum of n inputs (broadcasting), added left to right", np.add)


def _compare_infer(ctx):
    a, b = ctx.type(0), ctx.type(1)
    if a.dtype != b.dtype:
        raise ctx.error(f"operand types differ: {a.dtype} and {b.dtype}")
    return [TensorType(dtypes.bool_, broadcast_shapes(ctx, a.shape, b.shape))]


def _compare(name: str, summary: str, function):
    def evaluate(inputs, attrs):
        return [np.asarray(function(inputs[0], inputs[1]), dtype=np.bool_)]

    op(name, summary)(type(name, (), {"infer": _compare_infer, "evaluate": evaluate}))


_compare("equal", "a == b (bool)", np.equal)
_compare("less", "a < b (bool)", np.less)
_compare("less_or_equal", "a <= b (bool)", np.less_equal)
_compare("greater", "a > b (bool)", np.greater)
_compare("greater_or_equal", "a >= b (bool)", np.greater_equal)


def _logical(name: str, function):
    def infer(ctx):
        if ctx.type(0).dtype != dtypes.bool_ or ctx.type(1).dtype != dtypes.bool_:
            raise ctx.error(f"{name} needs bool operands")
        return _compare_infer(ctx)

    def evaluate(inputs, attrs):
        return [function(inputs[0], inputs[1])]

    op(name, f"logical {name} of bool tensors (broadcasting)")(
        type(name, (), {"infer": infer, "evaluate": evaluate})
    )


_logical("and", np.logical_and)
_logical("or", np.logical_or)
_logical("xor", np.logical_xor)


@op("not", summary="logical not of a bool tensor")
class Not:
    def infer(ctx):
        t = ctx.type(0)
        if t.dtype != dtypes.bool_:
            raise ctx.error(f"not needs a bool input, got {t.dtype}")
        return [TensorType(t.dtype, t.shape)]

    def evaluate(inputs, attrs):
        return [np.logical_not(inputs[0])]


@op("where", summary="cond ? x : y with three-way broadcasting")
class Where:
    def infer(ctx):
        cond, x, y = ctx.type(0), ctx.type(1), ctx.type(2)
        if cond.dtype != dtypes.bool_:
            raise ctx.error(f"condition must be bool, got {cond.dtype}")
        if x.dtype != y.dtype:
            raise ctx.error(f"branch types differ: {x.dtype} and {y.dtype}")
        return [TensorType(x.dtype, broadcast_shapes(ctx, cond.shape, x.shape, y.shape))]

    def evaluate(inputs, attrs):
        cond, x, y = inputs
        return [np.where(cond, x, y).astype(x.dtype, copy=False)]
