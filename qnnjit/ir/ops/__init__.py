"""The op registry: one `OpDef` per IR op, with its facets side by side.

Each op is declared once (in one module of this package) with:
- `infer`: output types from input types, constant inputs and attributes;
- `evaluate`: the reference semantics in NumPy (the numerics oracle);
- `lowerings`: per-backend code generators, filled in by the backends.
A missing facet fails with a clear message naming the op, never a KeyError.

Op modules register through the `op` decorator:

    @op("relu", summary="max(x, 0)")
    class Relu:
        def infer(ctx): ...
        def evaluate(inputs, attrs): ...
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ...errors import ModelError
from .. import dtypes
from ..types import TensorType


@dataclass
class InferContext:
    """What type inference sees of one node."""

    node_name: str
    op: str
    types: list[TensorType | None]
    consts: list[np.ndarray | None]
    attrs: dict

    def type(self, index: int) -> TensorType:
        if index >= len(self.types) or self.types[index] is None:
            raise self.error(f"input {index} is required")
        return self.types[index]

    def has(self, index: int) -> bool:
        return index < len(self.types) and self.types[index] is not None

    def const(self, index: int, what: str = "") -> np.ndarray:
        """The constant value of input `index`; an error if it is not constant."""
        if index >= len(self.consts) or self.consts[index] is None:
            raise self.error(f"input {index}{' (' + what + ')' if what else ''} must be a constant")
        return self.consts[index]

    def error(self, message: str) -> ModelError:
        return ModelError(f"node {self.node_name!r} ({self.op}): {message}")


@dataclass
class OpDef:
    name: str
    summary: str
    infer: Callable[[InferContext], list[TensorType]]
    evaluate: Callable[[list, dict], list[np.ndarray]]
    lowerings: dict[str, Callable] = field(default_factory=dict)

    def lowering(self, target: str) -> Callable:
        try:
            return self.lowerings[target]
        except KeyError:
            raise NotImplementedError(f"{self.name} has no {target} lowering") from None


REGISTRY: dict[str, OpDef] = {}


def op(name: str, summary: str):
    """Class decorator registering an op from a namespace class holding
    `infer(ctx)` and `evaluate(inputs, attrs)` functions."""

    def register(namespace):
        if name in REGISTRY:
            raise RuntimeError(f"op {name!r} is defined twice")
        REGISTRY[name] = OpDef(name, summary, namespace.infer, namespace.evaluate)
        return namespace

    return register


def get(name: str) -> OpDef:
    _load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise NotImplementedError(f"qnnjit IR has no op {name!r}") from None


def infer_types(op_name, node_name, inputs: Sequence, attrs: dict) -> list[TensorType]:
    opdef = get(op_name)
    ctx = InferContext(
        node_name,
        op_name,
        [v.type if v is not None else None for v in inputs],
        [v.const if v is not None else None for v in inputs],
        attrs,
    )
    return list(opdef.infer(ctx))


def evaluate(op_name: str, inputs: list, attrs: dict) -> list[np.ndarray]:
    return list(get(op_name).evaluate(inputs, attrs))


_loaded = False


def _load_all():
    """Import every op module of this package once (they register themselves)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


# ---- helpers shared by op definitions ----------------------------------------


def broadcast_shapes(ctx: InferContext, *shapes) -> tuple | None:
    """NumPy/ONNX multidirectional broadcasting over static and symbolic dims."""
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    result = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise ctx.error(
                f"shapes {' and '.join(str(tuple(s)) for s in shapes)} do not broadcast"
            )
        result.append(dims.pop() if dims else 1)
    return tuple(result)


def same_type(ctx: InferContext, index: int = 0) -> list[TensorType]:
    """Output type = the type of input `index`, without quantization facts."""
    t = ctx.type(index)
    return [TensorType(t.dtype, t.shape)]


def normalize_axis(ctx: InferContext, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ctx.error(f"axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


def infer_by_evaluation(ctx: InferContext, evaluate: Callable) -> list[TensorType]:
    """Infer output types by evaluating the op on zero-filled inputs of the
    given shapes (constant inputs keep their values).

    Exact for static shapes. A symbolic dim is probed with two sizes: an output
    dim that follows it in both probes keeps the symbol, any other dependence
    on it is an error (the op then needs a dedicated shape function).
    """
    symbols = sorted({d for t in ctx.types if t and t.shape for d in t.shape if isinstance(d, str)})
    probes = [dict.fromkeys(symbols, 2), dict.fromkeys(symbols, 3)] if symbols else [{}]
    results = []
    for sizes in probes:
        args = []
        for t, c in zip(ctx.types, ctx.consts):
            if t is None:
                args.append(None)
            elif c is not None:
                args.append(c)
            elif t.shape is None:
                raise ctx.error("input of unknown rank")
            else:
                shape = tuple(sizes.get(d, d) if isinstance(d, str) else d for d in t.shape)
                args.append(np.zeros(shape, dtype=t.dtype.numpy))
        try:
            results.append([np.asarray(r) for r in evaluate(args, ctx.attrs)])
        except (ValueError, IndexError, TypeError) as exc:
            raise ctx.error(str(exc)) from exc
    types = []
    for index, out in enumerate(results[0]):
        shape = list(out.shape)
        if len(results) == 2:
            other = results[1][index].shape
            if len(other) != len(shape):
                raise ctx.error("output rank depends on a symbolic dimension")
            for axis, (a, b) in enumerate(zip(shape, other)):
                if a != b:
                    symbol = symbols[0] if len(symbols) == 1 and (a, b) == (2, 3) else None
                    if symbol is None:
                        raise ctx.error(
                            "output shape depends on a symbolic dimension in a way "
                            "qnnjit cannot express; give the input a static shape"
                        )
                    shape[axis] = symbol
        types.append(TensorType(dtypes.from_numpy(out.dtype), tuple(shape)))
    return types
