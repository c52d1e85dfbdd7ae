"""A kernel's argument tuple as Numba holds it in memory, written from Python.

A replayed call passes its kernel the same arguments every time, so they
can be packed into bytes once and handed to the kernel's trampoline
(`spinteam._trampoline`, which loads the tuple and calls the kernel) on
every call, instead of unboxing each argument again: 1.57 -> about 0.9 us a
call of 23 arguments. `spinteam._team_call` stores such a tuple too, but it
is compiled per argument signature (0.3-0.4 s cold); this writes the same
bytes from the layout Numba's data model gives the tuple.

The layout: the tuple is an LLVM struct of its members' value types, each
at its ABI alignment. An array is Numba's `ArrayModel` struct: meminfo,
parent, nitems, itemsize, data, shape[ndim], strides[ndim] (bytes). The
meminfo and parent are left null: the kernel then counts no references
(the caller keeps the arrays alive) and boxes nothing. Integers, floats and
booleans (one byte, 0 or 1) are stored as themselves; any other member type
is not packed (None: the caller unboxes as before).
"""

from __future__ import annotations

import struct

import numpy as np
from numba import types
from numba.core.typing.typeof import Purpose, typeof

__all__ = ["pack_arguments", "data_words"]

# (numba type) -> (size, [(offset, member type)]) of the packed tuple, or None
_LAYOUTS: dict = {}
_ARRAY_HEAD = struct.Struct("<qqqqq")  # meminfo, parent, nitems, itemsize, data
_DATA_OFFSET = 32  # the data address's byte in an array's struct (8-byte aligned)


def pack_arguments(context, args: tuple) -> np.ndarray | None:
    """The bytes of `args` as the Numba target `context` holds the tuple in
    memory (meminfos and parents null), or None if a member's type is not
    one this module writes."""
    layout = _layout(context, typeof(args, Purpose.argument))
    if layout is None:
        return None
    size, fields = layout
    packed = np.zeros(size, np.uint8)
    for (offset, member), value in zip(fields, args):
        _write(packed, offset, member, value)
    return packed


def data_words(context, args: tuple, positions) -> list[tuple[int, int]] | None:
    """(position, index of the int64 word) of the data address of each array
    `args[position]` in `pack_arguments`' bytes: where a caller writes
    another array's address to pass that array instead (same type, shape
    and strides). None where `args` is not packed."""
    layout = _layout(context, typeof(args, Purpose.argument))
    if layout is None:
        return None
    fields = layout[1]
    return [(p, (fields[p][0] + _DATA_OFFSET) // 8) for p in positions]


def _layout(context, tuple_type):
    if tuple_type not in _LAYOUTS:
        _LAYOUTS[tuple_type] = _compute_layout(context, tuple_type)
    return _LAYOUTS[tuple_type]


def _compute_layout(context, tuple_type):
    if not all(isinstance(t, (types.Array, types.Integer, types.Float, types.Boolean))
               for t in tuple_type.types):  # fmt: skip
        return None
    struct_type = context.get_value_type(tuple_type)
    offset, fields = 0, []
    for element, member in zip(struct_type.elements, tuple_type.types):
        align = context.get_abi_alignment(element)
        offset = -(-offset // align) * align
        fields.append((offset, member))
        offset += context.get_abi_sizeof(element)
    return context.get_abi_sizeof(struct_type), fields


def _write(packed: np.ndarray, offset: int, member, value) -> None:
    if isinstance(member, types.Array):
        address = value.__array_interface__["data"][0]
        _ARRAY_HEAD.pack_into(packed, offset, 0, 0, value.size, value.itemsize, address)
        tail = struct.Struct(f"<{2 * member.ndim}q")
        tail.pack_into(packed, offset + _ARRAY_HEAD.size, *value.shape, *value.strides)
    elif isinstance(member, types.Boolean):
        struct.pack_into("<B", packed, offset, bool(value))
    elif isinstance(member, types.Float):
        struct.pack_into("<f" if member.bitwidth == 32 else "<d", packed, offset, value)
    else:
        code = {8: "b", 16: "h", 32: "i", 64: "q"}[member.bitwidth]
        code = code if member.signed else code.upper()
        struct.pack_into("<" + code, packed, offset, value)
