"""The CPU backend (Numba + llvmlite): host ISA detection and the int8 GEMM engine.

``features`` picks the int8 dot-product path (AVX-512 VNNI, AVX2, portable);
``gemm`` computes ``C (int32) = A (u8 | s8) @ B (s8)`` exactly, with weights
packed once (``packing``) and register-blocked microkernels generated as LLVM IR
(``ukernels``) and compiled by llvmlite (``llvmjit``), driven by Numba loops
(``drivers``).
"""


def __getattr__(name):
    # The executor (and its Numba kernels) load on first use, not with the GEMM engine.
    if name == "CpuExecutor":
        from .executor import CpuExecutor

        return CpuExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
