"""ONNX frontend (QDQ and QOperator forms, opsets 13+)."""

from .loader import load_onnx

__all__ = ["load_onnx"]
