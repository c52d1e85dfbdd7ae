"""The CPU backend's kernels, one module per op family, each op's lowering
registered as `ops.get(op).lowerings["cpu"]`:

    activations  erf, gelu (float32, ONNX Runtime's MLAS algorithm)
    conv         qconv (im2col + GEMM engine, depthwise direct, generic direct)
    matmul       qmatmul (packed constant weights through the GEMM engine; batched)
    reduce       qreduce_sum
    requant      requantize, and the epilogue every accumulating kernel fuses
    elementwise  qadd, qmul, lookup, clip (integers)
    normalize    layer_norm (float32/float64, the reference's two algorithms)
    pool         max_pool (integers), qaverage_pool (NCHW, or channels-last in place)
    quantize     quantize, dequantize
    softmax      qsoftmax (ONNX Runtime's QLinearSoftmax: exp table, float32 row sums)
    views        flatten, reshape, squeeze, unsqueeze, identity (NumPy reshapes),
                 gather of one index (a view); transpose, channel concat (copy
                 kernels; other concats NumPy's): data movement, no arithmetic
    fused        `fused` nodes (their body, compiled by a nested executor)

`_numba` picks the on-disk cache directory before any kernel is decorated,
`_lowering` holds what lowerings share (Kernel, Decline, epilogue chains),
`_gemm` adapts the GEMM engine (`backends/cpu/gemm.py`) for calls from inside
the kernels.
"""

from __future__ import annotations

from ....ir import ops
from ._lowering import Decline, Kernel, LowerContext
from ._numba import numba_cache_dir

with numba_cache_dir():
    from . import (
        activations,
        conv,
        elementwise,
        fused,
        matmul,
        normalize,
        pool,
        quantize,
        reduce,
        requant,
        softmax,
        views,
    )

LOWERINGS = {
    "qconv": conv.lower_qconv,
    "qmatmul": matmul.lower_qmatmul,
    "qreduce_sum": reduce.lower_qreduce_sum,
    "requantize": requant.lower_requantize,
    "qadd": elementwise.lower_qadd,
    "qmul": elementwise.lower_qmul,
    "lookup": elementwise.lower_lookup,
    "clip": elementwise.lower_clip,
    "max_pool": pool.lower_max_pool,
    "qaverage_pool": pool.lower_qaverage_pool,
    "quantize": quantize.lower_quantize,
    "dequantize": quantize.lower_dequantize,
    "qsoftmax": softmax.lower_qsoftmax,
    "erf": activations.lower_erf,
    "gelu": activations.lower_gelu,
    "fused": fused.lower_fused,
    "layer_norm": normalize.lower_layer_norm,
    "gather": views.lower_gather,
    "transpose": views.lower_transpose,
    **dict.fromkeys(views.SHAPE_OPS, views.lower_view),
    "concat": views.lower_concat,
}


def register() -> None:
    """Install every lowering as `lowerings["cpu"]` of its op (idempotent)."""
    for name, lower in LOWERINGS.items():
        try:
            opdef = ops.get(name)
        except NotImplementedError:  # an op this build of the IR does not define
            continue
        opdef.lowerings["cpu"] = lower


register()

__all__ = ["Decline", "Kernel", "LowerContext", "LOWERINGS", "register"]
