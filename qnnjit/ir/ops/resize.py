"""Resize: nearest (axis by axis) and linear (multilinear over the resized axes).

Attributes (normalized by the frontend, one entry per input axis):
- `scales` (floats) or `sizes` (ints; None keeps that input dim): exactly
  one is set; with `sizes`, `keep_aspect_ratio_policy` (stretch |
  not_larger | not_smaller) applies to the resized `axes`;
- `mode`: nearest | linear; `nearest_mode`: round_prefer_floor |
  round_prefer_ceil | floor | ceil;
- `coordinate_transformation_mode`: half_pixel | half_pixel_symmetric |
  pytorch_half_pixel | align_corners | asymmetric | tf_crop_and_resize (with
  `roi`, 2*rank floats, and `extrapolation_value`).

Coordinates are computed in float32, as ONNX Runtime does (the nearest
source index of a tie depends on it; half_pixel_symmetric finishes in float64
as ONNX Runtime's does): an output index x maps to a source coordinate by the
transformation mode, with scale = float32(out) / float32(in) when sizes are
given, and output sizes from scales are floor(float32(scale * in)). An
axis of scale 1 maps each index to itself (ONNX Runtime does not
transform it, not even under tf_crop_and_resize). Nearest rounds the coordinate by
nearest_mode and clamps it to the input. Linear interpolates between the two
neighbours of the clamped coordinate in float32, summing corner terms in
ONNX Runtime's order over the axes its kernels use, so results match it
exactly, 8-bit ones included (truncated toward zero, a C cast); NHWC 8-bit
input is the exception (ONNX Runtime switches to fixed-point weights there).
"""

from __future__ import annotations

import itertools

import numpy as np

from . import _dims, op

F32 = np.float32


