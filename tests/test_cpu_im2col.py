"""The im2col row kernels (`im2colkernels`) and the walk that calls them
(`conv_nhwc._im2col_rows`), against an im2col written in NumPy: every byte of
the A tile, for tiles that start and end mid-row, windows that cross every
border, signed activations (flipped to u8) and a pad byte unlike any code.
Likewise the tables of A row addresses that replace the tile where the
kernels read rows by address (`conv_nhwc._row_addresses`)."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest

from qnnjit.backends.cpu import im2colkernels
from qnnjit.backends.cpu.features import runnable_isas
from qnnjit.backends.cpu.kernels._conv_geometry import (
    GDH,
    GDW,
    GKH,
    GKW,
    GOH,
    GOW,
    GPH,
    GPT,
    GPW,
    GSH,
    GSW,
    GW,
)  # fmt: skip
from qnnjit.backends.cpu.kernels.conv_nhwc import _im2col_rows, _row_addresses, border_runs


def numpy_im2col(x, kernel, strides, pads, dilations, flip, pad):
    """[N*OH*OW, KH*KW*C] taps, k = (kh, kw, c): x ^ flip inside, `pad` outside."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, strides, pads, dilations
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = np.full((n, h + 2 * ph, w + 2 * pw, c), pad, np.uint8)
    padded[:, ph : ph + h, pw : pw + w] = x ^ np.uint8(flip)
    taps = [
        padded[
            :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    return np.stack(taps, axis=3).reshape(n * oh * ow, kh * kw * c), oh, ow


CASES = [
    # channels, (H, W), kernel, strides, pads, dilations
    (3, (23, 30), (3, 3), (2, 2), (1, 1), (1, 1)),  # a stem: 9-byte runs
    (3, (21, 19), (7, 7), (2, 2), (3, 3), (1, 1)),  # a 7x7 stem: 21-byte runs
    (1, (9, 12), (3, 5), (1, 2), (0, 2), (1, 1)),  # runs under 8 bytes
    (16, (8, 11), (3, 3), (1, 1), (1, 1), (2, 1)),  # vertical dilation
    (64, (7, 9), (3, 3), (1, 1), (1, 1), (1, 1)),  # 192-byte runs: 64-byte moves
    (20, (6, 7), (2, 4), (3, 1), (2, 3), (1, 1)),  # padding wider than a stride
    (5, (4, 3), (5, 5), (1, 1), (2, 2), (1, 1)),  # no pixel inside: all border
    (24, (5, 6), (3, 3), (1, 1), (3, 3), (1, 1)),  # 72-byte runs wholly in the padding
    (8, (10, 10), (3, 3), (2, 2), (1, 1), (1, 2)),  # horizontal dilation: no kernel
]


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx2"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}k{c[2][0]}x{c[2][1]}s{c[3][1]}")
@pytest.mark.parametrize("flip", [0, 0x80])
def test_im2col_rows_match_numpy(isa, case, flip):
    if isa not in runnable_isas():
        pytest.skip(reason=f"host cannot run {isa}")
    c, (h, w), kernel, strides, pads, dilations = case
    rng = np.random.default_rng(c * 1000 + kernel[1] * 10 + strides[1] + flip)
    x = rng.integers(0, 256, (2, h, w, c), dtype=np.uint8)
    pad = 0x5A  # not the flip of any zero point the test could confuse it with
    want, oh, ow = numpy_im2col(x, kernel, strides, pads, dilations, flip, pad)
    geo = np.zeros(32, np.int64)
    geo[[GKH, GKW, GSH, GSW, GPH, GPW, GDH, GDW, GOH, GOW]] = (
        *kernel, *strides, *pads, *dilations, oh, ow,
    )  # fmt: skip
    run = kernel[1] * c
    kernels = {(0, False)}  # the Numba loop
    if dilations[1] == 1 and im2colkernels.fits(isa, run):
        spec = im2colkernels.Im2colSpec(isa, kernel[0], run, strides[1] * c, flip != 0)
        kernels.add((im2colkernels.im2col_kernel(spec), spec.masked))
    K = want.shape[1]
    pixels = oh * ow
    # tiles of an odd size: they start and end at every position in a row
    tile = max(1, ow * 2 // 3 + 1)
    for n in range(2):
        for p0 in range(0, pixels, tile):
            rows = min(tile, pixels - p0)
            for kernel_address, masked in kernels:
                a = np.full((tile, K + 4), 0xEE, np.uint8)  # + 4: the K..K4 columns
                _im2col_rows(x, n, p0, rows, geo, flip, pad, kernel_address, masked, a)
                got = a[:rows, :K]
                np.testing.assert_array_equal(got, want[n * pixels + p0 : n * pixels + p0 + rows])
                assert (a[:, K:] == 0xEE).all(), "wrote past a row's K bytes"
                assert (a[rows:] == 0xEE).all(), "wrote past the tile's rows"


def _geometry(case, oh, ow):
    c, (h, w), kernel, strides, pads, dilations = case
    geo = np.zeros(32, np.int64)
    geo[[GKH, GKW, GSH, GSW, GPH, GPW, GDH, GDW, GOH, GOW, GW]] = (
        *kernel, *strides, *pads, *dilations, oh, ow, w,
    )  # fmt: skip
    return geo


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[5][1] == 1], ids=lambda c: f"c{c[0]}k{c[2][0]}x{c[2][1]}"
)
def test_row_addresses_match_numpy(case):
    """Every window row that `_row_addresses` points at holds the taps the
    NumPy im2col has there: the input's own bytes inside the image, the pad
    run above and below it, copies with pad bytes at the left and right
    borders; and the copies fit the scratch `border_runs` sizes, for tiles
    of one pixel, of odd sizes (starting and ending anywhere in a row), and
    of a whole image; every run read lies in the input, the pad run or the
    copies."""
    c, (h, w), kernel, strides, pads, dilations = case
    rng = np.random.default_rng(c * 1000 + kernel[1])
    x = rng.integers(0, 256, (2, h, w, c), dtype=np.uint8)
    pad = 0x5A
    want, oh, ow = numpy_im2col(x, kernel, strides, pads, dilations, 0, pad)
    geo = _geometry(case, oh, ow)
    run, pixels = kernel[1] * c, oh * ow
    pad_run = np.full(run, pad, np.uint8)
    for tile in sorted({1, max(1, ow * 2 // 3 + 1), pixels}):
        geo[GPT] = tile
        table = np.zeros((kernel[0], tile), np.int64)
        border = np.empty(border_runs(geo, tile) * run, np.uint8)
        buffers = [(b.ctypes.data, b.ctypes.data + b.size) for b in (x, pad_run, border)]
        for n in range(2):
            for p0 in range(0, pixels, tile):
                rows = min(tile, pixels - p0)
                used = _row_addresses(x, n, p0, rows, geo, pad_run, table.reshape(-1), border)
                assert used * run <= border.size, "more border copies than border_runs allows"
                for address in table[:, :rows].ravel():  # each run within one buffer
                    assert any(lo <= address and address + run <= hi for lo, hi in buffers)
                got = np.array([
                    [np.frombuffer((ctypes.c_uint8 * run).from_address(int(address)), np.uint8)
                     for address in table[:, i]]
                    for i in range(rows)
                ]).reshape(rows, kernel[0] * run)  # fmt: skip
                np.testing.assert_array_equal(got, want[n * pixels + p0 : n * pixels + p0 + rows])


def test_chunks_cover_each_run_exactly():
    """The moves of every run length cover [0, run) and nothing outside it."""
    for widest in im2colkernels.VECTOR_BYTES.values():
        for run in range(1, 300):
            covered = np.zeros(run + 64, bool)
            for offset, size in im2colkernels._chunks(run, widest):
                assert offset >= 0 and offset + size <= run and size <= widest
                covered[offset : offset + size] = True
            assert covered[:run].all() and not covered[run:].any()


def _between_guard_pages(nbytes: int, at_end: bool):
    """A uint8 array of `nbytes` in a readable page whose neighbours are
    inaccessible (PROT_NONE), flush against the start or (`at_end`) the end
    of the readable region: a read one byte outside it faults. Returns
    (the array, the mapping that holds it)."""
    page = mmap.PAGESIZE
    assert nbytes <= page
    region = mmap.mmap(-1, 3 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for guard in (base, base + 2 * page):
        assert libc.mprotect(guard, page, 0) == 0, ctypes.get_errno()
    offset = page + (page - nbytes if at_end else 0)
    return np.frombuffer(region, np.uint8, nbytes, offset), region


@pytest.mark.skipif(
    not im2colkernels.MASKED_ISAS & set(runnable_isas()), reason="no masked kernels here"
)
@pytest.mark.parametrize("at_end", [False, True], ids=["image-first", "image-last"])
def test_masked_kernels_never_read_outside_the_image(at_end):
    """The masked kernels' runs start before the image's first byte (left
    padding of the first row) and end past its last (right padding of the
    last row): the bytes they leave out of their loads must not be read at
    all. With the image against an inaccessible page, a read of one of
    them would crash the test."""
    (isa,) = im2colkernels.MASKED_ISAS & set(runnable_isas())
    c, (h, w), kernel, strides, pads = 3, (9, 11), (7, 7), (2, 2), (3, 3)
    rng = np.random.default_rng(7)
    flat, region = _between_guard_pages(h * w * c, at_end)
    x = flat.reshape(1, h, w, c)
    x[...] = rng.integers(0, 256, x.shape, dtype=np.uint8)
    pad = 0x5A
    want, oh, ow = numpy_im2col(x, kernel, strides, pads, (1, 1), 0, pad)
    geo = np.zeros(32, np.int64)
    geo[[GKH, GKW, GSH, GSW, GPH, GPW, GDH, GDW, GOH, GOW]] = (
        *kernel, *strides, *pads, 1, 1, oh, ow,
    )  # fmt: skip
    spec = im2colkernels.Im2colSpec(isa, kernel[0], kernel[1] * c, strides[1] * c, False)
    assert spec.masked
    a = np.full((oh * ow, want.shape[1] + 4), 0xEE, np.uint8)
    _im2col_rows(x, 0, 0, oh * ow, geo, 0, pad, im2colkernels.im2col_kernel(spec), True, a)
    np.testing.assert_array_equal(a[:, : want.shape[1]], want)
    del x, flat
    region.close()
