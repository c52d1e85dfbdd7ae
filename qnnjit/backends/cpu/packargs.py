"""A kernel's argument tuple as Numba holds it in memory, written from Python.

A replayed call passes its kernel the same arguments every time, so they
can be packed into bytes once and handed to the kernel's trampoline
(`spinteam._trampoline`, which loads the tuple and calls the kernel) on
every call, instead of unboxing each argument again: 1.57 -> about 0.9 us a
call of 23 arguments. `spinteam._team_call` stores such a tuple too, but it
is compiled per argument signature (0.3-0.6 s cold); this writes the same
bytes from the layout Numba's data model gives the tuple, so even a call
made once (`spinteam.run_ranges_spinning`) packs its arguments.

The layout: the tuple is an LLVM struct of its members' value types, each
at its ABI alignment. An array is Numba's `ArrayModel` struct: meminfo,
parent, nitems, itemsize, data, shape[ndim], strides[ndim] (bytes). The
meminfo and parent are left null: the kernel then counts no references
(the caller keeps the arrays alive) and boxes nothing. Integers, floats and
booleans (one byte, 0 or 1) are stored as themselves; any other member type
is not packed (None: the caller unboxes as before). Each layout is one
`struct` format, padding included, found by the arguments' Numba type
fingerprint (C, like the dispatcher's own lookup) instead of `typeof`:
with both, a one-off team call of 16 arguments went from ~115 to ~20 us.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np
from numba import types
from numba.core.typing.typeof import Purpose, typeof

try:  # Numba's C type fingerprint (what its dispatcher keys overloads by)
    from numba._dispatcher import compute_fingerprint
except ImportError:  # pragma: no cover - another Numba: every call types its tuple
    compute_fingerprint = None

__all__ = ["pack_arguments", "data_words"]

_DATA_OFFSET = 32  # the data address's byte in an array's struct (8-byte aligned)


class Layout(NamedTuple):
    """The bytes of one argument tuple type."""

    size: int
    fields: list  # (offset, member type) per member
    struct: struct.Struct  # the whole tuple, padding included, in one format
    arrays: tuple[bool, ...]  # which members are arrays


# (numba tuple type) -> Layout, or None where a member's type is not packed;
# the same by the arguments' type fingerprint (module doc)
_LAYOUTS: dict = {}
_BY_FINGERPRINT: dict = {}


def pack_arguments(context, args: tuple) -> np.ndarray | None:
    """The bytes of `args` as the Numba target `context` holds the tuple in
    memory (meminfos and parents null), or None if a member's type is not
    one this module writes."""
    layout = _arguments_layout(context, args)
    if layout is None:
        return None
    try:
        return _pack(layout, args)
    except struct.error:  # a Python int past int64: same fingerprint, typed uint64
        layout = _layout(context, typeof(args, Purpose.argument))
        return None if layout is None else _pack(layout, args)


def _pack(layout: Layout, args: tuple) -> np.ndarray:
    values = []
    for is_array, value in zip(layout.arrays, args):
        if is_array:
            address = value.__array_interface__["data"][0]
            values += (0, 0, value.size, value.itemsize, address, *value.shape, *value.strides)
        else:
            values.append(value)
    packed = np.empty(layout.size, np.uint8)
    layout.struct.pack_into(packed, 0, *values)
    return packed


def data_words(context, args: tuple, positions) -> list[tuple[int, int]] | None:
    """(position, index of the int64 word) of the data address of each array
    `args[position]` in `pack_arguments`' bytes: where a caller writes
    another array's address to pass that array instead (same type, shape
    and strides). None where `args` is not packed."""
    layout = _arguments_layout(context, args)
    if layout is None:
        return None
    return [(p, (layout.fields[p][0] + _DATA_OFFSET) // 8) for p in positions]


def _arguments_layout(context, args: tuple) -> Layout | None:
    try:
        key = compute_fingerprint(args) if compute_fingerprint is not None else None
    except (TypeError, ValueError, NotImplementedError):
        key = None
    if key is not None and key in _BY_FINGERPRINT:
        return _BY_FINGERPRINT[key]
    layout = _layout(context, typeof(args, Purpose.argument))
    if key is not None:
        _BY_FINGERPRINT[key] = layout
    return layout


def _layout(context, tuple_type) -> Layout | None:
    if tuple_type not in _LAYOUTS:
        _LAYOUTS[tuple_type] = _compute_layout(context, tuple_type)
    return _LAYOUTS[tuple_type]


def _compute_layout(context, tuple_type) -> Layout | None:
    if not all(isinstance(t, (types.Array, types.Integer, types.Float, types.Boolean))
               for t in tuple_type.types):  # fmt: skip
        return None
    struct_type = context.get_value_type(tuple_type)
    offset, fields, codes = 0, [], []
    for element, member in zip(struct_type.elements, tuple_type.types):
        align = context.get_abi_alignment(element)
        start = -(-offset // align) * align
        codes.append("x" * (start - offset) + _format(member))
        fields.append((start, member))
        offset = start + context.get_abi_sizeof(element)
    size = context.get_abi_sizeof(struct_type)
    codes.append("x" * (size - offset))
    arrays = tuple(isinstance(m, types.Array) for m in tuple_type.types)
    return Layout(size, fields, struct.Struct("<" + "".join(codes)), arrays)


def _format(member) -> str:
    """The `struct` format of one member: an array's meminfo, parent,
    nitems, itemsize, data, shape and strides; a scalar as itself (a
    boolean one byte, 0 or 1)."""
    if isinstance(member, types.Array):
        return f"{5 + 2 * member.ndim}q"
    if isinstance(member, types.Boolean):
        return "?"
    if isinstance(member, types.Float):
        return "f" if member.bitwidth == 32 else "d"
    code = {8: "b", 16: "h", 32: "i", 64: "q"}[member.bitwidth]
    return code if member.signed else code.upper()
