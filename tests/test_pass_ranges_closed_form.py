"""The accumulator-range pass's closed forms against brute force.

`_weighted` (sum bounds from S+ = sum max(d, 0) and S- = sum min(d, 0)) and
`pair_sum_range`'s two-smallest / two-largest shortcut replaced per-term
arrays and a sort of every weight row; they must give exactly the old
numbers. Oracles: enumeration over every end of the activation range and
every subset of terms (sum and partial sums), over every pair of taps (pair
sums), and the old per-term formulas on larger random matrices. Weights are
u8 / s8 (and wider) with random zero points, activations u8 / s8, and the
rows a sort-free shortcut could get wrong: all zero, all negative, one tap,
repeated extremes, -128 / 127 / 255.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qnnjit.compiler.passes.accumulator_ranges import (
    PairSums,
    _reduce,
    _shifted,
    _terms,
    _weighted,
    accumulator_ranges,
    pair_sum_range,
)
from qnnjit.ir import Accumulator, Graph, TensorType, dtypes

CONV = {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}


def _edge_rows(dtype, k: int) -> np.ndarray:
    """Rows of `dtype` a shortcut could get wrong (k >= 1 taps each)."""
    low, high = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
    rows = [
        [0] * k,
        [low] * k,
        [high] * k,
        np.resize([low, high], k).tolist(),
        np.resize([high, low, 0], k).tolist(),
        np.resize([-1, -2, -3] if low < 0 else [1, 2, 3], k).tolist(),
        [low] + [0] * (k - 1),
        [0] * (k - 1) + [high],
    ]
    return np.array(rows, dtype=object).astype(dtype)


def _weights(rng, dtype, shape) -> np.ndarray:
    info = np.iinfo(dtype)
    w = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    return np.concatenate([w, _edge_rows(dtype, shape[1])])


def _activation_range(rng, signed: bool, zero_point: int) -> tuple[int, int]:
    """x - zx for x of an 8-bit storage type, maybe clamped (lo <= hi)."""
    lo, hi = (-128, 127) if signed else (0, 255)
    if rng.random() < 0.3:  # a clamping producer
        lo, hi = sorted(int(v) for v in rng.integers(lo, hi, 2, endpoint=True))
    return lo - zero_point, hi - zero_point


# ---- sum and partial-sum bounds ----------------------------------------------------


def _brute_bounds(lo: int, hi: int, d: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Per row: (min, max) of sum_k t_k * d_k over t in {lo, hi}^K, and of
    every partial sum (any subset of the terms, the empty one included)."""
    k = d.shape[1]
    ends = np.array(list(itertools.product([lo, hi], repeat=k)), dtype=object)  # [2^K, K]
    subsets = np.array(list(itertools.product([0, 1], repeat=k)), dtype=object)
    out = []
    for row in d.astype(object):
        terms = ends * row
        partial = terms @ subsets.T  # [assignment, subset]
        full = terms.sum(axis=1)
        out.append((min(full), max(full), partial.min(), partial.max()))
    return out


