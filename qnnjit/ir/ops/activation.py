"""Activation functions and softmax.

Each keeps its input's type; float formulas evaluate in the input's float
type (float32 stays float32). Relu, LeakyRelu, Clip and PRelu also accept
integers, as ONNX allows. Attributes are resolved by the frontend
(`alpha`, `beta`, clip bounds as plain numbers or None, `axis` positive).

erf uses scipy.special.erf when SciPy is installed (vectorized), else
math.erf element by element; both are evaluated in float64 and rounded once to
the input's type.
"""

from __future__ import annotations

import math

import numpy as np

from ..types import TensorType
from . import broadcast_shapes, op
from .elementwise import unary

try:  # optional: only speeds up erf
    from scipy.special import erf as _scipy_erf
except ImportError:  # pragma: no cover - depends on the environment
    _scipy_erf = None


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, computed in float64, returned in x's type."""
    wide = np.asarray(x, dtype=np.float64)
    result = (
        _scipy_erf(wide)
        if _scipy_erf is not None
        else np.vectorize(math.erf, otypes=[np.float64])(wide)
    )
    return result.astype(x.dtype)


def _scalar(x: np.ndarray, value: float):
    return np.asarray(value).astype(x.dtype)


def _relu(x):
    return np.maximum(x, _scalar(x, 0))


def _leaky_relu(x, attrs):
    return np.where(x >= 0, x, x * _scalar(x, attrs["alpha"]))


def _sigmoid(x):
    # exp(-|x|) never overflows; the two branches are the same function.
    e = np.exp(-np.abs(x))
    one = _scalar(x, 1)
    return np.where(x >= 0, one / (one + e), e / (one + e))


def _hard_sigmoid(x, attrs):
    y = x * _scalar(x, attrs["alpha"]) + _scalar(x, attrs["beta"])
    return np.clip(y, _scalar(x, 0), _scalar(x, 1))


def _hard_swish(x):
    return x * np.clip(x * _scalar(x, 1 / 6) + _scalar(x, 0.5), _scalar(x, 0), _scalar(x, 1))


def _gelu(x, attrs):
    half, one = _scalar(x, 0.5), _scalar(x, 1)
    if attrs["approximate"] == "tanh":
        inner = _scalar(x, math.sqrt(2 / math.pi)) * (x + _scalar(x, 0.044715) * x * x * x)
        return half * x * (one + np.tanh(inner))
    return half * x * (one + erf(x / _scalar(x, math.sqrt(2))))


unary("relu", "max(x, 0)", _relu)
unary("leaky_relu", "x if x >= 0 else alpha * x", _leaky_relu, uses_attrs=True)
unary("sigmoid", "1 / (1 + exp(-x))", _sigmoid, floats_only=True)
unary(
    "hard_sigmoid", "clip(alpha * x + beta, 0, 1)", _hard_sigmoid, floats_only=True, uses_attrs=True
)
unary("hard_swish", "x * clip(x / 6 + 1/2, 0, 1)", _hard_swish, floats_only=True)
unary("tanh", "hyperbolic tangent", np.tanh, floats_only=True)
unary("erf", "error function", erf, floats_only=True)
unary("gelu", "x * Phi(x); approximate = none | tanh", _gelu, floats_only=True, uses_attrs=True)


@op("clip", summary="min(max(x, min), max); a bound of None is absent")
class Clip:
    def infer(ctx):
        t = ctx.type(0)
        return [TensorType(t.dtype, t.shape)]

    def evaluate(inputs, attrs):
        x = inputs[0]
        if attrs.get("min") is not None:
            x = np.maximum(x, _scalar(x, attrs["min"]))
        if attrs.get("max") is not None:
            x = np.minimum(x, _scalar(x, attrs["max"]))
        return [x]


@op("prelu", summary="x if x >= 0 else slope * x (slope broadcasts to x)")
class PRelu:
    def infer(ctx):
        x, slope = ctx.type(0), ctx.type(1)
        if x.dtype != slope.dtype:
            raise ctx.error(f"slope is {slope.dtype}, x is {x.dtype}")
        if broadcast_shapes(ctx, x.shape, slope.shape) not in (x.shape, None):
            raise ctx.error(f"slope of shape {slope.shape} does not broadcast to {x.shape}")
        return [TensorType(x.dtype, x.shape)]

    def evaluate(inputs, attrs):
        x, slope = inputs
        return [np.where(x >= 0, x, x * slope).astype(x.dtype, copy=False)]


def _softmax_infer(ctx):
    t = ctx.type(0)
    if t.shape is not None and not 0 <= ctx.attrs["axis"] < max(len(t.shape), 1):
        raise ctx.error(f"axis {ctx.attrs['axis']} out of range for rank {len(t.shape)}")
    return [TensorType(t.dtype, t.shape)]


def _shifted(x: np.ndarray, axis: int) -> np.ndarray:
    """x - max(x) along axis (max of an all -inf slice taken as 0)."""
    top = x.max(axis=axis, keepdims=True)
    return x - np.where(np.isfinite(top), top, _scalar(x, 0))


@op("softmax", summary="exp(x - max) / sum(exp(x - max)) along axis")
class Softmax:
    infer = _softmax_infer

    def evaluate(inputs, attrs):
        x = inputs[0]
        with np.errstate(all="ignore"):
            e = np.exp(_shifted(x, attrs["axis"]))
            return [(e / e.sum(axis=attrs["axis"], keepdims=True)).astype(x.dtype, copy=False)]


@op("log_softmax", summary="(x - max) - log(sum(exp(x - max))) along axis")
class LogSoftmax:
    infer = _softmax_infer

    def evaluate(inputs, attrs):
        x = inputs[0]
        with np.errstate(all="ignore"):
            s = _shifted(x, attrs["axis"])
            y = s - np.log(np.exp(s).sum(axis=attrs["axis"], keepdims=True))
            return [y.astype(x.dtype, copy=False)]
