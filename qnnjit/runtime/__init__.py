"""Runtime: the compiled model users call."""

from .compiled_model import CompiledModel

__all__ = ["CompiledModel"]
