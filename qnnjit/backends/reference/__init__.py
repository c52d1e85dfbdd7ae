"""The reference backend: a NumPy interpreter of the IR that defines the answer."""

from .interpreter import ReferenceExecutor

__all__ = ["ReferenceExecutor"]
