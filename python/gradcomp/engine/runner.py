"""What runs a State's collectives, in one fixed order (docs/design.md, "Collective order").

On Gloo every collective of a State goes through one first-in-first-out worker thread on
private Gloo groups; on NCCL a front end issues everything from its own call, on a side
stream of the State (``run_on_side_stream``), and completes the returned future there: the
caller's stream is never blocked and the host never waits for the device. ``Runtime`` is the
one object that holds all of it for a State (the worker, the private group, the side streams,
the topology and the ranks' agreement at the first call); the State owns it, and it never
writes into the State.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import codecs
from .collectives import run_to_end
from .core import Call, Engine, GradcompError, agree, hash56
from .topology import Topology, check_contiguous_nodes, resolve_ranks_per_node

logger = logging.getLogger("gradcomp")


class GlooWorker:
    """One first-in-first-out thread per State, on a private Gloo group over the same ranks
    (made lazily, on the first bucket). It pipelines two buckets: when bucket k arrives it
    encodes it and issues its first collectives, then finishes bucket k-1 (whose bytes were
    on the wire meanwhile), so encoding overlaps the network. The order is a function of
    the bucket sequence alone (start k, finish k-1; the step's last bucket is finished at
    once), so every rank issues the same collectives in the same order."""

    def __init__(self, on_stop=None):
        self.on_stop = on_stop  # called once the thread has ended (the runtime drops its private group)
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
        if not self.thread.is_alive() and self.on_stop is not None:
            self.on_stop()

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


def live_workers() -> list[GlooWorker]:
    """The worker threads the exit handler will stop."""
    return list(_workers)


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


def numerics(device: torch.device) -> str:
    """What decides the bits of torch's QR and matrix products here (PowerSGD's replicas are
    identical only where every rank's are the same)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} sm_{props.major}{props.minor} {props.multi_processor_count} SMs, tf32 " \
                f"{torch.backends.cuda.matmul.allow_tf32}"
    else:
        where = f"cpu {torch.backends.cpu.get_cpu_capability()}"
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}"


@dataclass(frozen=True)
class Setup:
    """What the ranks agree on at the first call, and how the State's groups are made:
    ``config()`` is everything every rank must run alike (called once, when the check runs);
    ``signature`` a front end's hash of what it passes (0: none)."""

    config: Callable[[], dict]
    ranks_per_node: int | str | None
    timeout: timedelta
    signature: int = 0


class Runtime:
    """Where one State's collectives run, in one fixed order: the Gloo worker thread and its
    private group, or the CUDA side streams; the ranks' agreement at the first call, and the
    topology (node groups) it leads to. Made by the State, never collective until a reduction
    runs; a pickled or fresh State gets a new one."""

    def __init__(self):
        self.worker: GlooWorker | None = None
        self.private_group = None  # Gloo: the worker's group over the State's ranks, made by the first job
        self.topology: Topology | None = None
        self.per_node: int | None = None  # ranks_per_node as resolved at the first call
        self.checked = False  # the ranks agreed (once)
        self.side_streams: dict = {}  # CUDA: device -> the side stream

    def release(self) -> None:
        """Drops the private group and the topology's groups (the worker has stopped)."""
        self.private_group = None
        self.topology = None

    def gloo_worker(self) -> GlooWorker:
        """The worker thread, started at the first use."""
        if self.worker is None:
            self.worker = GlooWorker(on_stop=self.release)
        return self.worker

    def ready(self, group, device: torch.device, backend: str | None, engine: Engine, setup: Setup) -> Topology:
        """Once, where the collectives run: the configuration check, then the hierarchy's groups.
        The check comes first and compares the L every rank resolved, so ranks that disagree on
        the topology (or whose L does not divide the group) fail together instead of waiting for
        each other in ``new_group``. Sets the engine's seed to the one the ranks agreed on."""
        if not self.checked:
            self._agree(group, device, engine, setup)
        if self.topology is None:
            topology = Topology.of(dist.get_world_size(group), dist.get_rank(group), self.per_node)
            if topology.per_node > 1:
                topology.make_groups(dist.get_process_group_ranks(group), backend, setup.timeout)
            self.topology = topology
        return self.topology

    def _agree(self, group, device: torch.device, engine: Engine, setup: Setup) -> None:
        world = dist.get_world_size(group)
        try:
            per_node, problem = resolve_ranks_per_node(setup.ranks_per_node, world), None
        except ValueError as e:
            per_node, problem = None, e
        resolved = -2 if problem is not None else (per_node or 0)
        described = numerics(device) if isinstance(engine.codec, codecs.PowerSGD) else ""
        extra = (int(os.environ.get("GROUP_RANK", "-1")), int(os.environ.get("LOCAL_RANK", "-1")), setup.signature,
                 resolved, hash56(described.encode()))
        seed, rows = agree(group, device, setup.config(), engine.seed, extra)
        if len({r[2] for r in rows}) != 1:
            raise GradcompError("gradcomp: ranks passed different tensors to all_reduce (keys, sizes or dtypes "
                                "differ between ranks); every rank must pass the same list or dict")
        if problem is not None:
            raise problem
        if len({r[4] for r in rows}) != 1:
            raise GradcompError("gradcomp: powersgd needs every rank to orthogonalize and multiply its factors "
                                "with the same bits, and the ranks differ in torch version, thread count, CPU "
                                f"capability or GPU model (this rank: {described}); run every rank alike (e.g. "
                                "the same OMP_NUM_THREADS)")
        if len({r[3] for r in rows}) != 1:
            raise GradcompError(f"gradcomp: ranks disagree on ranks_per_node: resolved to {[r[3] for r in rows]} "
                                "by group rank (0: none); every rank must see the same node size")
        if setup.ranks_per_node == "auto" and (per_node or 1) > 1:
            check_contiguous_nodes([(r[0], r[1]) for r in rows], per_node)
        engine.seed = seed
        self.per_node = per_node
        self.checked = True

    def submit(self, engine: Engine, group, setup: Setup, make, device: torch.device, step: int, what: str,
               compress: bool, last: bool, finish=None) -> torch.futures.Future:
        """Reduces the (buffer, ordinals) pairs ``make()`` returns, in order, where the
        collectives run; ``finish()`` then gives the future's value (default: the first buffer).
        ``last``: the step's last submission (the worker finishes it at once)."""

        def exchanges(group, topology):
            pairs = make()
            for buf, ordinals in pairs:
                yield from engine.exchange(buf, ordinals, Call(group, topology, step, what, compress))
            return finish() if finish is not None else pairs[0][0]

        if device.type == "cuda":
            def on_side():
                topology = self.ready(group, device, None, engine, setup)
                engine.poll_rejections()
                return run_to_end(exchanges(group, topology))

            return run_on_side_stream(self.side_streams, device, on_side, what)

        if dist.get_world_size(group) == 1 and not compress:  # no collective: no worker thread, no private group
            fut = torch.futures.Future()
            fut.set_result(run_to_end(exchanges(group, Topology.of(1, 0, None))))
            return fut

        def job():
            if self.private_group is None:
                self.private_group = dist.new_group(ranks=dist.get_process_group_ranks(group), backend="gloo",
                                                    timeout=setup.timeout, use_local_synchronization=True)
            topology = self.ready(self.private_group, torch.device("cpu"), "gloo", engine, setup)
            return exchanges(self.private_group, topology)

        fut = torch.futures.Future()
        self.gloo_worker().submit(job, fut, what, step, last)
        return fut
