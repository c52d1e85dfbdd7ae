"""Converters for ONNX ops that map one to one onto IR ops with no attributes."""

from __future__ import annotations

from . import converter


@converter("Identity")
def identity(ctx):
    return ctx.emit("identity", [ctx.input(0)])
