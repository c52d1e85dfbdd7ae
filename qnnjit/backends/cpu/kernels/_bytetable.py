"""Byte tables: `dst[i] = table[src[i]]` over bytes, the one step every 8-bit
`lookup` takes (a standalone lookup, or the table stage of a requantizing
GEMM, `_gemm.gemm_requant_rows`).

A table here is `uint8[256]` indexed by the stored byte (`byte_table` builds
it from an IR lookup table, which is indexed by `code - qmin`). With
AVX512_VBMI, 64 bytes take two `vpermi2b` (each looks up 7 index bits in a
128-byte half of the table held in two registers) and a select on the index's
top bit: about four instructions per 64 bytes, where the scalar loop, the
path elsewhere, takes one load, one dependent load and one store per byte
(ViT's GELU lookups, 197 x 768 bytes: 25 us scalar).

`vbmi_lookups(isa)` says which path a kernel takes; it is a run-time argument
(a test forces the scalar path on a VBMI host). On a host without VBMI the
vector path is not even compiled (LLVM could not select `vpermi2b`): it traps,
and `vbmi_lookups` never asks for it there.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..features import host_cpu

_VBMI_FEATURE = "avx512vbmi"


def vbmi_lookups(isa: str) -> bool:
    """Whether byte tables may use `vpermi2b`: the AVX-512 path, on a host
    with AVX512_VBMI (Ice Lake, Zen 4 and later; not Cascade Lake)."""
    return isa == "avx512_vnni" and _VBMI_FEATURE in host_cpu().features


def byte_table(table: np.ndarray, index_flip: int) -> np.ndarray:
    """The uint8[256] table by stored byte of an IR lookup `table` (indexed by
    `code - qmin`, 256 entries of an 8-bit type): byte b holds the code
    `(b ^ index_flip) + qmin`, so entry b is `table[b ^ index_flip]`, stored
    as its low byte (a signed result's two's complement pattern)."""
    assert table.shape == (256,), table.shape
    order = np.arange(256) ^ index_flip
    return (np.asarray(table).astype(np.int64)[order] & 0xFF).astype(np.uint8)


@intrinsic
def lookup_bytes(typingctx, src, dst, n, table, vbmi):
    """`dst[i] = table[src[i]]` for i < n, src and dst byte addresses (equal:
    in place), `table` a uint8[256] array; `vbmi`: 64 bytes at a time with
    `vpermi2b` (only where `vbmi_lookups` allows)."""
    if not (isinstance(table, types.Array) and table.dtype == types.uint8):
        return None
    sig = types.void(types.int64, types.int64, types.int64, table, types.boolean)

    def codegen(context, builder, signature, args):
        src, dst, n, table_arr, vbmi = args
        tptr = context.make_array(signature.args[3])(context, builder, table_arr).data
        host_vbmi = _VBMI_FEATURE in host_cpu().features
        use_vbmi = builder.and_(vbmi, ir.Constant(ir.IntType(1), host_vbmi))
        with builder.if_else(use_vbmi) as (vector, scalar):
            with vector:
                if host_vbmi:
                    _vector_lookups(builder, src, dst, n, tptr)
                else:  # never asked for (vbmi_lookups): fail loudly, not silently
                    trap = ir.FunctionType(ir.VoidType(), [])
                    builder.call(builder.module.declare_intrinsic("llvm.trap", [], trap), [])
            with scalar:
                _scalar_lookups(builder, src, dst, n, tptr)
        return context.get_dummy_value()

    return sig, codegen


_I8 = ir.IntType(8)
_I64 = ir.IntType(64)
_V64 = ir.VectorType(_I8, 64)
_MASK = ir.VectorType(ir.IntType(1), 64)


def _scalar_lookups(builder, src, dst, n, tptr):
    s, d = builder.inttoptr(src, _I8.as_pointer()), builder.inttoptr(dst, _I8.as_pointer())
    with cgutils.for_range(builder, n) as loop:
        byte = builder.load(builder.gep(s, [loop.index]))
        value = builder.load(builder.gep(tptr, [builder.zext(byte, _I64)]))
        builder.store(value, builder.gep(d, [loop.index]))


def _vector_lookups(builder, src, dst, n, tptr):
    """64 bytes per step, the last step masked to what is left."""
    module = builder.module
    ptr, i32 = _I8.as_pointer(), ir.IntType(32)
    permute = cgutils.get_or_insert_function(
        module, ir.FunctionType(_V64, [_V64, _V64, _V64]), "llvm.x86.avx512.vpermi2var.qi.512"
    )
    load = cgutils.get_or_insert_function(
        module, ir.FunctionType(_V64, [ptr, i32, _MASK, _V64]), "llvm.masked.load.v64i8.p0"
    )
    store = cgutils.get_or_insert_function(
        module,
        ir.FunctionType(ir.VoidType(), [_V64, ptr, i32, _MASK]),
        "llvm.masked.store.v64i8.p0",
    )
    quarters = [  # the table in four registers
        builder.load(builder.gep(tptr, [ir.Constant(_I64, 64 * q)]), typ=_V64, align=1)
        for q in range(4)
    ]
    zero, one, align = ir.Constant(_V64, None), ir.Constant(_I64, 1), ir.Constant(i32, 1)
    steps = builder.udiv(builder.add(n, ir.Constant(_I64, 63)), ir.Constant(_I64, 64))
    s, d = builder.inttoptr(src, _I8.as_pointer()), builder.inttoptr(dst, _I8.as_pointer())
    with cgutils.for_range(builder, steps) as loop:
        start = builder.mul(loop.index, ir.Constant(_I64, 64))
        left = builder.sub(n, start)
        full = builder.icmp_signed(">=", left, ir.Constant(_I64, 64))
        # (1 << left) - 1, or all 64 bits (a shift by 64 would be poison)
        shift = builder.select(full, ir.Constant(_I64, 0), left)
        low_bits = builder.sub(builder.shl(one, shift), one)
        bits = builder.select(full, ir.Constant(_I64, -1), low_bits)
        mask = builder.bitcast(bits, _MASK)
        index = builder.call(load, [builder.gep(s, [start]), align, mask, zero])
        low = builder.call(permute, [quarters[0], index, quarters[1]])
        high = builder.call(permute, [quarters[2], index, quarters[3]])
        upper = builder.icmp_signed("<", index, zero)
        found = builder.select(upper, high, low)
        builder.call(store, [found, builder.gep(d, [start]), align, mask])
