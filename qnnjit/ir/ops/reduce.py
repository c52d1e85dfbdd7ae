"""Reductions over a set of axes: mean, sum, max, min.

`axes` is a sorted tuple of positive axes, never empty (the frontend turns
ONNX's "no axes" into all axes, or into an identity under
noop_with_empty_axes). `keepdims` keeps reduced axes as size 1.

Values reduce in the input's type (mean: sum in the input's type divided by
the count; integers divide with truncation as C does). Reducing an empty set
gives the identity of the reduction: 0 for sum, NaN for mean, the lowest
(highest) value of the type for max (min), as ONNX specifies.
"""

from __future__ import annotations

import numpy as np

from ..types import TensorType
from . import op


def _reduce_infer(ctx):
    t = ctx.type(0)
    if t.shape is None:
        raise ctx.error("reduction needs an input of known rank")
    axes = ctx.attrs["axes"]
    if any(not 0 <= a < len(t.shape) for a in axes):
        raise ctx.error(f"axes {axes} out of range for rank {len(t.shape)}")
    if ctx.attrs["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
    else:
        shape = tuple(d for i, d in enumerate(t.shape) if i not in axes)
    return [TensorType(t.dtype, shape)]


def _extreme(dtype: np.dtype, low: bool):
    """The lowest (or highest) value of a dtype: the identity of max (min)."""
    if dtype == np.bool_:
        return not low
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return info.min if low else info.max
    return -np.inf if low else np.inf


def _reducer(name: str, summary: str, function):
    def evaluate(inputs, attrs):
        x = inputs[0]
        result = function(x, tuple(attrs["axes"]), bool(attrs["keepdims"]))
        return [np.asarray(result).astype(x.dtype, copy=False)]

    op(name, summary)(type(name, (), {"infer": _reduce_infer, "evaluate": evaluate}))


def _mean(x, axes, keepdims):
    count = int(np.prod([x.shape[a] for a in axes]))
    total = np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)
    if np.issubdtype(x.dtype, np.integer):
        return np.trunc(total / count) if count else np.zeros_like(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / x.dtype.type(count)


def _max(x, axes, keepdims):
    return np.max(x, axis=axes, keepdims=keepdims, initial=_extreme(x.dtype, low=True))


def _min(x, axes, keepdims):
    return np.min(x, axis=axes, keepdims=keepdims, initial=_extreme(x.dtype, low=False))


def _sum(x, axes, keepdims):
    return np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)


_reducer("reduce_mean", "mean over axes", _mean)
_reducer("reduce_sum", "sum over axes", _sum)
_reducer("reduce_max", "maximum over axes (lowest value of the type if empty)", _max)
_reducer("reduce_min", "minimum over axes (highest value of the type if empty)", _min)
