"""qnnjit: a JIT compiler for quantized neural networks."""

from .api import compile
from .errors import InputError, ModelError, QnnjitError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = ["InputError", "ModelError", "QnnjitError", "UnsupportedModelError", "compile"]
