"""Helpers the float converters share: reading ranks, normalizing axes, and
turning attribute-like ONNX inputs into plain Python values for IR attributes.
"""

from __future__ import annotations

import numpy as np


def rank(ctx, index: int = 0) -> int:
    """Rank of input `index`; an error naming the node when it is unknown."""
    value = ctx.input(index)
    if value is None or value.type.shape is None:
        raise ctx.error(f"input {index} must have a known rank")
    return len(value.type.shape)


def axis(ctx, value: int, size: int, what: str = "axis") -> int:
    """A possibly negative axis in [-size, size) as a positive one."""
    if not -size <= value < size:
        raise ctx.error(f"{what} {value} is out of range for rank {size}")
    return value % size


def axes(ctx, values, size: int, what: str = "axes") -> tuple[int, ...]:
    result = tuple(axis(ctx, int(v), size, what) for v in values)
    if len(set(result)) != len(result):
        raise ctx.error(f"{what} {list(values)} repeat an axis")
    return result


def ints(array) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(array).reshape(-1))


def scalar(array):
    """The Python number held by a one-element array."""
    array = np.asarray(array)
    if array.size != 1:
        raise ValueError(f"expected one element, got shape {array.shape}")
    return array.reshape(-1)[0].item()


def present(ctx, index: int) -> bool:
    """Whether optional input `index` is given (a name, not an empty tensor)."""
    value = ctx.input(index)
    return value is not None and not (value.is_constant and value.const.size == 0)


def axes_input_or_attr(ctx, index: int, size: int) -> tuple[int, ...] | None:
    """Axes from input `index` (newer opsets) or the `axes` attribute (older);
    None when neither is given."""
    if ctx.input(index) is not None:
        return axes(ctx, ctx.const(index, "axes"), size)
    values = ctx.attr("axes")
    return None if values is None else axes(ctx, values, size)


def check_outputs(ctx, supported: int, why: str):
    """Reject a node that asks for more outputs than the converter produces."""
    extra = [name for name in ctx.node.output[supported:] if name]
    if extra:
        raise ctx.error(f"output(s) {extra} are not supported: {why}")


# ---- shape tensors computed from symbolic dims ---------------------------------

# Two assignments of distinct primes to the symbols a shape computation reads.
_PROBES = ((37, 41, 43, 47, 53, 59, 61, 67), (71, 73, 79, 83, 89, 97, 101, 103))


def _dim_value(dim, binding: dict) -> int:
    """A dim (int, symbol or product string such as "N*12") under `binding`."""
    if isinstance(dim, int):
        return dim
    value = 1
    for factor in dim.split("*"):
        value *= int(factor) if factor.lstrip("-").isdigit() else binding[factor]
    return value


def _symbols_of(value, seen: set, found: set):
    """Symbols of the dims that the computation of `value` reads through
    `shape` / `size` nodes; raises LookupError when it reads tensor data."""
    if value is None or value.is_constant or id(value) in seen:
        return
    seen.add(id(value))
    node = value.producer
    if node is None:
        raise LookupError(value.name)
    if node.op in ("shape", "size"):
        for dim in node.inputs[0].type.shape or ():
            if isinstance(dim, str):
                found.update(f for f in dim.split("*") if not f.lstrip("-").isdigit())
        return
    for v in node.inputs:
        _symbols_of(v, seen, found)


def _probe(value, binding: dict, memo: dict) -> np.ndarray:
    """Evaluate a shape computation with the symbols bound to integers."""
    from ....ir import ops

    if value.is_constant:
        return value.const
    if id(value) in memo:
        return memo[id(value)]
    node = value.producer
    if node.op in ("shape", "size"):
        dims = [_dim_value(d, binding) for d in node.inputs[0].type.shape]
        if node.op == "size":
            result = np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
        else:
            result = np.array(dims[node.attrs["start"] : node.attrs["end"]], dtype=np.int64)
    else:
        args = [None if v is None else _probe(v, binding, memo) for v in node.inputs]
        result = ops.evaluate(node.op, args, node.attrs)[node.outputs.index(value)]
    memo[id(value)] = result
    return result


def symbolic_ints(ctx, index: int, what: str, like=None) -> tuple:
    """Input `index` as a tuple of ints, where a constant; else, when it is
    computed from symbolic dims only (Shape -> Gather -> Concat ... of a
    dynamic batch), each entry as an int, or as a dim of `like` (a shape,
    usually the data input's) or a bare symbol that it equals for every size
    of the symbols, and None where it is none of these. Raises the usual non-constant error when
    the value depends on tensor data."""
    value = ctx.input(index)
    if value is not None and value.is_constant:
        return ints(value.const)
    symbols: set = set()
    try:
        _symbols_of(value, set(), symbols)
    except LookupError:
        ctx.const(index, what)  # raises the error naming the input
    symbols = sorted(symbols)
    if not symbols or len(symbols) > len(_PROBES[0]):
        ctx.const(index, what)
    bindings = [dict(zip(symbols, probe)) for probe in _PROBES]
    try:
        results = [np.asarray(_probe(value, b, {})).reshape(-1) for b in bindings]
    except Exception:  # noqa: BLE001 - anything unevaluable is "not constant"
        ctx.const(index, what)
    if results[0].shape != results[1].shape:
        ctx.const(index, what)
    candidates = [d for d in (like or ()) if isinstance(d, str)] + symbols
    entries = []
    for a, b in zip(results[0].tolist(), results[1].tolist()):
        if a == b:
            entries.append(int(a))
            continue
        match = None
        for dim in candidates:
            try:
                if all(_dim_value(dim, bd) == v for bd, v in zip(bindings, (a, b))):
                    match = dim
                    break
            except KeyError:
                continue
        entries.append(match)
    return tuple(entries)
