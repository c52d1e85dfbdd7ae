"""Float activations whose reference is too slow to fall back on: erf and the
erf form of gelu with `algorithm="ort_mlas"` (what the ONNX frontend sets):
ONNX Runtime's float32 MLAS kernels, bit for bit the reference's
`ir/ops/activation.py` `mlas_erf`, which emulates each float32 fused
multiply-add in NumPy (about 400 ns an element: 60 ms for one ViT-Tiny MLP
activation left in float, as dynamic quantization leaves it). Here each is
one `llvm.fma.f32` (`_numba.fma_f32`), every other step the same float32
operation in the same order (no fast-math: LLVM contracts nothing).

Other algorithms ("exact": float64 erf rounded once) and float types keep
the reference's NumPy semantics. The loops vectorize (0.18 ms for that
activation); a NaN result's sign bit may then differ from NumPy's, as
which NaN operand x86 propagates follows the operand order."""

from __future__ import annotations

import math

import numpy as np

from ....ir import dtypes
from ....ir.graph import Node
from ....ir.ops.activation import MLAS_ERF_CONSTANTS
from ._buffers import empty
from ._lowering import Decline, Kernel, LowerContext
from ._numba import U, fma_f32, jit
from ._threads import run_tasks

# run_tasks work per element (2^18 units ~ 15 us on one thread): about 4 ns
# an element, two polynomials and an exponential each.
_WORK_PER_ELEMENT = 64

_C = {name: np.float32(value) for name, value in MLAS_ERF_CONSTANTS.items()}
_UPPER, _SPLIT, _EXP_LOWER = _C["upper"], _C["split"], _C["exp_lower"]
_S = tuple(_C[k] for k in ("s0", "s1", "s2", "s3", "s4", "s5"))
_B = tuple(_C[k] for k in ("b0", "b1", "b2", "b3", "b4", "b5", "b6"))
_E = tuple(_C[k] for k in ("e0", "e1", "e2", "e3", "e4", "e5", "e6"))
_LOG2_RECIPROCAL, _LOG2_HI, _LOG2_LO, _ROUND = (
    _C["log2_reciprocal"], _C["log2_hi"], _C["log2_lo"], _C["round"],
)  # fmt: skip
_INV_SQRT2 = np.float32(1 / math.sqrt(2))
# 2^r, r = -128..0, exact in float32 (2^-127, 2^-128: subnormal)
_POW2 = np.ldexp(np.float32(1), np.arange(-128, 1)).astype(np.float32)


@jit(inline=True)
def _horner(coefficients, v):
    """c0, then fma(., v, c) for each next c: MLAS's polynomial steps."""
    p = coefficients[0]
    for c in coefficients[1:]:
        p = fma_f32(p, v, c)
    return p


@jit(inline=True)
def mlas_erf1(x):
    """`mlas_erf` of one float32 (see its docstring for the algorithm)."""
    a = np.minimum(np.abs(x), _UPPER)  # NaN stays NaN
    square = a * a
    small = _horner(_S, square)
    small = fma_f32(small, a, a)
    big = _horner(_B, a)
    e = np.maximum(-fma_f32(big, a, a), _EXP_LOWER)
    r = fma_f32(_LOG2_RECIPROCAL, e, _ROUND) - _ROUND
    f = fma_f32(r, _LOG2_LO, fma_f32(r, _LOG2_HI, e))
    p = _horner(_E, f)
    # 2^r for the integer r in [-128, 0] (NaN: 2^0): a table, so that the
    # loop has no call in it and vectorizes
    power = _POW2[U(np.int64(0.0 if r != r else r) + 128)]
    y = small if a < _SPLIT else np.float32(1) - p * power
    return -y if np.signbit(x) else y


@jit()
def erf_flat(t0, t1, x, out):
    for i in range(t0, t1):
        out[U(i)] = mlas_erf1(x[U(i)])


@jit()
def gelu_flat(t0, t1, x, out):
    """ONNX Runtime's Gelu: (0.5 * x) * (erf(x * f32(1/sqrt 2)) + 1), float32."""
    for i in range(t0, t1):
        v = x[U(i)]
        out[U(i)] = (np.float32(0.5) * v) * (mlas_erf1(v * _INV_SQRT2) + np.float32(1))


def lower_erf(node: Node, ctx: LowerContext) -> Kernel:
    return _lower(node, ctx, erf_flat, "erf")


def lower_gelu(node: Node, ctx: LowerContext) -> Kernel:
    if node.attrs.get("approximate", "none") != "none":
        raise Decline("tanh approximation (NumPy is fast there)")
    return _lower(node, ctx, gelu_flat, "gelu")


def _lower(node: Node, ctx: LowerContext, kernel, what: str) -> Kernel:
    x = node.inputs[0]
    if node.attrs.get("algorithm", "exact") != "ort_mlas":
        raise Decline(f"algorithm {node.attrs.get('algorithm', 'exact')!r}")
    if x.type.dtype != dtypes.float32:
        raise Decline(f"{x.type.dtype} input")

    def run(x_array):
        out = empty(x_array.shape, np.float32)
        flat = out.reshape(-1)
        if flat.size:
            run_tasks(kernel, flat.size, _WORK_PER_ELEMENT * flat.size, ctx.num_threads,
                      x_array.reshape(-1), flat)  # fmt: skip
        return [out]

    return Kernel(f"{what}_flat[mlas float32]", run, [x], node.outputs, [node])
