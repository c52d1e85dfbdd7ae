"""Converter for ONNX Resize (opsets 13, 18 and 19), nearest and linear modes.

scales/sizes (and roi for tf_crop_and_resize) must be constants; an input
given as an empty tensor counts as absent, as exporters write it. Opset 18's
`axes` attribute is expanded: axes not listed keep scale 1 (or their size).
Cubic mode and antialiasing are not supported and say so.
"""

from __future__ import annotations

from . import converter
from ._common import axes, present, rank

_MODES = ("nearest", "linear")
_TRANSFORMS = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_crop_and_resize",
)
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _check_modes(ctx, mode, transform, nearest):
    if mode not in _MODES:
        raise ctx.error(f"mode {mode!r} is not supported (only {', '.join(_MODES)})")
    if transform not in _TRANSFORMS:
        raise ctx.error(f"coordinate_transformation_mode {transform!r} is not supported")
    if nearest not in _NEAREST:
        raise ctx.error(f"nearest_mode {nearest!r} is not supported")
    if mode == "linear" and ctx.attr("antialias", 0):
        raise ctx.error("antialiased linear resize is not supported")


def _expand(values, along, size, fill):
    """Per-axis list from values given for `along` only."""
    full = [fill] * size
    for value, a in zip(values, along, strict=True):
        full[a] = value
    return full


@converter("Resize")
def resize(ctx):
    size = rank(ctx, 0)
    mode = ctx.attr("mode", "nearest")
    transform = ctx.attr("coordinate_transformation_mode", "half_pixel")
    nearest = ctx.attr("nearest_mode", "round_prefer_floor")
    _check_modes(ctx, mode, transform, nearest)
    along = axes(ctx, ctx.attr("axes") or range(size), size)
    attrs = {
        "mode": mode,
        "coordinate_transformation_mode": transform,
        "nearest_mode": nearest,
        "axes": along,
        "keep_aspect_ratio_policy": ctx.attr("keep_aspect_ratio_policy", "stretch"),
        "extrapolation_value": float(ctx.attr("extrapolation_value", 0.0)),
        "scales": None,
        "sizes": None,
        "roi": None,
    }
    if present(ctx, 3):
        key, fill, values = "sizes", None, [int(v) for v in ctx.const(3, "sizes").reshape(-1)]
    elif present(ctx, 2):
        key, fill, values = "scales", 1.0, [float(v) for v in ctx.const(2, "scales").reshape(-1)]
    else:
        raise ctx.error("Resize needs scales or sizes")
    if len(values) != len(along) or any(v <= 0 for v in values if key == "scales"):
        raise ctx.error(f"{key} {values} do not fit axes {list(along)}")
    attrs[key] = tuple(_expand(values, along, size, fill))
    if transform == "tf_crop_and_resize":
        roi = [float(v) for v in ctx.const(1, "roi").reshape(-1)]
        half = len(roi) // 2
        starts = _expand(roi[:half], along, size, 0.0)
        ends = _expand(roi[half:], along, size, 1.0)
        attrs["roi"] = tuple(starts + ends)
    return ctx.emit("resize", [ctx.input(0)], attrs)
