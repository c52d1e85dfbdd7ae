"""Channels-last (NHWC) tensors between the CPU kernels, without a layout pass.

Values keep their logical (ONNX, NCHW) shapes everywhere: in the IR, in the
executor's slots and at every kernel boundary. A kernel that computes
channels-last writes an [N, H, W, C] buffer and returns the *view*
`buffer.transpose(0, 3, 1, 2)`: an array of the logical shape [N, C, H, W]
whose memory is NHWC. So correctness never depends on who reads it:

- a channels-last kernel (`Kernel.strided_inputs`) gets the NHWC buffer back
  for free (`nhwc_bytes`: the transpose of that view is C-contiguous), so a
  chain conv -> pool -> conv -> residual add never transposes;
- every other kernel receives a C-contiguous copy (the executor makes it), and
  the NumPy fallbacks read the logical array as NumPy does;
- graph outputs are made C-contiguous before they are returned.

A transpose is paid only where a channels-last producer feeds another kind of
consumer (or the other way round), once per such edge.
"""

from __future__ import annotations

import numpy as np

from ._buffers import empty
from ._numba import U, jit

# The unsigned type of each element width: kernels see every integer tensor
# through such a view (signed codes as their two's-complement bits).
UNSIGNED = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32),
             8: np.dtype(np.uint64)}  # fmt: skip


def is_channels_last(array: np.ndarray) -> bool:
    """Is the logical [N, C, H, W] `array`'s memory channels-last (a channels-
    last kernel's output view), so that `nhwc_bytes` needs no transpose?"""
    return array.transpose(0, 2, 3, 1).flags.c_contiguous


def nhwc_bytes(array: np.ndarray) -> np.ndarray:
    """The [N, H, W, C] C-contiguous, writable unsigned view of a logical
    [N, C, H, W] array: free when its memory is already channels-last, else
    one transposing copy."""
    hwc = array.transpose(0, 2, 3, 1)
    flags = hwc.flags
    if flags.c_contiguous and flags.writeable:
        return hwc.view(UNSIGNED[hwc.dtype.itemsize])
    if array.dtype.itemsize == 1 and array.flags.c_contiguous:
        n, c, h, w = array.shape
        out = np.empty((n, h, w, c), np.uint8)
        _nchw_to_nhwc_bytes(array.view(np.uint8).reshape(n, c, h * w), out.reshape(n, h * w, c))
        return out
    return np.ascontiguousarray(hwc).view(UNSIGNED[hwc.dtype.itemsize])


@jit()
def _nchw_to_nhwc_bytes(x, out):
    """out[n, p, c] = x[n, c, p], in blocks of pixels so that both sides stay
    in cache (NumPy's byte transpose of a 3x224x224 image took 0.43 ms, this
    about a tenth of that)."""
    N, C, P = x.shape
    xf, of = x.reshape(x.size), out.reshape(out.size)
    block = 256
    for n in range(N):
        for p0 in range(0, P, block):
            width = min(P - p0, block)
            interleave(xf[(n * C) * P + p0 :], P, width, C, of[(n * P + p0) * C :])


@jit(inline=True)
def interleave(rows, stride, width, C, out):
    """out[p * C + c] = rows[c * stride + p] for p < width: C rows of codes
    interleaved into pixels. Three channels (an image) get a loop of their
    own: with C a run-time count the inner loop cost 3x more."""
    if C == 3:
        for p in range(width):
            for c in range(3):
                out[U(p * 3 + c)] = rows[U(c * stride + p)]
        return
    for p in range(width):
        for c in range(C):
            out[U(p * C + c)] = rows[U(c * stride + p)]


def nchw_view(buffer: np.ndarray) -> np.ndarray:
    """The logical [N, C, H, W] view of a channels-last [N, H, W, C] buffer."""
    return buffer.transpose(0, 3, 1, 2)


def channels_last_output(shape, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(logical [N, C, H, W] result, flat unsigned view of its NHWC memory that a
    kernel writes) for an output of logical `shape`."""
    n, c, h, w = shape
    buffer = empty((n, h, w, c), dtype)
    return nchw_view(buffer), buffer.view(UNSIGNED[buffer.dtype.itemsize]).reshape(-1)
