"""The kernels' spinning helper team: every task runs once, errors reach the
caller, and a helper that went to sleep is woken by the next call."""

import time

import numpy as np
import pytest

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
