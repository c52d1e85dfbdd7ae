"""Which int8 dot-product instruction set the host runs, and how to force one.

The CPU backend has three int8 GEMM paths, best first:

- ``"avx512_vnni"``: ``vpdpbusd`` (u8 x s8, four products summed into each of
  sixteen i32 lanes, wrapping), exact. Needs AVX512F, AVX512BW and AVX512_VNNI.
- ``"avx2"``: ``vpmaddubsw`` (u8 x s8 pairs summed into *saturating* i16) then
  ``vpmaddwd`` by ones into i32. Needs AVX2. Exact as used here (see ``gemm``).
- ``"portable"``: plain Numba loops, exact, runs anywhere.

``host_isa()`` reads the host through LLVM (the CPU name and feature string that
llvmlite reports, the same facts LLVM itself compiles for), not /proc/cpuinfo,
so what it detects is what the code generator will accept.

``select_isa(isa)`` is what kernels call: an explicit argument wins, then the
environment variable ``QNNJIT_CPU_ISA``, then the host's best. Forcing a path
the host cannot execute raises ``IsaError`` instead of crashing later on an
illegal instruction; forcing a lesser path (``avx2`` or ``portable`` on an
AVX-512 machine) is how tests cover every path a machine can run.
"""

from __future__ import annotations

import functools
import os
import platform

from ...errors import QnnjitError

__all__ = [
    "ISAS",
    "IsaError",
    "HostCpu",
    "host_cpu",
    "host_isa",
    "runnable_isas",
    "select_isa",
    "ENV_VAR",
]

ENV_VAR = "QNNJIT_CPU_ISA"

# Best first. Each needs the LLVM features listed (all of them).
ISAS = ("avx512_vnni", "avx2", "portable")
_REQUIRED = {
    "avx512_vnni": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512vnni"}),
    "avx2": frozenset({"avx2"}),
    "portable": frozenset(),
}


class IsaError(QnnjitError, ValueError):
    """An unknown ISA name, or one this host cannot execute."""


class HostCpu:
    """The host as LLVM sees it: CPU name (``znver4``, ``skylake-avx512``...),
    the set of enabled features, and the raw feature string for a target machine."""

    def __init__(self, name: str, features: frozenset[str], feature_string: str, arch: str):
        self.name = name
        self.features = features
        self.feature_string = feature_string
        self.arch = arch

    def __repr__(self) -> str:
        return f"HostCpu({self.name!r}, arch={self.arch!r}, {len(self.features)} features)"


@functools.cache
def host_cpu() -> HostCpu:
    import llvmlite.binding as llvm

    arch = platform.machine().lower()
    name = llvm.get_host_cpu_name()
    try:
        feature_map = llvm.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot tell on some hosts: assume nothing
        return HostCpu(name, frozenset(), "", arch)
    enabled = frozenset(f for f, on in feature_map.items() if on)
    return HostCpu(name, enabled, feature_map.flatten(), arch)


def _x86(cpu: HostCpu) -> bool:
    return cpu.arch in ("x86_64", "amd64", "i386", "i686", "x86")


def runnable_isas(cpu: HostCpu | None = None) -> tuple[str, ...]:
    """Every path this host can execute, best first (always ends in "portable")."""
    cpu = cpu or host_cpu()
    return tuple(
        isa for isa in ISAS if isa == "portable" or (_x86(cpu) and _REQUIRED[isa] <= cpu.features)
    )


def host_isa(cpu: HostCpu | None = None) -> str:
    """The best path this host runs."""
    return runnable_isas(cpu)[0]


def select_isa(isa: str | None = None, cpu: HostCpu | None = None) -> str:
    """The path to use: ``isa`` if given, else ``$QNNJIT_CPU_ISA`` if set and not
    ``"auto"``, else the host's best. Raises ``IsaError`` for an unknown name or a
    path this host cannot run."""
    source = "argument"
    if isa is None:
        isa = os.environ.get(ENV_VAR, "").strip().lower() or None
        source = f"${ENV_VAR}"
    if isa is None or isa == "auto":
        return host_isa(cpu)
    if isa not in ISAS:
        raise IsaError(f"unknown CPU ISA {isa!r} (from {source}); expected one of {ISAS} or 'auto'")
    runnable = runnable_isas(cpu)
    if isa not in runnable:
        cpu = cpu or host_cpu()
        missing = sorted(_REQUIRED[isa] - cpu.features) if _x86(cpu) else ["an x86-64 host"]
        raise IsaError(
            f"CPU ISA {isa!r} (from {source}) cannot run on this host "
            f"({cpu.name}, missing {', '.join(missing)}); runnable: {runnable}"
        )
    return isa
