"""The kernels' spinning helper team: every task runs once, errors reach the
caller, and a helper that went to sleep is woken by the next call."""

import time

import numpy as np
import pytest
from numba import njit

from qnnjit.backends.cpu import spinteam


def _mark(t0, t1, hits):
    hits[t0:t1] += 1


@pytest.mark.parametrize("tasks,threads", [(1, 2), (2, 2), (7, 2), (100, 3)])
def test_every_task_runs_once(tasks, threads):
    hits = np.zeros(tasks, np.int64)
    spinteam.run_ranges_spinning(_mark, tasks, threads, hits)
    assert hits.tolist() == [1] * tasks


@pytest.mark.parametrize("threads", [2, 3])
def test_helper_errors_reach_the_caller(threads):
    """Every helper fails; the caller raises once all are done, and the team
    is in step for the next call."""

    def fail_after_first(t0, t1):
        if t0 > 0:
            raise ValueError(f"task range {t0}..{t1}")

    with pytest.raises(ValueError, match="task range"):
        spinteam.run_ranges_spinning(fail_after_first, 6, threads)
    hits = np.zeros(6, np.int64)
    spinteam.run_ranges_spinning(_mark, 6, threads, hits)
    assert hits.tolist() == [1] * 6


def test_sleeping_helper_is_woken():
    hits = np.zeros(6, np.int64)
    spinteam.run_ranges_spinning(_mark, 6, 2, hits)
    time.sleep(spinteam.SPIN_SECONDS * 20)  # long past the spin: the helper sleeps
    spinteam.run_ranges_spinning(_mark, 6, 2, hits)
    assert hits.tolist() == [2] * 6


# The compiled hand-off (`_team_call`): Numba kernels are called through
# their native entry points, GIL-free on both sides.


@njit(nogil=True)
def _mark_compiled(t0, t1, hits, scale, grid):
    rows, cols = grid.shape
    for t in range(t0, t1):
        hits[t] += 1
        if t < rows * cols:  # one element per task: threads never write the same one
            grid[t // cols, t % cols] += scale


@njit(nogil=True)
def _fail_compiled(t0, t1, hits):
    for t in range(t0, t1):
        hits[t] += 1
    if t0 > 0:
        raise ValueError("compiled range failed")


@pytest.mark.parametrize("tasks,threads", [(1, 2), (2, 2), (7, 2), (100, 3), (5, 5)])
def test_compiled_kernels_run_every_task_once(tasks, threads):
    hits = np.zeros(tasks, np.int64)
    grid = np.zeros((6, 8), np.float32)[:, ::2]  # a strided view: its own array type
    assert spinteam._native_entry(_mark_compiled, (hits, 0.5, grid)) != 0
    spinteam.run_ranges_spinning(_mark_compiled, tasks, threads, hits, 0.5, grid)
    assert hits.tolist() == [1] * tasks
    assert grid.sum() == 0.5 * min(tasks, grid.size)


def test_compiled_entry_is_per_argument_types():
    """One kernel, two argument types: each call reaches its own overload."""
    for dtype in (np.float32, np.float64, np.float32):
        hits = np.zeros(9, np.int64)
        grid = np.zeros((3, 3), dtype)
        spinteam.run_ranges_spinning(_mark_compiled, 9, 2, hits, 2.0, grid)
        assert hits.tolist() == [1] * 9 and grid.sum() == 18.0
    f32 = spinteam._native_entry(_mark_compiled, (hits, 2.0, np.zeros((3, 3), np.float32)))
    f64 = spinteam._native_entry(_mark_compiled, (hits, 2.0, np.zeros((3, 3), np.float64)))
    assert f32 and f64 and f32 != f64


@pytest.mark.parametrize("threads", [2, 3])
def test_compiled_kernel_errors_reach_the_caller(threads):
    """A Numba kernel raising in a helper: the caller re-runs the tasks, which
    raises the kernel's own exception, and the team stays in step."""
    hits = np.zeros(6, np.int64)
    with pytest.raises(ValueError, match="compiled range failed"):
        spinteam.run_ranges_spinning(_fail_compiled, 6, threads, hits)
    hits = np.zeros(6, np.int64)
    spinteam.run_ranges_spinning(_mark_compiled, 6, threads, hits, 1.0, np.zeros((2, 2)))
    assert hits.tolist() == [1] * 6


def test_sleeping_helper_is_woken_by_a_compiled_call():
    hits = np.zeros(6, np.int64)
    grid = np.zeros((2, 3))
    spinteam.run_ranges_spinning(_mark_compiled, 6, 2, hits, 1.0, grid)
    time.sleep(spinteam.SPIN_SECONDS * 20)  # long past the spin: the helper sleeps
    assert spinteam._TEAM[0].state[spinteam._SLEEPING] == 1
    spinteam.run_ranges_spinning(_mark_compiled, 6, 2, hits, 1.0, grid)
    assert hits.tolist() == [2] * 6


def test_helper_asleep_without_notice_is_woken():
    """A helper that fell asleep just as a GIL-free bump came (it cannot see
    one): the caller's wait notifies it until the work is done."""
    hits = np.zeros(4, np.int64)
    grid = np.zeros((2, 2))
    spinteam.run_ranges_spinning(_mark_compiled, 4, 2, hits, 1.0, grid)
    time.sleep(spinteam.SPIN_SECONDS * 20)
    helper = spinteam._TEAM[0]
    helper.state[spinteam._SLEEPING] = 0  # as if it had not yet said so
    spinteam.run_ranges_spinning(_mark_compiled, 4, 2, hits, 1.0, grid)
    assert hits.tolist() == [2] * 4


@njit(nogil=True)
def _mark_and_count(t0, t1, hits):
    for t in range(t0, t1):
        hits[t] += 1
    return t1 - t0


def test_kernel_returning_a_value_runs_from_python():
    """The native call discards results, so a kernel with one is called from
    Python (its result unused, as `run_tasks` never reads one)."""
    hits = np.zeros(5, np.int64)
    assert spinteam._native_entry(_mark_and_count, (hits,)) == 0
    spinteam.run_ranges_spinning(_mark_and_count, 5, 2, hits)
    assert hits.tolist() == [1] * 5
