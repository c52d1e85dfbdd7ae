"""The ONNX converter table: one function per (domain, op type), grouped in
modules by family. A converter takes a `ConvertContext` and returns the IR
values of the node's outputs (in ONNX output order).

    @converter("Relu")
    def relu(ctx):
        return ctx.emit("relu", [ctx.input(0)])

`since` is the first opset of that domain the converter understands; qnnjit
supports the default domain from opset 13 on.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

MIN_ONNX_OPSET = 13

# Default-domain ops whose opset 11 and 12 schemas differ from opset 13 only by
# the element types they admit (checked against onnx.defs): their older nodes
# convert with the same converter. ONNX's expanded DynamicQuantizeLinear tests
# are opset-11 graphs of exactly these ops.
OPSET_11_COMPATIBLE = frozenset(
    {"Cast", "Clip", "Constant", "Div", "Identity", "Max", "Min", "ReduceMax", "ReduceMin",
     "Round", "Sub", "Add", "Mul", "QuantizeLinear", "DequantizeLinear"}
)  # fmt: skip


@dataclass(frozen=True)
class Converter:
    op_type: str
    domain: str
    since: int
    convert: Callable


TABLE: dict[tuple[str, str], Converter] = {}


def converter(op_type: str, domain: str = "", since: int | None = None):
    def register(function):
        key = (domain, op_type)
        if key in TABLE:
            raise RuntimeError(f"two converters for {domain or 'ai.onnx'}::{op_type}")
        first = since if since is not None else (MIN_ONNX_OPSET if domain == "" else 1)
        TABLE[key] = Converter(op_type, domain, first, function)
        return function

    return register


_loaded = False


def _load_all():
    global _loaded
    if not _loaded:
        _loaded = True
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")


def _normalize_domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def unsupported_reason(domain: str, op_type: str, opset: int) -> str | None:
    """None when the node can be converted, else why not."""
    _load_all()
    entry = TABLE.get((_normalize_domain(domain), op_type))
    if entry is None:
        return "no converter"
    first = entry.since
    if entry.domain == "" and op_type in OPSET_11_COMPATIBLE:
        first = min(first, 11)
    if opset < first:
        return f"supported from opset {first}"
    return None


def lookup(domain: str, op_type: str, opset: int) -> Callable:
    _load_all()
    return TABLE[(_normalize_domain(domain), op_type)].convert


def supported_ops() -> list[Converter]:
    _load_all()
    return sorted(TABLE.values(), key=lambda c: (c.domain, c.op_type))
