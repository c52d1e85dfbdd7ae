"""Calls from Numba code to the kernels compiled from LLVM IR (``ukernels``,
``dwkernels``, ``im2colkernels``), through their addresses.

Each intrinsic emits one indirect call to a function pointer passed as an
integer, so the Numba functions that call kernels hold no process-specific
address and stay cacheable on disk. Every argument is an integer (addresses as
integers); ``kinds`` spells the callee's C signature after the pointer: 'p' a
pointer, 'i' an int64.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = [
    "call_ukernel", "call_ukernel_requant", "call_depthwise_row", "call_im2col_row",
    "call_im2col_masked_row", "call_pair_row", "call_quad_row",
]  # fmt: skip


def _indirect_call(context, builder, signature, llargs, kinds: str):
    """Emit ``(*llargs[0])(llargs[1:])``: a void function with the arguments ``kinds``."""
    i64 = ir.IntType(64)
    ptr = ir.IntType(8).as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [ptr if k == "p" else i64 for k in kinds])
    vals = [context.cast(builder, v, t, types.int64) for v, t in zip(llargs, signature.args)]
    fn = builder.inttoptr(vals[0], fnty.as_pointer())
    builder.call(fn, [builder.inttoptr(v, ptr) if k == "p" else v for v, k in zip(vals[1:], kinds)])
    return context.get_dummy_value()


def _typed(args, kinds: str):
    """(signature, codegen) of a call with ``args``, or None if they are not all integers."""
    if len(args) != len(kinds) + 1 or not all(isinstance(t, types.Integer) for t in args):
        return None

    def codegen(context, builder, signature, llargs):
        return _indirect_call(context, builder, signature, llargs, kinds)

    return types.void(*args), codegen


@intrinsic
def call_ukernel(typingctx, fptr, a, lda, b, kg, c, ldc, init, nvalid, accumulate, desc):
    """``(*fptr)(a, lda, b, kg, c, ldc, init, nvalid, accumulate, desc)``: a GEMM
    microkernel (ABI in ``ukernels``)."""
    return _typed((fptr, a, lda, b, kg, c, ldc, init, nvalid, accumulate, desc), "pipipipiii")


@intrinsic
def call_ukernel_requant(typingctx, fptr, a, lda, b, kg, c, ldc, init, nvalid, accumulate, desc,
                         ep):  # fmt: skip
    """``(*fptr)(a, lda, b, kg, c, ldc, init, nvalid, accumulate, desc, ep)``: a
    requantizing GEMM microkernel (``ukernels`` REQUANT_DOC)."""
    args = (fptr, a, lda, b, kg, c, ldc, init, nvalid, accumulate, desc, ep)
    return _typed(args, "pipipipiiip")


@intrinsic
def call_depthwise_row(typingctx, fptr, rows, w, cp, ow, out, ep):
    """``(*fptr)(rows, w, cp, ow, out, ep)``: a depthwise row kernel (ABI in ``dwkernels``)."""
    return _typed((fptr, rows, w, cp, ow, out, ep), "ppiipp")


@intrinsic
def call_im2col_row(typingctx, fptr, rows, count, dst, lda):
    """``(*fptr)(rows, count, dst, lda)``: an im2col row kernel (ABI in ``im2colkernels``)."""
    return _typed((fptr, rows, count, dst, lda), "pipi")


@intrinsic
def call_im2col_masked_row(typingctx, fptr, rows, count, dst, lda, b0, row_bytes, pad):
    """``(*fptr)(rows, count, dst, lda, b0, row_bytes, pad)``: a masked im2col
    row kernel (``im2colkernels`` MASKED_DOC)."""
    return _typed((fptr, rows, count, dst, lda, b0, row_bytes, pad), "pipiiii")


@intrinsic
def call_pair_row(typingctx, fptr, src, pairs, c, flip, za, dst):
    """``(*fptr)(src, pairs, c, flip, za, dst)``: a pairs kernel's ring-row
    builder (ABI in ``dwkernels``)."""
    return _typed((fptr, src, pairs, c, flip, za, dst), "piiiip")


@intrinsic
def call_quad_row(typingctx, fptr, src, n, flip, dst):
    """``(*fptr)(src, n, flip, dst)``: a quads kernel's ring-row builder (ABI
    in ``dwkernels``)."""
    return _typed((fptr, src, n, flip, dst), "piip")
