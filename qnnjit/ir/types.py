"""Value types of the IR: quantization parameters, accumulator facts and tensor types.

Types are values (frozen, validated, hashable), as MLIR's `!quant.uniform` is:
a pass compares two types with `==`, a printer prints them, a cache key hashes
them. Per-tensor, per-axis and blocked quantization are explicit cases of one
`QuantParams`; the axis is stored whenever it matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import dtypes
from .dtypes import DType

Dim = int | str  # a static size, or the name of a symbolic (e.g. batch) dimension


def _frozen_array(values, dtype) -> np.ndarray:
    array = np.array(values, dtype=dtype, copy=True)
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class QuantParams:
    """Affine quantization `real = (stored - zero_point) * scale`.

    - per-tensor: `scale` and `zero_point` are 0-d, `axis` is None;
    - per-axis: both 1-D with one entry per index of `axis`;
    - blocked: same rank as the tensor, `block_size` consecutive elements along
      `axis` share one entry.
    `dtype` is the storage type, `expressed` the float type it stands for.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: DType
    axis: int | None = None
    block_size: int = 0
    expressed: DType = dtypes.float32

    def __post_init__(self):
        scale = _frozen_array(self.scale, self.expressed.numpy)
        zero_point = _frozen_array(self.zero_point, np.float64 if self.dtype.is_float else np.int64)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)
        if self.dtype not in dtypes.QUANTIZED_STORAGE:
            raise ValueError(f"{self.dtype} is not a quantized storage type")
        if self.expressed not in dtypes.EXPRESSED:
            raise ValueError(f"{self.expressed} cannot be a quantized tensor's expressed type")
        if scale.shape != zero_point.shape:
            raise ValueError(f"scale shape {scale.shape} != zero point shape {zero_point.shape}")
        if self.axis is None and scale.ndim != 0:
            raise ValueError("per-tensor quantization needs 0-d scale and zero point")
        if self.axis is not None and scale.ndim == 0:
            raise ValueError(f"quantization along axis {self.axis} needs 1-D or blocked params")
        if self.block_size < 0 or (self.block_size and self.axis is None):
            raise ValueError("blocked quantization needs an axis and a positive block size")
        as_float = scale.astype(np.float64)
        if not np.all(np.isfinite(as_float)) or np.any(as_float <= 0):
            raise ValueError(f"quantization scales must be finite and positive, got {scale}")
        if self.dtype.is_int and (
            np.any(zero_point < self.dtype.qmin) or np.any(zero_point > self.dtype.qmax)
        ):
            raise ValueError(f"zero point {zero_point} outside the range of {self.dtype}")

    @property
    def per_tensor(self) -> bool:
        return self.axis is None

    def _key(self):
        return (
            self.dtype,
            self.axis,
            self.block_size,
            self.expressed,
            self.scale.shape,
            self.scale.tobytes(),
            self.zero_point.tobytes(),
        )

    def __eq__(self, other):
        return isinstance(other, QuantParams) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __str__(self) -> str:
        if self.per_tensor:
            zero_point = int(self.zero_point) if self.dtype.is_int else float(self.zero_point)
            params = f"{float(self.scale):.6g}:{zero_point}"
        else:
            params = f"axis={self.axis}"
            if self.block_size:
                params += f",block={self.block_size}"
            params += f",n={self.scale.size}"
        return f"q<{self.dtype}:{self.expressed}, {params}>"


@dataclass(frozen=True)
class Accumulator:
    """An integer accumulator: its storage width and the proven value range.

    `lo`/`hi` are None until the range analysis proves bounds; a kernel may use a
    narrower accumulator only where the proven range fits.
    """

    bits: int = 32
    lo: int | None = None
    hi: int | None = None

    def __post_init__(self):
        if self.bits not in (16, 32, 64):
            raise ValueError(f"accumulators are 16, 32 or 64 bits wide, not {self.bits}")
        if (self.lo is None) != (self.hi is None) or (self.lo is not None and self.lo > self.hi):
            raise ValueError(f"bad accumulator range [{self.lo}, {self.hi}]")

    def __str__(self) -> str:
        bounds = "" if self.lo is None else f", range=[{self.lo}, {self.hi}]"
        return f"acc<i{self.bits}{bounds}>"


@dataclass(frozen=True)
class TensorType:
    """Shape, element type and (for quantized tensors) quantization of a value.

    `shape` is None when even the rank is unknown; a dim is an int or a symbol.
    """

    dtype: DType
    shape: tuple[Dim, ...] | None
    quant: QuantParams | None = None
    accumulator: Accumulator | None = field(default=None)

    def __post_init__(self):
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
            for dim in self.shape:
                if not isinstance(dim, str) and (not isinstance(dim, (int, np.integer)) or dim < 0):
                    raise ValueError(f"bad dimension {dim!r} in shape {self.shape}")
            object.__setattr__(
                self, "shape", tuple(d if isinstance(d, str) else int(d) for d in self.shape)
            )
        if self.quant is not None and self.quant.dtype != self.dtype:
            raise ValueError(f"tensor of {self.dtype} cannot carry {self.quant}")

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def with_shape(self, shape) -> TensorType:
        return TensorType(self.dtype, shape, self.quant, self.accumulator)

    def __str__(self) -> str:
        if self.shape is None:
            dims = "*"
        else:
            dims = "x".join(str(d) for d in self.shape) if self.shape else "scalar"
        text = f"{self.dtype}[{dims}]"
        if self.quant is not None:
            text += f" {self.quant}"
        if self.accumulator is not None:
            text += f" {self.accumulator}"
        return text