def _bounds_rows(bounds) -> list[tuple[int, int, int, int]]:
    arrays = [np.asarray(a).reshape(-1) for a in (bounds.lo, bounds.hi, bounds.plo, bounds.phi)]
    return [tuple(int(a[i]) for a in arrays) for i in range(arrays[0].size)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("w_dtype", [np.int8, np.uint8])
def test_sum_bounds_match_enumeration(seed, w_dtype):
    """Small rows, every end and subset enumerated; per-row and scalar
    zero points, u8 and s8 activations."""
    rng = np.random.default_rng(seed)
    k = 1 + seed % 5
    w = _weights(rng, w_dtype, (5, k))
    info = np.iinfo(w_dtype)
    per_row = rng.integers(info.min, info.max, (len(w), 1), endpoint=True).astype(w_dtype)
    zero_points = [np.zeros(1, w_dtype), per_row, np.array([info.max], w_dtype)]
    for zw in zero_points:
        d = _shifted(w, zw.reshape(-1, 1))
        for signed in (False, True):
            zx = int(rng.integers(-128, 127, endpoint=True)) if signed else int(rng.integers(256))
            lo, hi = _activation_range(rng, signed, zx)
            want = _brute_bounds(lo, hi, d)
            assert _bounds_rows(_weighted(lo, hi, d, axis=1)) == want
            assert _bounds_rows(_weighted(hi, lo, d, axis=1)) == want  # ends in either order


@pytest.mark.parametrize("ends", [(0, 0), (7, 7), (-5, -5), (0, 255), (-255, 0), (3, 90)])
def test_sum_bounds_degenerate_and_one_sided_ranges(ends):
    w = _weights(np.random.default_rng(1), np.int8, (4, 4))
    d = _shifted(w, np.zeros((1, 1), np.int8))
    assert _bounds_rows(_weighted(*ends, d, axis=1)) == _brute_bounds(*ends, d)


@pytest.mark.parametrize("seed", range(4))
def test_sum_bounds_equal_the_per_term_formula(seed):
    """Large K, both reduction axes (qconv's rows, qmatmul's columns of a
    batched [B, K, N] weight); the old formula in int64, as the pass ran it."""
    rng = np.random.default_rng(100 + seed)
    lo, hi = _activation_range(rng, bool(seed % 2), int(rng.integers(0, 128)))
    w = _weights(rng, np.int8, (24, 300))
    d = _shifted(w, rng.integers(-128, 128, (len(w), 1)).astype(np.int8))
    batched = rng.integers(-383, 383, (3, 70, 9), endpoint=True)
    for values, axis in [(d, 1), (d.astype(np.int64), 1), (batched, -2), (batched, -1)]:
        old = _reduce(*_terms(lo, hi, values.astype(np.int64)), axis)
        new = _weighted(lo, hi, values, axis)
        for a, b in zip((new.lo, new.hi, new.plo, new.phi), (old.lo, old.hi, old.plo, old.phi)):
            np.testing.assert_array_equal(a, b)
            assert a.shape == b.shape


def test_sum_bounds_beyond_int64_are_exact():
    """Products past 2^63 (int32-range operands) switch to Python ints."""
    d = np.array([[1 << 32, -(1 << 32), (1 << 32) - 1], [-(1 << 32)] * 3], np.int64)
    lo, hi = -(1 << 33), (1 << 33) - 1
    assert _bounds_rows(_weighted(lo, hi, d, axis=1)) == _brute_bounds(lo, hi, d)


# ---- pair sums ---------------------------------------------------------------------


def _brute_pairs(u, w: np.ndarray, adjacent: bool = False) -> PairSums:
    """min / max of u_j * w_j + u_k * w_k over u_j, u_k at the ends of u and
    every pair of taps of a row (a one-tap row: its tap, or none), or the
    packed pairs (2i, 2i+1) when `adjacent` (an odd row pads with 0)."""
    sums = []
    for row in w.astype(object).tolist():
        if len(row) == 1 and not adjacent:
            sums.append(0)
        row = row + [0] if len(row) % 2 and (adjacent or len(row) == 1) else row
        pairs = (
            [(i, i + 1) for i in range(0, len(row), 2)]
            if adjacent
            else itertools.combinations(range(len(row)), 2)
        )
        for j, k in pairs:
            sums += [uj * row[j] + uk * row[k] for uj, uk in itertools.product(u, repeat=2)]
    return PairSums(min(sums), max(sums))


U_RANGES = [(0, 255), (0, 0), (255, 255), (3, 200), (128, 128), (0, 128), (-128, 127), (-5, -1)]


@pytest.mark.parametrize("w_dtype", [np.int8, np.uint8, np.int16, np.int32])
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_pair_sums_match_enumeration(w_dtype, k):
    """Each row alone and the whole matrix, also held as int64; u < 0 and
    `adjacent` take the general path and must agree too."""
    rng = np.random.default_rng(k)
    w = _weights(rng, w_dtype, (6, k))
    for u in U_RANGES:
        assert pair_sum_range(u, w) == _brute_pairs(u, w)
        assert pair_sum_range(u, w.astype(np.int64)) == _brute_pairs(u, w)
        assert pair_sum_range(u, w, adjacent=True) == _brute_pairs(u, w, adjacent=True)
        for row in w:
            assert pair_sum_range(u, row[None]) == _brute_pairs(u, row[None])


def _sorted_pairs(u, w: np.ndarray) -> PairSums:
    """The old formulation: sort every row's per-term extremes."""
    tmin, tmax = _terms(u[0], u[1], w.astype(np.int64))
    low2 = np.sort(tmin, axis=1)[:, :2].sum(axis=1)
    high2 = np.sort(tmax, axis=1)[:, -2:].sum(axis=1)
    return PairSums(int(low2.min()), int(high2.max()))


@pytest.mark.parametrize("seed", range(4))
def test_pair_sums_equal_the_sorted_formula(seed):
    """Conv-sized rows (K = 576), the matrix and every row on its own."""
    rng = np.random.default_rng(200 + seed)
    w = _weights(rng, np.int8, (16, 576))
    for u in [(0, 255), (0, int(rng.integers(1, 256))), (int(rng.integers(0, 100)), 255)]:
        assert pair_sum_range(u, w) == _sorted_pairs(u, w)
        assert pair_sum_range(u, w.reshape(len(w), 8, 72)) == _sorted_pairs(u, w)  # [M, ...]
        for row in w:
            assert pair_sum_range(u, row[None]) == _sorted_pairs(u, row[None])


# ---- through the pass --------------------------------------------------------------


def _conv(x_dtype, w: np.ndarray, x_zp: int, w_zp: np.ndarray):
    g = Graph()
    x = g.add_input("x", TensorType(x_dtype, (1, *w.shape[1:])))
    inputs = [x, g.constant(w), g.constant(np.asarray(x_zp, x_dtype.numpy)), g.constant(w_zp)]
    node = g.add_node("qconv", inputs, CONV, name="conv")
    g.set_outputs(node.outputs)
    return g, node


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("x_dtype", [dtypes.uint8, dtypes.int8])
@pytest.mark.parametrize("w_dtype", [np.int8, np.uint8])
def test_qconv_accumulator_and_pairs_match_brute_force(seed, x_dtype, w_dtype):
    """u8 / s8 x, u8 / s8 w with per-channel zero points (one channel's zero
    point equal to all its weights: d = 0): the accumulator's range and
    width, and the int8-weight pair-sum fact, from enumeration."""
    rng = np.random.default_rng(300 + seed)
    w = _weights(rng, w_dtype, (6, 4)).reshape(-1, 1, 2, 2)
    info = np.iinfo(w_dtype)
    zw = rng.integers(info.min, info.max, len(w), endpoint=True).astype(w_dtype)
    w[0], zw[0] = w[0, 0, 0, 0], w[0, 0, 0, 0]  # d = 0 throughout
    zx = int(rng.integers(x_dtype.qmin, x_dtype.qmax, endpoint=True))
    g, node = _conv(x_dtype, w, zx, zw)
    accumulator_ranges(g)

    lo, hi = x_dtype.qmin - zx, x_dtype.qmax - zx
    rows = _brute_bounds(lo, hi, w.reshape(len(w), -1).astype(np.int64) - zw[:, None])
    plo, phi = min(r[2] for r in rows), max(r[3] for r in rows)
    bits = 16 if -(1 << 15) <= plo and phi < (1 << 15) else 32
    want = Accumulator(bits, min(r[0] for r in rows), max(r[1] for r in rows))
    assert node.outputs[0].type.accumulator == want
    shift = 128 if x_dtype.signed else 0
    pairs = node.attrs.get("i16_pairs")
    if w_dtype == np.int8:
        u = (x_dtype.qmin + shift, x_dtype.qmax + shift)
        assert pairs == _brute_pairs(u, w.reshape(len(w), -1))
    else:
        assert pairs is None  # vpmaddubsw takes s8 weights only
