"""Compile LLVM IR text to machine code for one CPU path, once, and keep it.

The GEMM microkernels are LLVM IR text generated per shape parameters
(``ukernels``). This module turns such text into callable addresses:

1. a target machine per ISA path: the host CPU name and its features for
   ``avx512_vnni``; the same with every AVX-512/AMX/AVX10 feature switched off for
   ``avx2``, so the AVX2 path is really AVX2 code (16 ymm registers, no masks)
   even on an AVX-512 host, and tests of it mean something;
2. the new pass manager at O3, then ``emit_object``;
3. the object file is kept in memory for the process (one MCJIT engine per
   module, never freed: a kernel address stays valid for the process's life)
   and on disk under ``$QNNJIT_CACHE_DIR/cpu_ukernels`` (default
   ``~/.cache/qnnjit``), keyed by a hash of the IR text, the LLVM version, the
   triple, the CPU name and feature string. A warm process skips parsing,
   optimization and code generation and only links the object. Files are written
   to a temporary name and ``os.replace``d, with a checksum verified on reading
   (LLVM crashes on a corrupt object file, so a damaged entry is recompiled,
   never loaded). ``QNNJIT_CACHE_DIR=""`` (empty) disables the disk cache.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass

from ...diskcache import cache_dir, read_checked, write_checked
from .features import host_cpu

__all__ = ["JitModule", "assembly", "compile_module", "target_machine"]

_FORMAT = "qnnjit-ukernel-v1"
_LOCK = threading.RLock()
_MODULES: dict[str, JitModule] = {}  # in-process cache, by key
_ENGINES: list = []  # keeps every engine (and so every kernel's code) alive


@dataclass(frozen=True)
class JitModule:
    """Addresses of the functions of one compiled module, and how it was obtained."""

    key: str
    addresses: dict[str, int]
    source: str  # "compiled", "disk" or "memory"
    seconds: float  # time this call took to make it available


@functools.cache
def _llvm():
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()  # the microkernels' inline asm (ukernels SIGNED_DOC)
    return llvm


_NOT_ON_AVX2 = ("avx512", "amx", "avx10", "evex512")


def _features_for(isa: str) -> str:
    cpu = host_cpu()
    if isa == "avx512_vnni":
        return cpu.feature_string
    if isa == "avx2":
        parts = []
        for flag in cpu.feature_string.split(","):
            name = flag[1:]
            if flag.startswith("+") and name.startswith(_NOT_ON_AVX2):
                flag = "-" + name
            parts.append(flag)
        return ",".join(p for p in parts if p)
    raise ValueError(f"no LLVM target machine for ISA {isa!r}")


@functools.cache
def target_machine(isa: str):
    """The llvmlite TargetMachine the kernels of ``isa`` are compiled for."""
    llvm = _llvm()
    target = llvm.Target.from_default_triple()
    return target.create_target_machine(cpu=host_cpu().name, features=_features_for(isa), opt=3)


def _key(ir_text: str, isa: str) -> str:
    llvm = _llvm()
    h = hashlib.sha256()
    for part in (
        _FORMAT,
        ".".join(map(str, llvm.llvm_version_info)),
        llvm.get_default_triple(),
        host_cpu().name,
        _features_for(isa),
        ir_text,
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _optimized(ir_text: str, isa: str):
    """(module, target machine): ``ir_text`` parsed, verified and optimized."""
    llvm = _llvm()
    tm = target_machine(isa)
    module = llvm.parse_assembly(ir_text)
    module.triple = llvm.get_default_triple()
    module.data_layout = str(tm.target_data)
    module.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(module, pb)
    return module, tm


def _optimize_and_emit(ir_text: str, isa: str) -> bytes:
    module, tm = _optimized(ir_text, isa)
    return tm.emit_object(module)


def assembly(ir_text: str, isa: str) -> str:
    """The assembly that `compile_module` makes of ``ir_text`` (to read it)."""
    module, tm = _optimized(ir_text, isa)
    return tm.emit_assembly(module)


def _load(obj: bytes, isa: str, names: tuple[str, ...]) -> dict[str, int]:
    llvm = _llvm()
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target_machine(isa))
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    addresses = {name: engine.get_function_address(name) for name in names}
    missing = [n for n, a in addresses.items() if not a]
    if missing:
        raise RuntimeError(f"compiled module lacks functions {missing}")
    _ENGINES.append(engine)
    return addresses


def compile_module(ir_text: str, isa: str, names: tuple[str, ...]) -> JitModule:
    """Machine code for ``ir_text`` on path ``isa``; returns the addresses of
    ``names``. Compiled at most once per process, and once per machine while the
    disk cache holds it."""
    import time

    t0 = time.perf_counter()
    key = _key(ir_text, isa)
    with _LOCK:
        hit = _MODULES.get(key)
        if hit is not None:
            return JitModule(key, hit.addresses, "memory", time.perf_counter() - t0)
        directory = cache_dir()
        path = directory / "cpu_ukernels" / f"{key}.o" if directory is not None else None
        obj = read_checked(path) if path is not None else None
        source = "disk"
        if obj is None:
            source = "compiled"
            obj = _optimize_and_emit(ir_text, isa)
            if path is not None:
                try:
                    write_checked(path, obj)
                except OSError:
                    pass  # a read-only cache only costs time
        addresses = _load(obj, isa, names)
        module = JitModule(key, addresses, source, time.perf_counter() - t0)
        _MODULES[key] = module
        return module