def output_plan(shape, attrs) -> tuple[list[int], list]:
    """(output sizes, float32 scales) for a static input shape."""
    axes = attrs["axes"]
    if attrs.get("sizes") is None:
        scales = [F32(s) for s in attrs["scales"]]
        return [int(F32(d) * s) for d, s in zip(shape, scales, strict=True)], scales
    sizes = [d if s is None else s for s, d in zip(attrs["sizes"], shape, strict=True)]
    scales = [F32(o) / F32(d) if d else F32(1) for o, d in zip(sizes, shape, strict=True)]
    policy = attrs.get("keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        pick = min if policy == "not_larger" else max
        scale = pick(scales[a] for a in axes)
        scales = [scale if i in axes else F32(1) for i in range(len(shape))]
        sizes = [_round_half_away(scale * F32(d)) if i in axes else d for i, d in enumerate(shape)]
    return sizes, scales


def _coords(transform, out_len, in_len, scale, roi, axis):
    """Source coordinates along one axis; a scale-1 axis maps to itself."""
    if scale == 1:
        return np.arange(out_len, dtype=F32)
    rank = len(roi) // 2
    return _source_coords(transform, out_len, in_len, scale, roi[axis], roi[rank + axis])


def _round_half_away(value) -> int:
    """C's round() of a non-negative float, without the inexact `x + 0.5`."""
    base = np.floor(value)
    return int(base) + int(value - base >= 0.5)


def _source_coords(mode, out_len, in_len, scale, roi_lo, roi_hi):
    """Float32 source coordinate of each output index along one axis."""
    x = np.arange(out_len, dtype=F32)
    half = F32(0.5)
    if mode == "half_pixel":
        return (x + half) / scale - half
    if mode == "half_pixel_symmetric":
        # offset in float32, the rest in float64 (ONNX Runtime's promotion), rounded once.
        adjustment = F32(out_len) / (scale * F32(in_len))
        offset = F32(in_len) / F32(2) * (F32(1) - adjustment)
        wide = np.float64(offset) + (x.astype(np.float64) + 0.5) / np.float64(scale) - 0.5
        return wide.astype(F32)
    if mode == "pytorch_half_pixel":
        return (x + half) / scale - half if out_len > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * F32(in_len - 1) / F32(out_len - 1) if out_len > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_crop_and_resize":
        lo, hi, span = F32(roi_lo), F32(roi_hi), F32(in_len - 1)
        if out_len > 1:
            return lo * span + x * (hi - lo) * span / F32(out_len - 1)
        return np.full_like(x, F32(0.5 * (np.float64(lo) + np.float64(hi)) * np.float64(span)))
    raise ValueError(f"unknown coordinate_transformation_mode {mode!r}")


def _round_nearest(coords: np.ndarray, mode: str) -> np.ndarray:
    """Round source coordinates to an index; the fraction `coords - floor`
    is exact, so ties are decided without a float addition."""
    base = np.floor(coords)
    if mode == "floor":
        return base
    if mode == "ceil":
        return np.ceil(coords)
    fraction = coords - base
    if mode == "round_prefer_floor":
        return np.where(fraction > F32(0.5), base + 1, base)
    if mode == "round_prefer_ceil":
        return np.where(fraction >= F32(0.5), base + 1, base)
    raise ValueError(f"unknown nearest_mode {mode!r}")


def _view(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """1-D per-axis values shaped to broadcast along `axis` of a rank-`rank` array."""
    return values.reshape((1,) * axis + (values.size,) + (1,) * (rank - axis - 1))


def _nearest(x, axis, coords, nearest_mode):
    index = np.clip(_round_nearest(coords, nearest_mode), 0, x.shape[axis] - 1)
    return np.take(x, index.astype(np.intp), axis=axis)


def _linear_taps(coords: np.ndarray, in_len: int):
    """(low index, high index, low weight, high weight) of each output
    position: the coordinate clamped into the input, its two neighbours, and
    weights |c - high|, |c - low| (1/2 each where the neighbours coincide)."""
    c = np.clip(coords, F32(0), F32(in_len - 1))
    lo = np.minimum(c.astype(np.intp), in_len - 1)
    hi = np.minimum(lo + 1, in_len - 1)
    w_lo, w_hi = np.abs(c - hi.astype(F32)), np.abs(c - lo.astype(F32))
    same = lo == hi
    return lo, hi, np.where(same, F32(0.5), w_lo), np.where(same, F32(0.5), w_hi)


def _linear(x, axes, coords):
    """Multilinear interpolation over `axes` (outer to inner), summed term by
    term in float32 as ONNX Runtime's bilinear/trilinear kernels do: corners in
    order with the innermost axis fastest, each weight the product of the
    per-axis weights taken innermost first."""
    taps = {a: _linear_taps(coords[a], x.shape[a]) for a in axes}
    result = None
    for corner in itertools.product((0, 1), repeat=len(axes)):
        gathered, weight = x, None
        for axis, high in zip(reversed(axes), reversed(corner), strict=True):
            lo, hi, w_lo, w_hi = taps[axis]
            w = _view(w_hi if high else w_lo, axis, x.ndim)
            weight = w if weight is None else weight * w
            gathered = np.take(gathered, hi if high else lo, axis=axis)
        term = weight * gathered.astype(F32)
        result = term if result is None else result + term
    return result


def _linear_axes(scales) -> list[int]:
    """The axes linear mode interpolates: ONNX Runtime's choice (the last two
    of a 4-D NCHW input, the middle two of NHWC, the last three of 5-D, all of
    a 2-D or 3-D input), where a scale-1 axis still takes part (its weights
    can round differently from a plain copy); else the axes that scale."""
    rank = len(scales)
    if rank in (2, 3):
        return list(range(rank))
    if rank == 4 and scales[0] == 1 and (scales[1] == 1 or scales[3] == 1):
        return [2, 3] if scales[1] == 1 else [1, 2]
    if rank == 5 and scales[0] == 1 and scales[1] == 1:
        return [2, 3, 4]
    return [a for a in range(rank) if scales[a] != 1]


def _back_to(y: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 result to the input type: integers truncate toward zero (a C
    cast, as ONNX Runtime does), floats round to nearest even."""
    if np.issubdtype(dtype, np.integer) and y.dtype != dtype:
        info = np.iinfo(dtype)
        return np.clip(np.trunc(y), info.min, info.max).astype(dtype)
    return y.astype(dtype, copy=False)


def _symbolic_size(ctx, axis: int, dim):
    """Output size along one axis of an input with symbolic dims."""
    attrs = ctx.attrs
    sizes, scales = attrs.get("sizes"), attrs.get("scales")
    if sizes is not None:
        if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch" and axis in attrs["axes"]:
            return _dims.fresh(ctx, f"d{axis}")
        return dim if sizes[axis] is None else sizes[axis]
    if scales[axis] == 1.0:
        return dim
    if isinstance(dim, int):
        return int(F32(dim) * F32(scales[axis]))
    return _dims.fresh(ctx, f"d{axis}")


@op("resize", summary="nearest/linear resize by scales or sizes (see module doc)")
class Resize:
    def infer(ctx):
        t = ctx.type(0)
        if t.shape is None:
            raise ctx.error("resize needs an input of known rank")
        attrs = ctx.attrs
        if _dims.is_static(t.shape):
            return [t.with_shape(tuple(output_plan(t.shape, attrs)[0]))]
        return [t.with_shape(tuple(_symbolic_size(ctx, a, d) for a, d in enumerate(t.shape)))]

    def evaluate(inputs, attrs):
        x = inputs[0]
        sizes, scales = output_plan(x.shape, attrs)
        rank = x.ndim
        roi = attrs.get("roi") or (0.0,) * rank + (1.0,) * rank
        transform = attrs["coordinate_transformation_mode"]
        if all(s == 1 for s in scales):
            return [x.copy()]
        linear = attrs["mode"] == "linear"
        axes = _linear_axes(scales) if linear else [a for a in range(rank) if scales[a] != 1]
        coords = {a: _coords(transform, sizes[a], x.shape[a], scales[a], roi, a) for a in axes}
        if linear:
            y = _linear(x, axes, coords)
        else:
            y = x
            for a in axes:
                y = _nearest(y, a, coords[a], attrs["nearest_mode"])
        if transform == "tf_crop_and_resize":
            outside = np.zeros(sizes, dtype=bool)
            for a in axes:
                outside = outside | _view(
                    (coords[a] < 0) | (coords[a] > F32(x.shape[a] - 1)), a, rank
                )
            y = np.where(outside, F32(attrs["extrapolation_value"]), y)
        return [_back_to(np.asarray(y), x.dtype)]
