"""The arena a compiled model's packed GEMM weights live in
(`backends/cpu/weight_arena.py`): taken back to back, in the order the steps
run, in chunks that start on a huge-page boundary."""

from pathlib import Path

import numpy as np

import qnnjit
from qnnjit.backends.cpu import gemm, weight_arena
from qnnjit.backends.cpu.kernels._threads import recording
from qnnjit.backends.cpu.weight_arena import WeightArena, filling

DIGITS = Path(qnnjit.__file__).parent / "data" / "digits_int8.onnx"
MiB = 1 << 20


def _end(a: np.ndarray) -> int:
    return a.ctypes.data + a.nbytes


def test_arrays_are_taken_back_to_back_and_aligned():
    arena = WeightArena()
    with filling(arena) as filled:
        assert weight_arena.current() is filled is arena
        a = arena.empty((3, 7), np.int8)  # 21 bytes
        b = arena.empty((5,), np.int32)
        c = arena.empty((2, 64), np.int8)
    assert weight_arena.current() is None
    assert [x.ctypes.data % 64 for x in (a, b, c)] == [0, 0, 0]
    assert b.ctypes.data == a.ctypes.data + 64  # the next cache line after a's 21 bytes
    assert c.ctypes.data == b.ctypes.data + 64
    assert a.shape == (3, 7) and b.dtype == np.int32 and c.flags.c_contiguous
    assert len(arena.chunks) == 1 and arena.chunks[0].ctypes.data % (2 * MiB) == 0
    assert arena.nbytes == 21 + 20 + 128
    assert arena.describe() == "packed weights: 169 bytes in 1 arena chunk(s)"


def test_a_full_chunk_is_followed_by_one_twice_its_size():
    arena = WeightArena()
    first = arena.take(3 * MiB)
    second = arena.take(3 * MiB)  # no room left in the first chunk (4 MiB)
    third = arena.take(3 * MiB)  # room in the second (8 MiB)
    huge = arena.take(20 * MiB)  # more than twice the last: a chunk of its own size
    assert [c.size // MiB for c in arena.chunks] == [4, 8, 20]
    assert np.shares_memory(first, arena.chunks[0]) and np.shares_memory(second, arena.chunks[1])
    assert third.ctypes.data == _end(second) and np.shares_memory(huge, arena.chunks[2])
    for chunk in arena.chunks:
        assert chunk.ctypes.data % (2 * MiB) == 0 and not chunk.any()  # zeroed


def test_packing_inside_the_arena_gives_the_same_weights():
    rng = np.random.default_rng(0)
    b = rng.integers(-128, 128, (37, 50), dtype=np.int8)
    plain = gemm.pack_b(b, 32)
    arena = WeightArena()
    with filling(arena):
        packed = gemm.pack_b(b, 32)
    assert np.shares_memory(packed.data, arena.chunks[0])
    assert not np.shares_memory(plain.data, arena.chunks[0])
    np.testing.assert_array_equal(packed.data, plain.data)
    assert not packed.data.flags.writeable


def test_a_model_runs_on_weights_packed_in_the_order_its_steps_run():
    """The packed weights the kernel calls of a run read lie in the
    executor's arena, each right after the one the GEMM before read."""
    model = qnnjit.compile(DIGITS, num_threads=1)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    executor = model._executor
    with recording() as calls:  # every kernel call of a run, step by step
        (got,) = executor._run_steps([x])
    np.testing.assert_array_equal(got, qnnjit.compile(DIGITS, target="reference")(x))
    chunks = executor.weights.chunks
    read = [
        a
        for call in calls
        for a in call.args
        if isinstance(a, np.ndarray) and any(np.shares_memory(a, c) for c in chunks)
    ]
    gemm_steps = [s for s in executor.steps if "conv_nhwc" in s.name or "matmul_gemm" in s.name]
    assert len(read) == len(gemm_steps) == 4  # three convs and the FC
    assert read[0].ctypes.data == chunks[0].ctypes.data
    for before, after in zip(read, read[1:]):
        assert after.ctypes.data == -(-_end(before) // 64) * 64  # right after it
    assert executor.weights.describe() in model.report()
