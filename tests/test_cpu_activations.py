"""The CPU kernels of float erf and gelu with ONNX Runtime's MLAS algorithm
(`backends/cpu/kernels/activations.py`) against the reference's NumPy
emulation (`ir/ops/activation.py` `mlas_erf`), bit for bit on every float32
region the algorithm distinguishes (a NaN's sign bit aside)."""

from __future__ import annotations

import numpy as np
import pytest

from qnnjit.backends.cpu.executor import CpuExecutor
from qnnjit.backends.cpu.kernels import _threads, activations
from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.ir import dtypes
from qnnjit.ir.graph import Graph
from qnnjit.ir.types import TensorType

F32 = np.float32


def _inputs() -> np.ndarray:
    """Random values at several scales, every region boundary of the
    algorithm and its float32 neighbours (the small/large split 0.921875, the
    clamp 3.925, where the exponential's reduction changes r), both signs,
    zeros, subnormals, infinities and NaN."""
    rng = np.random.default_rng(0)
    edges = np.array([0.921875, 3.925, 3.725, 1.0, 2.0, 0.5, 1e-3, 88.0], F32)
    around = np.concatenate([np.nextafter(edges, F32(0)), edges, np.nextafter(edges, F32(9))])
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3e38], F32)
    values = np.concatenate([
        rng.standard_normal(4000).astype(F32),
        (rng.standard_normal(2000) * 4).astype(F32),
        rng.uniform(-6, 6, 2000).astype(F32),
        np.linspace(-5, 5, 4001, dtype=F32),
        around, -around, special,
    ])  # fmt: skip
    return values.reshape(1, -1)


def _graph(op: str, attrs: dict, size: int) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, (1, size)))
    g.set_outputs(g.add_node(op, [x], attrs).outputs)
    return g


CASES = [
    ("erf", {"algorithm": "ort_mlas"}, activations.erf_flat),
    ("gelu", {"algorithm": "ort_mlas", "approximate": "none"}, activations.gelu_flat),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("op, attrs, kernel", CASES, ids=[c[0] for c in CASES])
def test_matches_the_reference_bit_for_bit(op, attrs, kernel, threads, monkeypatch):
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    x = _inputs()
    g = _graph(op, attrs, x.shape[1])
    cpu = CpuExecutor(g, num_threads=threads, warmup=False)
    assert not cpu.declined, cpu.describe()
    with _threads.recording() as calls:
        (got,) = cpu.run([x])
    assert [c.kernel for c in calls] == [kernel]
    (want,) = ReferenceExecutor(g).run([x])
    assert got.dtype == want.dtype == np.float32
    # NaN in, NaN out: its sign bit follows which operand x86 propagates, which
    # the vectorized loop may order differently (no integer result depends on it)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan) and nan.any()
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize(
    "op, attrs",
    [("erf", {"algorithm": "exact"}), ("gelu", {"algorithm": "ort_mlas", "approximate": "tanh"})],
)
def test_other_algorithms_keep_the_reference(op, attrs):
    g = _graph(op, attrs, 8)
    cpu = CpuExecutor(g, num_threads=1, warmup=False)
    assert [node.op for node, _ in cpu.declined] == [op]
    x = np.linspace(-3, 3, 8, dtype=F32).reshape(1, 8)
    np.testing.assert_array_equal(cpu.run([x])[0], ReferenceExecutor(g).run([x])[0])
