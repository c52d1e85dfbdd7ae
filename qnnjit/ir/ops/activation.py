"""Activation functions and softmax.

Each keeps its input's type; float formulas evaluate in the input's float
type (float32 stays float32). Relu, LeakyRelu, Clip and PRelu also accept
integers, as ONNX allows. Attributes are resolved by the frontend
(`alpha`, `beta`, clip bounds as plain numbers or None, `axis` positive).

erf uses scipy.special.erf when SciPy is installed (vectorized; imported on
the first exact erf, as it takes ~0.25 s and nothing else needs it), else
math.erf element by element; both are evaluated in float64 and rounded once to
the input's type. With `algorithm="ort_mlas"` (what the ONNX frontend sets)
erf and the erf form of gelu are ONNX Runtime's float32 kernels instead, bit
for bit (`mlas_erf`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..types import TensorType
from . import broadcast_shapes, op
from .elementwise import unary


@functools.cache
def _scipy_erf():
    """scipy.special.erf, or None without SciPy (optional: it only speeds up erf)."""
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return erf


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, computed in float64, returned in x's type."""
    wide = np.asarray(x, dtype=np.float64)
    vectorized = _scipy_erf()
    result = (
        vectorized(wide)
        if vectorized is not None
        else np.vectorize(math.erf, otypes=[np.float64])(wide)
    )
    return result.astype(x.dtype)


# MLAS `MlasErfConstants` (onnxruntime/core/mlas/lib/erf.cpp), float32.
MLAS_ERF_CONSTANTS = {
    name: np.float32(value)
    for name, value in {
        "upper": 3.925, "split": 0.921875,
        "s0": -5.99104969e-4, "s1": 4.99339588e-3, "s2": -2.67667342e-2, "s3": 1.12818025e-1,
        "s4": -3.76124859e-1, "s5": 1.28379151e-1,
        "b0": 1.72948930e-5, "b1": -3.83208680e-4, "b2": 3.88393435e-3, "b3": -2.42545605e-2,
        "b4": 1.06777847e-1, "b5": 6.34846687e-1, "b6": 1.28717512e-1,
        "exp_lower": -88.3762626647949, "log2_reciprocal": 1.44269504088896341,
        "log2_hi": -6.93145752e-1, "log2_lo": -1.42860677e-6,
        "e0": 1.38319808e-3, "e1": 8.37550033e-3, "e2": 4.16689515e-2, "e3": 1.66664466e-1,
        "e4": 4.99999851e-1, "e5": 1.0, "e6": 1.0, "round": 1.25829120e7,
    }.items()
}  # fmt: skip


def mlas_erf(x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's float32 Erf on x86-64 (MLAS `MlasErfKernelFma3`), bit
    for bit. With every step a float32 FMA and a = min(|x|, 3.925)

    (MLAS's constant table says 3.725; the kernel ORT 1.31 runs clamps at a
    bound >= 3.925, where erf is 1.0 in float32 -- measured), and

    - a < 0.921875: a + a * P(a^2), P of degree 5 (Horner in a^2);
    - otherwise 1 - exp(-(a + a * Q(a))), Q of degree 6 (Horner in a), exp
      by Cody-Waite reduction (r = round(e / ln 2) via the 1.5 * 2^23 trick,
      f = e - r ln 2 in two FMAs) and a degree-6 polynomial scaled by 2^r;

    then x's sign is copied onto the result."""
    from ... import numerics

    fma, f32 = numerics.fma_f32, np.float32
    c = MLAS_ERF_CONSTANTS
    x = np.asarray(x, dtype=f32)
    a = np.minimum(np.abs(x), c["upper"])  # NaN stays NaN, as in ORT
    square = (a * a).astype(f32)
    small = c["s0"]
    for k in ("s1", "s2", "s3", "s4", "s5"):
        small = fma(small, square, c[k])
    small = fma(small, a, a)
    big = c["b0"]
    for k in ("b1", "b2", "b3", "b4", "b5", "b6"):
        big = fma(big, a, c[k])
    e = np.maximum(-fma(big, a, a), c["exp_lower"])
    r = (fma(c["log2_reciprocal"], e, c["round"]) - c["round"]).astype(f32)
    f = fma(r, c["log2_lo"], fma(r, c["log2_hi"], e))
    p = c["e0"]
    for k in ("e1", "e2", "e3", "e4", "e5", "e6"):
        p = fma(p, f, c[k])
    with np.errstate(over="ignore", invalid="ignore"):
        power = np.ldexp(f32(1), np.nan_to_num(r).astype(np.int32)).astype(f32)
    big = (f32(1) - (p * power).astype(f32)).astype(f32)
    y = np.where(a < c["split"], small, big).astype(f32)
    return np.where(np.signbit(x), -y, y).astype(f32)


def _erf(x: np.ndarray, attrs) -> np.ndarray:
    if attrs.get("algorithm", "exact") == "ort_mlas" and x.dtype == np.float32:
        return mlas_erf(x)
    return erf(x)


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
    if (
        attrs.get("algorithm", "exact") == "ort_mlas"
        and attrs["approximate"] == "none"
        and x.dtype == np.float32
    ):
        # ONNX Runtime's Gelu kernel: 0.5 * x * (erf(x * f32(1/sqrt 2)) + 1), MLAS erf.
        e = mlas_erf(x * np.float32(1 / math.sqrt(2)))
        return (half * x).astype(x.dtype) * (e + one).astype(x.dtype)
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
unary(
    "erf",
    "error function; algorithm = exact (float64, rounded once) | ort_mlas (mlas_erf)",
    _erf,
    floats_only=True,
    uses_attrs=True,
)
unary(
    "gelu",
    "x * Phi(x); approximate = none | tanh; algorithm = exact | ort_mlas (erf form only)",
    _gelu,
    floats_only=True,
    uses_attrs=True,
)


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
