"""The geometry of one 2-D convolution, as the int64 array the conv kernels
index (one compiled kernel serves every layer: these are run-time values)."""

from __future__ import annotations

import numpy as np

from ....ir.ops.nn import window_output_size

# geo slots (int64 array)
# GPT (output pixels per task) and GNS (column splits per task) are the
# channels-last GEMM conv's work split, set per input shape by its `prepare`.
(GN, GC, GH, GW, GG, GCG, GMG, GKH, GKW, GSH, GSW, GPH, GPW, GDH, GDW, GOH, GOW, GPT, GHP,
 GWP, GPOINT, GNS) = range(22)  # fmt: skip


def conv_geometry(x_shape, w_shape, attrs, group, tile_rows=0):
    """Shapes, window and padded-plane sizes; `GPOINT` marks a 1x1, stride-1,
    unpadded convolution (its taps are the input itself)."""
    n, c, h, w = (int(d) for d in x_shape)
    m, cg, kh, kw = w_shape
    sh, sw = attrs["strides"]
    dh, dw = attrs["dilations"]
    pt, pl, pb, pr = attrs["pads"]
    oh = window_output_size(h, kh, sh, pt, pb, dh)
    ow = window_output_size(w, kw, sw, pl, pr, dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {tuple(x_shape)} is smaller than the kernel")
    hp = max(h + pt + pb, (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + pl + pr, (ow - 1) * sw + (kw - 1) * dw + 1)
    pointwise = is_pointwise((kh, kw), attrs)
    geo = np.array(
        [n, c, h, w, group, cg, m // group, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, tile_rows,
         hp, wp, pointwise, 1],
        dtype=np.int64,
    )  # fmt: skip
    return geo


def is_pointwise(kernel_shape, attrs) -> bool:
    """A 1x1, stride-1, unpadded convolution: its taps are the input itself."""
    return (
        tuple(kernel_shape) == (1, 1)
        and tuple(attrs["strides"]) == (1, 1)
        and not any(attrs["pads"])
    )
