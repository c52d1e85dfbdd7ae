"""The pool the recorded runs draw their results from (`kernels/_buffers.py`):
a buffer is handed out again only once no live tensor uses it."""

import numpy as np

from qnnjit.backends.cpu.kernels._buffers import Pool, empty, pooled, root


def test_empty_outside_a_pool_is_a_fresh_array():
    a, b = empty((2, 3), np.int16), empty((2, 3), np.int16)
    assert a.shape == (2, 3) and a.dtype == np.int16 and a.flags.c_contiguous
    assert not np.shares_memory(a, b)


def test_results_reuse_only_the_buffers_of_dead_tensors():
    pool = Pool()
    with pooled(pool):
        a = empty((4, 100), np.int32)
        b = empty((8, 10), np.uint8)
        assert not np.shares_memory(a, b)  # both taken: each its own buffer
        pool.hold_only([a.reshape(-1)[:5]])  # a (through a view of it) stays live
        c = empty((80,), np.uint8)  # fits b's buffer, free now
        assert np.shares_memory(c, b) and not np.shares_memory(c, a)
        pool.hold_only([c])
        d = empty((2, 50), np.float32)  # a's buffer: the smallest free one that holds it
        assert np.shares_memory(d, a) and root(d) is root(a)
        e = empty((1000,), np.int64)  # too big for any: a new buffer
        assert not any(np.shares_memory(e, t) for t in (a, b))
    for t in (a, b, c, d, e):
        assert t.ctypes.data % 64 == 0 and t.flags.c_contiguous and t.flags.writeable
    assert pool.nbytes == sum(root(t).nbytes for t in (a, b, e))
    assert empty((3,), np.uint8).base is None  # outside the block: not from the pool


def test_pools_nest_and_stay_with_their_thread():
    import threading

    outer, inner = Pool(), Pool()
    seen = []
    with pooled(outer):
        with pooled(inner):
            x = empty((16,), np.uint8)
        y = empty((16,), np.uint8)
        thread = threading.Thread(target=lambda: seen.append(empty((16,), np.uint8)))
        thread.start()
        thread.join()
    assert inner.nbytes == root(x).nbytes and outer.nbytes == root(y).nbytes
    assert seen[0].base is None  # another thread's allocation is its own
