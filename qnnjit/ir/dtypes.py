"""Element types of the IR: storage types that quantized tensors live in, and the
float types they express.

A `DType` is a value: its name, kind, bit width and (for integers) its range are
data, so numerics, printers and kernels read them instead of re-deriving them.
Every dtype has a NumPy container dtype. Sub-byte integers and the small float
formats (float8, float4) use ml_dtypes' NumPy types, which keep one element per
byte: the IR never packs nibbles, only an export format would.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type.

    kind is "int", "float" or "bool". For integers, `qmin`/`qmax` are the full
    representable range (the saturation bounds of quantize). For floats,
    `max_finite` is the largest finite magnitude (float8 saturation bound).
    """

    name: str
    kind: str
    bits: int
    signed: bool
    numpy: np.dtype

    @property
    def is_int(self) -> bool:
        return self.kind == "int"

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def qmin(self) -> int:
        if not self.is_int:
            raise TypeError(f"{self.name} is not an integer type")
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        if not self.is_int:
            raise TypeError(f"{self.name} is not an integer type")
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def max_finite(self) -> float:
        if not self.is_float:
            raise TypeError(f"{self.name} is not a float type")
        return float(ml_dtypes.finfo(self.numpy).max)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DType({self.name})"


def _int(name: str, bits: int, signed: bool, container) -> DType:
    return DType(name, "int", bits, signed, np.dtype(container))


def _float(name: str, bits: int, container) -> DType:
    return DType(name, "float", bits, True, np.dtype(container))


bool_ = DType("bool", "bool", 8, False, np.dtype(np.bool_))
int2 = _int("int2", 2, True, ml_dtypes.int2)
uint2 = _int("uint2", 2, False, ml_dtypes.uint2)
int4 = _int("int4", 4, True, ml_dtypes.int4)
uint4 = _int("uint4", 4, False, ml_dtypes.uint4)
int8 = _int("int8", 8, True, np.int8)
uint8 = _int("uint8", 8, False, np.uint8)
int16 = _int("int16", 16, True, np.int16)
uint16 = _int("uint16", 16, False, np.uint16)
int32 = _int("int32", 32, True, np.int32)
uint32 = _int("uint32", 32, False, np.uint32)
int64 = _int("int64", 64, True, np.int64)
uint64 = _int("uint64", 64, False, np.uint64)
float4e2m1 = _float("float4e2m1", 4, ml_dtypes.float4_e2m1fn)
float8e4m3fn = _float("float8e4m3fn", 8, ml_dtypes.float8_e4m3fn)
float8e4m3fnuz = _float("float8e4m3fnuz", 8, ml_dtypes.float8_e4m3fnuz)
float8e5m2 = _float("float8e5m2", 8, ml_dtypes.float8_e5m2)
float8e5m2fnuz = _float("float8e5m2fnuz", 8, ml_dtypes.float8_e5m2fnuz)
float8e8m0 = _float("float8e8m0", 8, ml_dtypes.float8_e8m0fnu)
float16 = _float("float16", 16, np.float16)
bfloat16 = _float("bfloat16", 16, ml_dtypes.bfloat16)
float32 = _float("float32", 32, np.float32)
float64 = _float("float64", 64, np.float64)

ALL: tuple[DType, ...] = (
    bool_, int2, uint2, int4, uint4, int8, uint8, int16, uint16, int32, uint32,
    int64, uint64, float4e2m1, float8e4m3fn, float8e4m3fnuz, float8e5m2,
    float8e5m2fnuz, float8e8m0, float16, bfloat16, float32, float64,
)  # fmt: skip

BY_NAME: dict[str, DType] = {d.name: d for d in ALL}

# Types a quantized tensor may be stored in, and the float types it may express.
QUANTIZED_STORAGE: tuple[DType, ...] = (
    int2, uint2, int4, uint4, int8, uint8, int16, uint16, int32,
    float8e4m3fn, float8e4m3fnuz, float8e5m2, float8e5m2fnuz, float4e2m1,
)  # fmt: skip
EXPRESSED: tuple[DType, ...] = (float32, float16, bfloat16)

_BY_NUMPY = {d.numpy: d for d in reversed(ALL)}


def from_numpy(dtype) -> DType:
    """The IR dtype of a NumPy dtype (ml_dtypes types included)."""
    try:
        return _BY_NUMPY[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no qnnjit dtype for NumPy dtype {np.dtype(dtype)}") from None


def by_name(name: str) -> DType:
    try:
        return BY_NAME[name]
    except KeyError:
        raise TypeError(f"unknown qnnjit dtype {name!r}") from None
