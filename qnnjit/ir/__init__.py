"""The qnnjit IR: dtypes, quantization-carrying types, the graph, the op registry."""

from . import dtypes
from .graph import Graph, Node, Value
from .types import Accumulator, QuantParams, TensorType

__all__ = ["Accumulator", "Graph", "Node", "QuantParams", "TensorType", "Value", "dtypes"]
