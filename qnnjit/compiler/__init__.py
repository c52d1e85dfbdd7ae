"""The compiler: the pass pipeline that turns a frontend graph into integer IR."""

from .pipeline import PIPELINE, run_pipeline

__all__ = ["PIPELINE", "run_pipeline"]
