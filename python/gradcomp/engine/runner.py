"""What runs a State's collectives, in one fixed order (docs/design.md, "Collective order").

On Gloo every collective of a State goes through one first-in-first-out worker thread on
private Gloo groups; on NCCL a front end issues everything from its own call, on a side
stream of the State (``run_on_side_stream``), and completes the returned future there: the
caller's stream is never blocked and the host never waits for the device.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref

import torch

from ..collectives import run_to_end
from .core import GradcompError

logger = logging.getLogger("gradcomp")


class GlooWorker:
    """One first-in-first-out thread per State, on a private Gloo group over the same ranks
    (made lazily, on the first bucket). It pipelines two buckets: when bucket k arrives it
    encodes it and issues its first collectives, then finishes bucket k-1 (whose bytes were
    on the wire meanwhile), so encoding overlaps the network. The order is a function of
    the bucket sequence alone (start k, finish k-1; the step's last bucket is finished at
    once), so every rank issues the same collectives in the same order."""

    def __init__(self, state):
        self.state = state
        self.jobs: queue.Queue = queue.Queue()
        self.failure: GradcompError | None = None
        self.thread = threading.Thread(target=self._run, name="gradcomp-gloo", daemon=True)
        self.thread.start()
        _workers.add(self)

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the thread after the buckets already submitted (a bucket still waiting for
        its step's next one is left unfinished: only called at exit), then drops the private
        group, so that it is destroyed now rather than during interpreter teardown."""
        self.jobs.put(None)
        self.thread.join(timeout)
        if not self.thread.is_alive() and self.state is not None:
            self.state._private_group = None
            if hasattr(self.state, "_topo"):
                self.state._topo = None

    def submit(self, job, fut: torch.futures.Future, what: str, step: int, last: bool) -> None:
        """``job()`` returns the bucket's exchange generator; ``last``: the step's last bucket."""
        self.jobs.put((job, fut, what, step, last))

    def _fail(self, e: Exception, what: str, *futs) -> None:
        logger.error("gradcomp: %s failed", what, exc_info=e)
        msg = e.args[0] if isinstance(e, GradcompError) and e.args else f"{type(e).__name__}: {e}"
        self.failure = GradcompError(f"gradcomp: {what} failed: {msg}")
        for fut in futs:  # the group may be out of step: every bucket in flight fails with it
            if not fut.done():
                fut.set_exception(self.failure)

    def _run(self) -> None:
        pending = None  # (exchange, fut, what, step): started, its first collectives in flight
        while True:
            item = self.jobs.get()
            if item is None:  # stop()
                return
            job, fut, what, step, last = item
            if self.failure is not None:  # the group may be out of step: never run more collectives
                fut.set_exception(GradcompError(f"gradcomp: {what} not reduced: an earlier bucket failed "
                                                f"({self.failure})"))
                continue
            in_flight = [fut] + ([pending[1]] if pending else [])
            failing = what  # the bucket an exception is reported against
            try:
                if pending is not None and pending[3] != step:
                    # the previous step's backward ended early (an error the caller caught):
                    # finishing its bucket now would write old averages into a buffer DDP is
                    # filling again
                    raise GradcompError(f"{pending[2]} was left unfinished when step {step} began (that step's "
                                        "backward pass was interrupted); the hook's group is out of step")
                exchange = job()
                try:
                    next(exchange)
                    finished, result = False, None
                except StopIteration as done:
                    finished, result = True, done.value
                if pending is not None:
                    failing = pending[2]
                    pending[1].set_result(run_to_end(pending[0]))
                    failing, pending = what, None
                if finished:
                    fut.set_result(result)
                elif last:
                    fut.set_result(run_to_end(exchange))
                else:
                    pending = (exchange, fut, what, step)
            except Exception as e:  # never let the thread die: DDP would wait for these futures forever
                self._fail(e, failing, *in_flight)
                pending = None


_workers: weakref.WeakSet[GlooWorker] = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    # At exit, while torch's C++ side is still whole: a private Gloo group (and the daemon
    # thread that uses it) left to interpreter teardown aborted a process now and then with
    # "terminate called without an active exception" after all its work was done.
    for worker in list(_workers):
        worker.stop()


def run_on_side_stream(streams: dict, device: torch.device, fn, what: str) -> torch.futures.Future:
    """Runs ``fn()`` on the side stream of ``device`` (made once, kept in ``streams``), after
    the work queued so far on the current stream; returns a future completed on the side
    stream with ``fn``'s result: waiters sync to that stream, not the host."""
    side = streams.get(device)
    if side is None:
        side = streams[device] = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):
            result = fn()
            fut = torch.futures.Future(devices=[device])
            fut.set_result(result)
    except GradcompError:
        raise
    except Exception as e:
        logger.exception("gradcomp: %s failed", what)
        raise GradcompError(f"gradcomp: {what} failed: {type(e).__name__}: {e}") from e
    return fut
