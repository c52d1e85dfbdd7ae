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
