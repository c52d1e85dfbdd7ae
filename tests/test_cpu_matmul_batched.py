"""qmatmul with both operands at run time (attention's Q @ K^T and P @ V) on
the CPU backend: 8-bit operands through the GEMM engine
(`matmul_batched_gemm`: b packed per batch inside the kernel, zero points
folded), bit for bit against the reference interpreter, and replayed.

Each graph feeds the qmatmul from `quantize` steps (scale 1, zero point 0:
the float inputs are the integer codes), so that the qmatmul step reads no
graph input and may be replayed (`replay.py`): the executor's warm-up records
the run, and every run after it repeats the recorded kernel calls, so each
comparison below is a replayed run on new inputs.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from qnnjit.backends.cpu.executor import CpuExecutor
from qnnjit.backends.cpu.features import runnable_isas
from qnnjit.backends.cpu.kernels import _threads, matmul
from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.ir import dtypes
from qnnjit.ir.graph import Graph
from qnnjit.ir.types import TensorType

U8, S8 = dtypes.uint8, dtypes.int8
PAIRS = [(U8, U8), (U8, S8), (S8, S8), (S8, U8)]


def codes(rng, dt, shape):
    return rng.integers(dt.qmin, dt.qmax + 1, size=shape).astype(dt.numpy)


def _quantized_input(g: Graph, name: str, dt, shape):
    """A float input quantized with scale 1 and zero point 0: its codes."""
    x = g.add_input(name, TensorType(dtypes.float32, shape))
    zero = g.constant(np.asarray(0, dt.numpy))
    return g.add_node("quantize", [x, g.constant(np.float32(1.0)), zero], {"dtype": dt}).outputs[0]


def _zero_points(rng, kind, a_dt, b_dt, m, n):
    """(za, zb) of one of the kinds the tests draw: none, 0, 128 (the middle
    of u8; s8's 0 is its middle), odd values, one per row of a / column of b."""
    if kind == "none":
        return None, None
    if kind == "zero":
        za, zb = 0, 0
    elif kind == "middle":
        za, zb = (128 if a_dt == U8 else 0), (128 if b_dt == U8 else 0)
    elif kind == "odd":
        za, zb = (131 if a_dt == U8 else -77), (3 if b_dt == U8 else 51)
    else:  # "axis"
        return codes(rng, a_dt, (m,)), codes(rng, b_dt, (n,))
    return np.asarray(za, a_dt.numpy), np.asarray(zb, b_dt.numpy)


def _graph(rng, a_dt, b_dt, a_shape, b_shape, zp_kind="odd", post=None):
    """quantize(a), quantize(b) -> qmatmul [-> requantize [-> qmul | qadd |
    lookup]]; returns the graph and the float inputs' shapes and dtypes."""
    g = Graph()
    a = _quantized_input(g, "a", a_dt, a_shape)
    b = _quantized_input(g, "b", b_dt, b_shape)
    m = 1 if len(a_shape) == 1 else a_shape[-2]
    n = 1 if len(b_shape) == 1 else b_shape[-1]
    za, zb = _zero_points(rng, zp_kind, a_dt, b_dt, m, n)
    operands = [a, b] if za is None else [a, b, g.constant(za), g.constant(zb)]
    y = g.add_node("qmatmul", operands).outputs[0]
    inputs = [(a_shape, a_dt), (b_shape, b_dt)]
    if post is not None:
        attrs = {"dtype": U8, "rounding": "half_even_float", "axis": None}
        mult, zy = g.constant(np.float32(1 / 1024)), g.constant(np.uint8(100))
        y = g.add_node("requantize", [y, mult, zy], attrs).outputs[0]
    if post in ("qmul", "qadd"):
        other = _quantized_input(g, "o", U8, y.type.shape)
        inputs.append((y.type.shape, U8))
        s = [g.constant(np.float32(v)) for v in (0.02, 0.03, 0.05)]
        z = [g.constant(np.uint8(v)) for v in (100, 7, 130)]
        rounding = "mlas" if post == "qmul" else "mlas_fma"
        y = g.add_node(post, [y, s[0], z[0], other, s[1], z[1], s[2], z[2]],
                       {"rounding": rounding}).outputs[0]  # fmt: skip
    elif post == "lookup":
        y = g.add_node("lookup", [y, g.constant(codes(rng, U8, (256,)))]).outputs[0]
    g.set_outputs([y])
    return g, inputs


def _check(g, inputs, rng, threads=1, runs=2) -> CpuExecutor:
    """Runs on new inputs (replays of the warm-up's recording) give the
    reference's bits; the qmatmul step is replayed, only the quantize steps
    (which read the graph inputs) re-run."""
    cpu, ref = CpuExecutor(g, num_threads=threads), ReferenceExecutor(g)
    for _ in range(runs):
        arrays = [codes(rng, dt, shape).astype(np.float32) for shape, dt in inputs]
        got, want = cpu.run(list(arrays)), ref.run(list(arrays))
        for x, y in zip(got, want, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
    key = tuple((a.shape, a.dtype) for a in arrays)
    (binding,) = cpu._bindings[key]
    (step,) = [s for s in cpu.steps if "matmul" in s.name]
    assert step not in binding.rerun_steps, step.name
    assert all(s.name.startswith("quantize") for s in binding.rerun_steps)
    assert binding.replayed_steps == len(cpu.steps) - len(binding.rerun_steps)
    return cpu


def _matmul_step(cpu):
    (step,) = [s for s in cpu.steps if "matmul" in s.name]
    return step


SHAPES = [
    ((2, 3, 7, 5), (2, 3, 5, 9)),  # K % 4 != 0, N under one panel
    ((13, 12), (12, 70)),  # no batch, N past a panel
    ((3, 1, 33), (3, 33, 17)),  # M = 1, K % 4 == 1
    ((1, 2, 6, 10), (3, 2, 10, 11)),  # a broadcast over b's batch
    ((3, 2, 6, 10), (1, 2, 10, 11)),  # b broadcast: packed once per thread
    ((10,), (2, 10, 7)),  # 1-D a
    ((4, 6, 9), (9,)),  # 1-D b
    ((9,), (9,)),  # 1-D both: a scalar
    ((2, 5, 1), (2, 1, 65)),  # K = 1
]


ATTENTION = [((1, 3, 197, 64), (1, 3, 64, 197)), ((1, 3, 197, 197), (1, 3, 197, 64))]


@pytest.mark.parametrize("a_dt,b_dt", PAIRS, ids=lambda d: str(d))
@pytest.mark.parametrize("zp_kind", ["none", "zero", "middle", "odd", "axis"])
def test_engine_matches_the_reference(a_dt, b_dt, zp_kind):
    rng = np.random.default_rng(len(zp_kind) * 7 + a_dt.bits + (a_dt == U8) * 2 + (b_dt == U8))
    for a_shape, b_shape in SHAPES:
        g, inputs = _graph(rng, a_dt, b_dt, a_shape, b_shape, zp_kind)
        cpu = _check(g, inputs, rng)
        assert _matmul_step(cpu).name.startswith(f"matmul_batched_gemm[{a_dt}x{b_dt}]")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("post", [None, "requantize", "qmul", "qadd", "lookup"])
def test_attention_shapes_with_epilogues(threads, post, monkeypatch):
    """ViT-Tiny's attention, 3 heads x 197 tokens x 64: Q @ K^T and P @ V,
    raw and with the fused epilogues (the tasks split over threads)."""
    if threads == 2 and numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip(reason="one core")
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(threads * 10 + len(post or ""))
    for a_shape, b_shape in ATTENTION:
        g, inputs = _graph(rng, U8, U8, a_shape, b_shape, "odd", post)
        cpu = _check(g, inputs, rng, threads)
        name = _matmul_step(cpu).name
        assert name.startswith("matmul_batched_gemm[uint8xuint8]")
        assert post is None or post in name, name


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("zp_kind", ["odd", "axis"])
def test_threads_split_batches_and_row_tiles(threads, zp_kind, monkeypatch):
    """Tasks (batch, row tile) over threads: several row tiles per batch, a
    broadcast b shared by ranges of tasks, per-row a zero points across tiles."""
    if threads == 2 and numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip(reason="one core")
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(threads + len(zp_kind))
    for a_shape, b_shape in [((3, 2, 45, 21), (1, 2, 21, 37)), ((5, 40, 8), (5, 8, 130))]:
        g, inputs = _graph(rng, S8, U8, a_shape, b_shape, zp_kind, "requantize")
        _check(g, inputs, rng, threads)


@pytest.mark.parametrize("isa", [i for i in runnable_isas() if i != runnable_isas()[0]])
def test_every_engine_path(isa, monkeypatch):
    """The other ISAs' kernels and B layouts (AVX2's "exact" kernels, the
    portable "kn" layout) on the same products."""
    monkeypatch.setenv("QNNJIT_CPU_ISA", isa)
    rng = np.random.default_rng(3)
    for a_dt, b_dt in PAIRS:
        for a_shape, b_shape in SHAPES[:5]:
            g, inputs = _graph(rng, a_dt, b_dt, a_shape, b_shape, "axis")
            _check(g, inputs, rng, runs=1)


def test_the_engine_kernel_runs_the_8_bit_products():
    """The step's recorded call is the engine's kernel (the label is not
    the only witness), and 16-bit operands keep the exact int64 kernel."""
    rng = np.random.default_rng(4)
    g, inputs = _graph(rng, S8, U8, (2, 4, 6), (2, 6, 5))
    cpu = CpuExecutor(g)
    step = _matmul_step(cpu)
    args = [codes(rng, dt, shape) for shape, dt in inputs]
    with _threads.recording() as calls:
        step.run(*args)
    assert [c.kernel for c in calls] == [matmul.matmul_batched_gemm]
    g = Graph()
    a = g.add_input("a", TensorType(dtypes.int16, (2, 4, 6)))
    b = g.add_input("b", TensorType(U8, (2, 6, 5)))
    node = g.add_node("qmatmul", [a, b, g.constant(np.int16(-300)), g.constant(np.uint8(9))])
    g.set_outputs(node.outputs)
    cpu = CpuExecutor(g)
    arrays = [codes(rng, dtypes.int16, (2, 4, 6)), codes(rng, U8, (2, 6, 5))]
    with _threads.recording() as calls:
        got = _matmul_step(cpu).run(*arrays)
    assert [c.kernel for c in calls] == [matmul.matmul_batched]
    np.testing.assert_array_equal(got[0], ReferenceExecutor(g).run(arrays)[0])


def test_constant_b_of_rank_3_is_packed_at_run_time_and_replayed():
    """A constant b the weight path cannot take (batched) goes through the
    engine too, the same array passed on every call."""
    rng = np.random.default_rng(6)
    g = Graph()
    a = _quantized_input(g, "a", U8, (2, 7, 11))
    node = g.add_node(
        "qmatmul",
        [a, g.constant(codes(rng, S8, (2, 11, 19))), g.constant(np.uint8(5)),
         g.constant(codes(rng, S8, (19,)))],
    )  # fmt: skip
    g.set_outputs(node.outputs)
    _check(g, [((2, 7, 11), U8)], rng)


def test_empty_operands():
    """K = 0 (a zero sum), and no batch at all."""
    rng = np.random.default_rng(7)
    for a_shape, b_shape in [((2, 3, 0), (2, 0, 4)), ((0, 3, 5), (1, 5, 4))]:
        g = Graph()
        a = g.add_input("a", TensorType(S8, a_shape))
        b = g.add_input("b", TensorType(U8, b_shape))
        node = g.add_node("qmatmul", [a, b, g.constant(np.int8(3)), g.constant(np.uint8(200))])
        g.set_outputs(node.outputs)
        arrays = [codes(rng, S8, a_shape), codes(rng, U8, b_shape)]
        got = CpuExecutor(g).run(list(arrays))[0]
        np.testing.assert_array_equal(got, ReferenceExecutor(g).run(list(arrays))[0])


def test_accumulator_wraps_at_large_k():
    """K = 70000 products of 255 * 127 leave int32 (the raw sum and the
    result): the engine's int32 sums and the int64 corrections wrap exactly
    as the reference's int64-then-wrap does."""
    k = 70000
    a = np.full((1, 2, k), 255, np.uint8)
    a[0, 1, ::3] = 0
    b = np.full((1, k, 3), 255, np.uint8)
    b[0, :, 1] = 0
    g = Graph()
    ai = g.add_input("a", TensorType(U8, a.shape))
    bi = g.add_input("b", TensorType(U8, b.shape))
    node = g.add_node("qmatmul", [ai, bi, g.constant(np.uint8(0)), g.constant(np.uint8(128))])
    g.set_outputs(node.outputs)
    got = CpuExecutor(g).run([a, b])[0]
    np.testing.assert_array_equal(got, ReferenceExecutor(g).run([a, b])[0])
    assert got[0, 0, 0] == np.int64(255 * 127 * k - 2**32)  # really wrapped


# ---- a constant operand of the post op (a transformer's quantized bias add) ----------


def _bias_graph(rng, b_constant, bias_shape, bias_first, scales=(0.02, 0.011, 0.025),
                zero_points=(120, 127, 118), bias=None, rows=6):  # fmt: skip
    """qmatmul (b constant: matmul_gemm; else batched) -> requantize -> qadd
    with a constant of `bias_shape` as input 0 (`bias_first`) or 3; `scales`
    and `zero_points` of (the requantized codes, the constant, the sum)."""
    g = Graph()
    a = _quantized_input(g, "a", U8, (2, rows, 12))
    inputs = [((2, rows, 12), U8)]
    if b_constant:
        b = g.constant(codes(rng, S8, (12, 20)))
    else:
        b = _quantized_input(g, "b", S8, (2, 12, 20))
        inputs.append(((2, 12, 20), S8))
    za, zb = g.constant(np.uint8(131)), g.constant(np.int8(5))
    y = g.add_node("qmatmul", [a, b, za, zb]).outputs[0]
    attrs = {"dtype": U8, "rounding": "half_even_float", "axis": None}
    rq = [y, g.constant(np.float32(1 / 700)), g.constant(np.uint8(zero_points[0]))]
    y = g.add_node("requantize", rq, attrs).outputs[0]
    bias = g.constant(codes(rng, U8, bias_shape) if bias is None else bias)
    s = [g.constant(np.float32(v)) for v in scales]
    z = [g.constant(np.uint8(v)) for v in zero_points]
    first, second = (bias, s[1], z[1]), (y, s[0], z[0])
    if not bias_first:
        first, second = second, first
    y = g.add_node("qadd", [*first, *second, s[2], z[2]], {"rounding": "mlas_fma"}).outputs[0]
    g.set_outputs([y])
    return g, inputs


@pytest.mark.parametrize("b_constant", [True, False], ids=["gemm", "batched"])
@pytest.mark.parametrize(
    "bias_shape, bias_first",
    [((20,), True), ((20,), False), ((1, 20), True), ((6, 20), False), ((1,), True),
     ((2, 6, 20), True)],
)  # fmt: skip
def test_a_constant_qadd_operand_is_fused_into_the_matmul(b_constant, bias_shape, bias_first):
    """The bias broadcast once per shape; ORT's operand order from the
    constant's own shape ((1,) first: MLAS takes the matmul's codes as A)."""
    rng = np.random.default_rng(len(bias_shape) * 2 + bias_first)
    g, inputs = _bias_graph(rng, b_constant, bias_shape, bias_first)
    cpu = _check(g, inputs, rng, runs=3)
    assert _matmul_step(cpu).name.endswith("+qadd"), _matmul_step(cpu).name


def test_a_constant_that_would_enlarge_the_result_is_not_fused():
    rng = np.random.default_rng(9)
    g, inputs = _bias_graph(rng, True, (3, 2, 6, 20), True)
    cpu = CpuExecutor(g, num_threads=1)
    assert not _matmul_step(cpu).name.endswith("+qadd")
    arrays = [codes(rng, dt, shape).astype(np.float32) for shape, dt in inputs]
    np.testing.assert_array_equal(cpu.run(arrays)[0], ReferenceExecutor(g).run(arrays)[0])


def test_the_constants_own_shape_picks_orts_operand_order():
    """A one-element constant as input 0 is ORT's per-span scalar ("scalar0"):
    MLAS takes the requantized codes as its A. With these scales the two
    orders' fused multiply-adds round apart at code 150 (bias code 170)."""
    rng = np.random.default_rng(4)
    scales, zero_points = (0.04707826, 0.04171341, 0.0051232325), (100, 219, 141)
    bias = np.array([170], np.uint8)
    g, inputs = _bias_graph(rng, True, (1,), True, scales, zero_points, bias, rows=64)
    cpu = _check(g, inputs, rng, runs=3)
    assert _matmul_step(cpu).name.endswith("+qadd")


# ---- constant b: the requantizing microkernels store the result ----------------------


def _linear_graph(rng, a_dt, k, n, rows, post, za_per_row=False, b_dt=S8, zb=0):
    """quantize(a) -> qmatmul(a, constant b) -> requantize [-> qadd with a
    run-time operand ("qadd") or a constant row ("bias")]."""
    g = Graph()
    a = _quantized_input(g, "a", a_dt, (rows, k))
    inputs = [((rows, k), a_dt)]
    b = g.constant(codes(rng, b_dt, (k, n)))
    za = (
        codes(rng, a_dt, (rows,)) if za_per_row else np.asarray(7 if a_dt == U8 else -9, a_dt.numpy)
    )
    y = g.add_node("qmatmul", [a, b, g.constant(za), g.constant(np.asarray(zb, b_dt.numpy))])
    attrs = {"dtype": U8, "rounding": "half_even_float", "axis": None}
    rq = [y.outputs[0], g.constant(np.float32(1 / 900)), g.constant(np.uint8(110))]
    y = g.add_node("requantize", rq, attrs).outputs[0]
    if post is not None:
        if post == "qadd":
            other = _quantized_input(g, "o", U8, (rows, n))
            inputs.append(((rows, n), U8))
        else:
            other = g.constant(codes(rng, U8, (n,)))
        s = [g.constant(np.float32(v)) for v in (0.02, 0.013, 0.024)]
        z = [g.constant(np.uint8(v)) for v in (110, 120, 115)]
        operands = [y, s[0], z[0], other, s[1], z[1], s[2], z[2]]
        y = g.add_node("qadd", operands, {"rounding": "mlas_fma"}).outputs[0]
    g.set_outputs([y])
    return g, inputs


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("post", [None, "qadd", "bias"])
@pytest.mark.parametrize(
    "a_dt, k, n, rows",
    [(U8, 12, 40, 37), (U8, 13, 70, 5), (S8, 12, 70, 1), (S8, 9, 33, 37)],
)  # fmt: skip
def test_a_linear_layer_requantizes_in_its_microkernels(a_dt, k, n, rows, post, threads,
                                                        monkeypatch):  # fmt: skip
    """A rows read in place (u8, K % 4 == 0) or copied flipped; the plain,
    packed and qadd kernels; one row split by columns over two threads."""
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(k * n + rows)
    g, inputs = _linear_graph(rng, a_dt, k, n, rows, post)
    cpu = _check(g, inputs, rng, threads=threads, runs=3)
    assert "(microkernels requantize:" in _matmul_step(cpu).name, _matmul_step(cpu).name


@pytest.mark.parametrize(
    "why, kwargs", [("per-row za", {"za_per_row": True}), ("u8 b, zb 3", {"b_dt": U8, "zb": 3})]
)
def test_a_per_row_term_keeps_the_int32_tile(why, kwargs):
    """A per-row za or a b zero point adds a term per row between the GEMM and
    the requantize: the int32 tile and the epilogue loop, still exact."""
    rng = np.random.default_rng(1)
    g, inputs = _linear_graph(rng, U8, 12, 40, 9, "qadd", **kwargs)
    cpu = _check(g, inputs, rng, runs=2)
    assert "microkernels" not in _matmul_step(cpu).name, why
