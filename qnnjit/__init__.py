"""qnnjit: a JIT compiler for quantized neural networks."""

from .api import compile
from .errors import (
    AccumulatorOverflowError,
    AccumulatorOverflowWarning,
    InputError,
    ModelError,
    QnnjitError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "AccumulatorOverflowError",
    "AccumulatorOverflowWarning",
    "InputError",
    "ModelError",
    "QnnjitError",
    "UnsupportedModelError",
    "compile",
]
