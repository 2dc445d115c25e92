"""The Gloo worker's pipeline order and failure reporting, with plain generator jobs (the
collectives themselves are covered by the DDP tests, over real Gloo processes)."""

import pytest
import torch
from gradcomp.engine import GlooWorker, GradcompError, Runtime, live_workers


class Log:
    def __init__(self):
        self.events = []

    def job(self, k, fail_at=None, yields=True):
        def exchange():
            if fail_at == "start":
                raise ValueError(f"start {k}")
            self.events.append(f"start {k}")
            if yields:
                yield
            if fail_at == "finish":
                raise ValueError(f"finish {k}")
            self.events.append(f"finish {k}")
            return k

        return exchange


def submit(worker, log, k, step, last, **kw):
    fut = torch.futures.Future()
    worker.submit(log.job(k, **kw), fut, f"bucket {k}", step, last)
    return fut


def test_bucket_k_starts_before_bucket_k_minus_1_finishes_and_the_last_finishes_at_once():
    worker, log = GlooWorker(), Log()
    futs = [submit(worker, log, k, step=0, last=k == 2) for k in range(3)]
    assert [f.wait() for f in futs] == [0, 1, 2]
    assert log.events == ["start 0", "start 1", "finish 0", "start 2", "finish 1", "finish 2"]
    # the next step starts with nothing pending; a bucket that does not yield finishes in its start
    futs = [submit(worker, log, 3, step=1, last=False), submit(worker, log, 4, step=1, last=True, yields=False)]
    assert [f.wait() for f in futs] == [3, 4]
    assert log.events[6:] == ["start 3", "start 4", "finish 4", "finish 3"]


@pytest.mark.parametrize("where", ["start", "finish"])
def test_a_failure_fails_every_bucket_in_flight_and_all_later_ones(where):
    worker, log = GlooWorker(), Log()
    f0 = submit(worker, log, 0, step=0, last=False)
    f1 = submit(worker, log, 1, step=0, last=False, fail_at=where)
    f2 = submit(worker, log, 2, step=0, last=True)
    f3 = submit(worker, log, 3, step=1, last=True)
    error = f"bucket 1 failed: ValueError: {where} 1"
    if where == "start":
        # bucket 1 never started; bucket 0, in flight, fails with it; bucket 2 is never run
        in_flight, after = [f0, f1], [f2, f3]
    else:
        # bucket 0 finished when bucket 1 started; bucket 1's end ran after bucket 2 started
        assert f0.wait() == 0
        in_flight, after = [f1, f2], [f3]
    for fut in in_flight:
        with pytest.raises(GradcompError, match=error):
            fut.wait()
    for fut in after:
        with pytest.raises(GradcompError, match=f"not reduced: an earlier bucket failed .*{error}"):
            fut.wait()
    assert "start 3" not in log.events and ("start 2" in log.events) == (where == "finish")


def test_a_bucket_left_pending_by_an_interrupted_backward_fails_the_next_step():
    worker, log = GlooWorker(), Log()
    f0 = submit(worker, log, 0, step=0, last=False)  # the step's backward stops here
    f1 = submit(worker, log, 1, step=1, last=True)
    for fut in (f0, f1):
        with pytest.raises(GradcompError, match="bucket 0 was left unfinished when step 1 began"):
            fut.wait()
    assert log.events == ["start 0"]  # neither old averages written late nor new collectives issued


def test_stop_finishes_what_was_submitted_ends_the_thread_and_drops_the_private_group():
    runtime = Runtime()
    runtime.private_group = object()
    worker, log = runtime.gloo_worker(), Log()
    assert worker in live_workers()  # stopped by the atexit handler too
    fut = submit(worker, log, 0, step=0, last=True)
    worker.stop()
    assert fut.wait() == 0 and not worker.thread.is_alive() and runtime.private_group is None
