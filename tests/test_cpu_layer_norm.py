"""layer_norm on target="cpu" (`backends/cpu/kernels/normalize.py`) against the
reference interpreter (`ir/ops/nn.py`, `LayerNorm`), bit for bit, all three
outputs (y, mean, inv_std).

Covered: both algorithms ("ort_mlas": MLAS's lanes, fma and tails on rows of
at least 8; "two_pass": NumPy's pairwise sums, also what "ort_mlas" keeps for
shorter rows), every row length 1..40 (each n % 8 and n % 4 tail) and longer
rows (NumPy's pairwise split above 128), normalized axes other than the last
only, scale and bias broadcast to the normalized shape or given at run time,
float64 inputs and stash, one and two threads, and rows of wide dynamic range,
constant rows (variance 0) and signed zeros. Every case asserts that the kernel
ran, not the reference fallback; the replay tests that a layer_norm step is
repeated as its recorded kernel call.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from qnnjit.backends.cpu.executor import CpuExecutor
from qnnjit.backends.cpu.kernels import _threads
from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.ir import dtypes
from qnnjit.ir.graph import Graph
from qnnjit.ir.types import TensorType

ALGORITHMS = ["ort_mlas", "two_pass"]
LENGTHS = [*range(1, 41), 50, 100, 129, 192, 300, 768, 1030]
_BITS = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


def _norm_graph(shape, axis, algorithm, *, bias=True, stash="float32", x_dtype=dtypes.float32,
                scale_shape=None, bias_shape=None, runtime_params=False, seed=0):  # fmt: skip
    """x -> layer_norm -> (y, mean, inv_std); scale and bias random constants
    of the normalized shape (or the shapes given), or graph inputs."""
    rng = np.random.default_rng(seed)
    g = Graph()
    x = g.add_input("x", TensorType(x_dtype, shape))
    norm = tuple(shape[axis:])
    params = [("scale", norm if scale_shape is None else scale_shape, 0.5, 1.5)]
    if bias:
        params.append(("bias", norm if bias_shape is None else bias_shape, -2.0, 2.0))
    inputs, feeds = [x], []
    for name, pshape, lo, hi in params:
        array = rng.uniform(lo, hi, pshape).astype(x_dtype.numpy)
        if runtime_params:
            inputs.append(g.add_input(name, TensorType(x_dtype, pshape)))
            feeds.append(array)
        else:
            inputs.append(g.constant(array, name))
    attrs = {"axis": axis, "epsilon": 1e-5, "algorithm": algorithm, "stash_dtype": stash}
    node = g.add_node("layer_norm", inputs, attrs, name="ln")
    g.set_outputs(node.outputs)
    return g, feeds


def _inputs(rng, shape, dtype=np.float32):
    """Rows of wide dynamic range, mostly off-center, with some constant rows
    (a variance of exactly 0), signed zeros, and rows whose float64 mean
    depends on MLAS's lane order and width: B + 1 - B is 1 only when the
    lane holding B + 1 is float64 (2^30), or when B and -B meet first (2^60)."""
    magnitude = 10.0 ** rng.uniform(-3, 3, shape)
    x = rng.standard_normal(shape) * magnitude + rng.uniform(-50, 50)
    rows = x.reshape(-1, shape[-1]) if len(shape) else x.reshape(1, 1)
    n = rows.shape[1]
    if rows.shape[0] >= 6:
        rows[0] = 3.75
        rows[1] = -0.0
        rows[2, ::2] = 0.0
        rows[3] = rows[3] * 1e-30  # tiny: float32 subnormal squares
        if n >= 12:  # lane 0: 2^30, 1, -2^30
            rows[4, :12] = 0.0
            rows[4, [0, 4, 8]] = [2.0**30, 1.0, -(2.0**30)]
        if n >= 8:  # lanes 0, 1, 2: 2^60, 1, -2^60
            rows[5, :8] = 0.0
            rows[5, :3] = [2.0**60, 1.0, -(2.0**60)]
    return x.astype(dtype)


def _check(graph, arrays, *, threads=1) -> CpuExecutor:
    """Run `graph` on the CPU backend three times on `arrays` (plain, recorded,
    replayed) and the reference once: the same bits every time, the
    layer_norm kernel used."""
    cpu = CpuExecutor(graph, num_threads=threads)
    assert not cpu.declined, cpu.describe()
    assert all(step.name.startswith("layer_norm[") for step in cpu.steps), cpu.describe()
    want = ReferenceExecutor(graph).run(list(arrays))
    for run in range(3):
        got = cpu.run(list(arrays))
        for name, a, b in zip(("y", "mean", "inv_std"), got, want, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            bits = _BITS[a.dtype]
            np.testing.assert_array_equal(a.view(bits), b.view(bits), err_msg=f"{name} run {run}")
    return cpu


def _two_threads(monkeypatch):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip(reason="one core")
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)  # every call splits


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rows_of_every_length_give_the_reference_bits(algorithm, bias, n):
    shape = (3, 5, n)
    graph, _ = _norm_graph(shape, 2, algorithm, bias=bias, seed=n)
    cpu = _check(graph, [_inputs(np.random.default_rng(n), shape)])
    kind = "ort_mlas" if algorithm == "ort_mlas" else "two_pass"
    assert cpu.steps[0].name.startswith(f"layer_norm[{kind} float32"), cpu.steps[0].name


@pytest.mark.parametrize("n", [5, 13, 192, 300, 768])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_threads_give_the_reference_bits(monkeypatch, algorithm, n):
    _two_threads(monkeypatch)
    shape = (2, 9, n)
    graph, _ = _norm_graph(shape, 2, algorithm, seed=n)
    _check(graph, [_inputs(np.random.default_rng(n), shape)], threads=2)


@pytest.mark.parametrize(
    "shape,axis",
    [((2, 3, 4, 5), 2), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), 0), ((2, 3, 4, 5), 3),
     ((2, 3, 16, 20), 2), ((3, 1, 2), 1), ((4, 3, 2), 1), ((40,), 0), ((7, 1), 1)],
)  # fmt: skip
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_normalized_axes_other_than_the_last(algorithm, shape, axis):
    graph, _ = _norm_graph(shape, axis, algorithm, seed=sum(shape) + axis)
    _check(graph, [_inputs(np.random.default_rng(axis), shape)])


@pytest.mark.parametrize(
    "scale_shape,bias_shape",
    [((5,), (1,)), ((1, 5), (4, 5)), ((4, 1), (5,)), ((), ()), ((1, 1), (4, 1))],
)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_scale_and_bias_broadcast_to_the_normalized_shape(algorithm, scale_shape, bias_shape):
    shape = (2, 3, 4, 5)
    graph, _ = _norm_graph(shape, 2, algorithm, scale_shape=scale_shape, bias_shape=bias_shape)
    _check(graph, [_inputs(np.random.default_rng(1), shape)])


@pytest.mark.parametrize("n", [6, 20, 192])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_scale_and_bias_given_at_run_time(algorithm, n):
    shape = (4, n)
    graph, feeds = _norm_graph(shape, 1, algorithm, runtime_params=True, seed=n)
    _check(graph, [_inputs(np.random.default_rng(n), shape), *feeds])


@pytest.mark.parametrize("n", [3, 12, 37, 300])
@pytest.mark.parametrize("x_dtype", [dtypes.float32, dtypes.float64])
@pytest.mark.parametrize("stash", ["float32", "float64"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_float64_inputs_and_stash(algorithm, stash, x_dtype, n):
    """The float64 cases all take "two_pass" (MLAS is float32 only)."""
    shape = (3, 4, n)
    graph, _ = _norm_graph(shape, 2, algorithm, stash=stash, x_dtype=x_dtype, seed=n)
    cpu = _check(graph, [_inputs(np.random.default_rng(n), shape, x_dtype.numpy)])
    mlas = algorithm == "ort_mlas" and stash == "float32" and x_dtype == dtypes.float32
    assert ("ort_mlas" in cpu.steps[0].name) == mlas


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_huge_and_non_finite_values(algorithm):
    """Squares that overflow to inf (inv_std 0), and inf and NaN inputs: the
    same values (NaN where the reference has NaN; its payload may differ)."""
    shape = (4, 24)
    x = _inputs(np.random.default_rng(5), shape)
    x[0] *= 1e25
    x[1, 3] = np.inf
    x[2, 7] = np.nan
    x[3, :4] = -np.inf
    graph, _ = _norm_graph(shape, 1, algorithm)
    cpu = CpuExecutor(graph)
    assert not cpu.declined, cpu.describe()
    with np.errstate(invalid="ignore", over="ignore"):
        want = ReferenceExecutor(graph).run([x])
        for _ in range(3):
            for a, b in zip(cpu.run([x]), want, strict=True):
                np.testing.assert_array_equal(a, b)


def test_declines_what_it_does_not_reproduce():
    """float16 data, and a scale with more dimensions than the normalized
    axes (the reference broadcasts it against all of x): the reference runs
    them, listed with the reason."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float16, (2, 8)))
    scale = g.constant(np.ones(8, np.float16), "scale")
    g.set_outputs(g.add_node("layer_norm", [x, scale], {"axis": 1, "epsilon": 1e-5}).outputs)
    cpu = CpuExecutor(g)
    assert [reason for _, reason in cpu.declined] == ["float16 input (float32 and float64 only)"]

    graph, _ = _norm_graph((2, 3, 8), 2, "ort_mlas", scale_shape=(1, 1, 8), bias=False)
    cpu = CpuExecutor(graph)
    assert "more dimensions than the normalized axes" in cpu.describe()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_layer_norm_step_is_replayed(monkeypatch, threads):
    """x -> layer_norm -> layer_norm: the second step reads no graph input, so
    its recording is replayed (the first re-runs: it reads the caller's
    array); every run, on new inputs, gives the reference's bits."""
    if threads == 2:
        _two_threads(monkeypatch)
    rng = np.random.default_rng(3)
    shape = (2, 197, 192)
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, shape))
    value = x
    for k, algorithm in enumerate(ALGORITHMS):
        params = [g.constant(rng.uniform(0.5, 1.5, 192).astype(np.float32), f"s{k}"),
                  g.constant(rng.uniform(-1, 1, 192).astype(np.float32), f"b{k}")]  # fmt: skip
        attrs = {"axis": 2, "epsilon": 1e-6, "algorithm": algorithm}
        node = g.add_node("layer_norm", [value, *params], attrs, name=f"ln{k}")
        value = node.outputs[0]
    g.set_outputs([value, *node.outputs[1:]])
    cpu = CpuExecutor(g, num_threads=threads)
    assert not cpu.declined, cpu.describe()
    ref = ReferenceExecutor(g)
    for seed in range(4):
        feed = _inputs(np.random.default_rng(seed), shape)
        for a, b in zip(cpu.run([feed]), ref.run([feed]), strict=True):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    (binding,) = cpu._bindings[((shape, np.dtype(np.float32)),)]
    assert binding.replayed_steps == 2 and not binding.rerun_steps
    assert [step.name for step in binding.input_steps] == [cpu.steps[0].name]


def test_mlp_attention_model_runs_its_layer_norms_as_kernels(model_zoo):
    """The model zoo's attention block (ONNX LayerNormalization: "ort_mlas"):
    no layer_norm falls back, each is replayed, and the outputs are the
    reference's."""
    from modelzoo import all_variants, example_input

    import qnnjit

    chosen = next(v for v in all_variants() if v.name == "qdq_u8s8_pc")
    path = str(model_zoo.build("mlp_attention", chosen, dynamic_batch=True))
    cpu = qnnjit.compile(path, target="cpu", num_threads=1)
    ref = qnnjit.compile(path, target="reference")
    for seed in range(3):
        x = example_input("mlp_attention", batch=2, seed=seed)
        np.testing.assert_array_equal(cpu(x), ref(x))
    executor = cpu._executor
    assert not [n for n, _ in executor.declined if n.op == "layer_norm"], executor.describe()
    norms = [step for step in executor.steps if any(n.op == "layer_norm" for n in step.nodes)]
    # QDQ: each layer norm runs from codes to codes with its dequantize and quantize
    assert norms and all(
        step.name.startswith("dequantize+layer_norm+quantize[layer_norm[ort_mlas") for step in norms
    ), executor.describe()
    (binding,) = executor._bindings[((x.shape, x.dtype),)]
    assert not [step for step in binding.rerun_steps if step in norms]
