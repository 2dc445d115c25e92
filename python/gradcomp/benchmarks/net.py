"""``gradcomp bench net``: real DDP, FSDP2 or HSDP steps over a link of a set bandwidth, per method.

Topology: ``--nodes N`` nodes of ``--ranks-per-node L`` ranks (world N·L; ``--world W``
alone is W nodes of one rank, the default 2 × 1). Every node is its own network namespace,
holding its L ranks; ranks of a node are contiguous (node n holds ranks n·L … n·L+L−1). A
veth pair joins each node to a bridge that lives in one more namespace (nothing is added
to the host's own network); the egress of both ends of each pair is shaped with
``tc qdisc ... tbf rate R burst B latency L``, so every node sends and receives at R, like
a host with a full-duplex NIC of that speed. Gloo talks real TCP across it
(``GLOO_SOCKET_IFNAME=eth0``): all ranks of a node use its eth0 address, each with Gloo's
own ephemeral ports, so traffic between two ranks of one node goes over the namespace's
loopback (Linux routes local addresses via lo), unshaped, as between the GPUs of a host,
and only traffic between nodes crosses the shaped links.

Methods: plain all-reduce, torch's fp16 and PowerSGD hooks, gradcomp codec specs,
``node:<spec>`` (e.g. ``node:int8``): gradcomp registered with ``ranks_per_node=L``, which
reduces within each node, then across nodes (gradcomp.State's keyword), and
``diloco:<spec>:H=<n>`` (e.g. ``diloco:int8:H=20``, ``diloco:fp32:H=10``): the plain model
under gradcomp.DiLoCo, a sync every n steps (hierarchical with several ranks a node). A
DiLoCo method's warm-up and timed steps are rounded up to whole periods of n steps, and
each period's mean step is one sample of its median: its step time includes its syncs.

``--fsdp``: the model is sharded with FSDP2 instead (``fully_shard`` on each layer, then the
root, over a 1-D mesh of the world) and the methods are ``plain`` (FSDP2's own
reduce-scatter) and gradcomp codec specs (``gradcomp.fsdp.register(model, spec)``: a
compressed reduce-scatter), each optionally with ``+ag:<spec>`` (the parameter all-gather
compressed too: ``all_gather=<spec>``; ``plain+ag:int8`` the gather alone) and ``+hpz``
(``reshard_after_forward=<ranks a node>``: backward's gather inside the node).
``--hsdp`` (with ``--nodes`` and ``--ranks-per-node``): a 2-D
mesh (replicate = nodes, shard = a node's ranks), each node's ranks shard the model with
FSDP2 over its loopback; ``plain`` adds an exact all-reduce of each shard across the
nodes (``set_all_reduce_hook``), a gradcomp spec compresses that all-reduce
(``gradcomp.fsdp.register(model, spec, replicate_group=mesh)``). Under ``--fsdp`` the bytes
counted are the gradient reduction's and the parameter all-gathers' (FSDP2's own computed
as a ring's, gradcomp's counted); under ``--hsdp`` the reduction's only (the gathers stay
inside the node, the same for every method). The node's eth0 bytes include whatever crosses
nodes.

Two phases, each a fresh set of rank processes: the same links unshaped (the floor),
then shaped, repeated for ``--rounds`` rounds so that a slow spell of a shared machine hits
both. Each phase first measures the link between two nodes (node 1's first rank, rank L,
streams bytes to rank 0 over plain TCP) and a step without any communication (forward +
backward only), then times ``--steps`` DDP steps of a ``--params``-parameter MLP per method
after ``--warmup`` untimed ones. The table gives each method's median step (over all
rounds) on the shaped and the unshaped link and its ratio to the floor (plain all-reduce's
unshaped step), with the bytes rank 0 sent (gradcomp's count), the bytes a node sent to
other nodes (its eth0's tx_bytes over the timed steps, headers included; the JSON has them
per node and per rank too), the time those take at the measured rate and gradcomp's codec
time per step, which show where a step's time goes.

Needs root (namespaces and tc); it removes its namespaces on the way out, on failure and
on Ctrl-C too. Namespaces left by a run that was killed outright (SIGKILL) are removed by
the next run. A rank still running a minute after its phase's results were written (stuck
in its teardown) is killed, with a warning that shows its Python stacks; the results stand.

    gradcomp bench net [--rate 1gbit] [--world 2 | --nodes 2 --ranks-per-node 2]
                       [--methods allreduce,torch-fp16,...,node:int8] [--params 16e6]
                       [--batch 32] [--steps 10] [--warmup 5] [--out FILE]
    gradcomp bench net --fsdp [--world 2] [--methods plain,int8,int4] ...
    gradcomp bench net --hsdp --nodes 2 --ranks-per-node 2 [--methods plain,int8,int4] ...
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import gc
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from ..drivers.launch import environment_rank, worker_pythonpath
from ..drivers.methods import (
    DDP_KINDS,
    DEFAULT_METHODS,
    FSDP_DEFAULT_METHODS,
    baseline,
    fsdp_missing,
    hierarchy_missing,
    parse_methods,
    sharded_kinds,
)

MAX_NODES = 200  # addresses SUBNET.1 .. SUBNET.200
MAX_WORLD = 200

PREFIX = "gcnet"
SUBNET = "10.213.77"  # used only inside the namespaces this creates
PORT = 29500
RATE_PORT = PORT + 1
# seconds the ranks get to exit once rank 0 has written a phase's result; past that their
# Python stacks go to their logs, they are killed and the result stands (torch's Gloo
# teardown can deadlock: docs/guides/failures.md, "A hang at exit")
EXIT_GRACE_S = 60.0
UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
         "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_rate(text: str) -> float:
    """tc's rate syntax ("1gbit", "100mbit", "125mbps") in bits per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]+)\s*", text.lower())
    if not m or m.group(2) not in UNITS:
        raise ValueError(f"rate {text!r}: use a number and one of {', '.join(UNITS)} (tc's units), e.g. 1gbit")
    return float(m.group(1)) * UNITS[m.group(2)]


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")


class Namespaces:
    """The bridge namespace and one namespace a node, joined by veth pairs."""

    def __init__(self, nodes: int):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}-br"
        self.nodes = [f"{self.tag}-n{n}" for n in range(nodes)]
        self.created: list[str] = []

    @staticmethod
    def address(node: int) -> str:
        """The address of node ``node``'s eth0, shared by all its ranks."""
        return f"{SUBNET}.{node + 1}"

    def create(self) -> None:
        self._add(self.bridge)
        _run("ip", "-n", self.bridge, "link", "set", "lo", "up")
        _run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for n, ns in enumerate(self.nodes):
            self._add(ns)
            # lo carries the traffic between the node's own ranks (to its own eth0 address)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            # eth0 in the node's namespace, its peer p<n> in the bridge's: never in the host's
            _run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{n}", "netns", self.bridge)
            _run("ip", "-n", self.bridge, "link", "set", f"p{n}", "master", "br0")
            _run("ip", "-n", self.bridge, "link", "set", f"p{n}", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(n)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")

    def _add(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self.created.append(ns)

    def shape(self, rate: str, burst: str, latency: str) -> None:
        """tbf on the egress of both ends of every pair: each node sends and receives at ``rate``."""
        tbf = ("root", "tbf", "rate", rate, "burst", burst, "latency", latency)
        for n, ns in enumerate(self.nodes):
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", *tbf)
            _run("ip", "netns", "exec", self.bridge, "tc", "qdisc", "replace", "dev", f"p{n}", *tbf)

    def all_names(self) -> list[str]:
        return [self.bridge, *self.nodes]

    def unshape(self) -> None:
        for n, ns in enumerate(self.nodes):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True)  # fails when there is none: fine
            subprocess.run(["ip", "netns", "exec", self.bridge, "tc", "qdisc", "del", "dev", f"p{n}", "root"],
                           capture_output=True)

    def destroy(self) -> None:
        for ns in reversed(self.created):
            _delete_namespace(ns)
        self.created.clear()

    @staticmethod
    def remove_stale() -> list[str]:
        """Namespaces of earlier runs whose process is gone (killed with SIGKILL)."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        removed = []
        for line in out.splitlines():
            m = re.match(rf"({PREFIX}(\d+)-\S+)", line.strip())
            # ours by name but from an earlier process that had our pid, or from a dead one
            if m and (int(m.group(2)) == os.getpid() or not os.path.exists(f"/proc/{m.group(2)}")):
                _delete_namespace(m.group(1))
                removed.append(m.group(1))
        return removed


def _delete_namespace(ns: str) -> None:
    """Kills what still runs in ``ns`` (it would keep the namespace alive after its name is
    gone), then deletes it; the veth ends in it go with it, and their peers with them."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _die_with_parent() -> None:
    """In a rank, before exec: SIGKILL when the benchmark's process dies, however it dies."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _namespace_exists(ns: str) -> bool:
    return os.path.exists(f"/run/netns/{ns}") or os.path.exists(f"/var/run/netns/{ns}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gradcomp bench net", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--rate", default="1gbit", help="link rate in tc's syntax (default 1gbit)")
    p.add_argument("--burst", default="512kb", help="tbf burst (default 512kb; too small caps the rate lower)")
    p.add_argument("--latency", default="100ms", help="tbf latency: how long a packet may queue (default 100ms)")
    p.add_argument("--world", type=int, default=None,
                   help="ranks (default 2, or nodes × ranks per node); alone: that many nodes of one rank")
    p.add_argument("--nodes", type=int, default=None,
                   help="nodes, each its own namespace behind its own shaped link (default: world / ranks per node)")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="ranks a node, joined by its unshaped loopback (default 1)")
    p.add_argument("--methods", default=None,
                   help=f"default {','.join(DEFAULT_METHODS)}; with --fsdp or --hsdp {','.join(FSDP_DEFAULT_METHODS)}")
    sharding = p.add_mutually_exclusive_group()
    sharding.add_argument("--fsdp", action="store_true",
                          help="shard the model with FSDP2 (fully_shard) over all ranks instead of DDP; methods: "
                               "plain (FSDP2's reduce-scatter) and gradcomp codec specs, each with +ag:<spec> (the "
                               "parameter all-gather compressed too) and +hpz (backward's gather inside the node)")
    sharding.add_argument("--hsdp", action="store_true",
                          help="HSDP: FSDP2 within each node, replicas across nodes (needs --nodes and "
                               "--ranks-per-node); methods: plain (exact replica all-reduce) and gradcomp codec specs")
    p.add_argument("--params", type=float, default=16e6,
                   help="model size: an MLP of 4 square layers with about this many parameters (default 16e6)")
    p.add_argument("--batch", type=int, default=32, help="batch per rank (default 32)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method and link (default 10)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of (unshaped, shaped); medians are over the steps of all rounds (default 2)")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's bucket cap (default 25, DDP's own)")
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / world)")
    p.add_argument("--no-unshaped", action="store_true", help="skip the unshaped phase (no floor, no ratios)")
    p.add_argument("--out", default=None,
                   help="JSON output (default net-<rate>-w<world>.json, net-<rate>-n<nodes>x<ranks per node>.json "
                        "with several ranks a node)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a phase may take (default 1800)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a rank, given its JSON config
    args = p.parse_args(argv)
    if args.worker:
        return args
    args.mode = "hsdp" if args.hsdp else "fsdp" if args.fsdp else "ddp"
    try:
        if args.mode == "ddp":
            args.methods = parse_methods(args.methods or ",".join(DEFAULT_METHODS), DDP_KINDS)
        else:
            args.methods = parse_methods(args.methods or ",".join(FSDP_DEFAULT_METHODS), sharded_kinds(args.mode))
        args.rate_bps = parse_rate(args.rate)
    except ValueError as e:
        p.error(str(e))
    if args.mode == "hsdp" and (args.ranks_per_node is None or (args.nodes is None and args.world is None)):
        p.error("--hsdp needs --nodes N and --ranks-per-node L: FSDP2 shards over a node's L ranks, "
                "the N nodes hold replicas")
    _topology(p, args)
    if args.mode == "hsdp" and args.ranks_per_node < 2:
        p.error("--hsdp needs --ranks-per-node >= 2: a node's ranks are what FSDP2 shards over")
    for name in ("batch", "steps", "powersgd_rank", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rate_bps <= 0:
        p.error("--rate must be above 0")
    if args.params < 64:
        p.error("--params must be >= 64")
    if args.threads < 0:
        p.error("--threads must be >= 0 (0: cores / world)")
    if args.bucket_cap_mb <= 0 or args.timeout <= 0:
        p.error("--bucket-cap-mb and --timeout must be above 0")
    if args.warmup < 3:
        p.error("--warmup must be >= 3 (DDP rebuilds its buckets after its first step; PowerSGD starts at the third)")
    return args


def _topology(p, args) -> None:
    """Sets args.world, args.nodes and args.ranks_per_node from whichever of them were given."""
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        p.error("--ranks-per-node must be >= 1")
    if args.nodes is not None and args.nodes < 2:
        p.error("--nodes must be >= 2: a link needs two ends")
    if args.world is not None and args.world < 2:
        p.error("--world must be >= 2: a link needs two ends")
    per_node = args.ranks_per_node or 1
    if args.nodes is None:
        world = 2 * per_node if args.world is None else args.world
        if world % per_node:
            p.error(f"--world {world} is not a multiple of --ranks-per-node {per_node}")
        args.nodes = world // per_node
        if args.nodes < 2:
            p.error(f"--world {world} with --ranks-per-node {per_node} is one node: a link needs two ends")
    elif args.world is not None and args.world != args.nodes * per_node:
        p.error(f"--world {args.world} is not --nodes × --ranks-per-node = {args.nodes} × {per_node} "
                f"= {args.nodes * per_node} (give either)")
    args.ranks_per_node = per_node
    args.world = args.nodes * per_node
    if args.nodes > MAX_NODES:
        p.error(f"--nodes (or --world) must be <= {MAX_NODES}")
    if args.world > MAX_WORLD:
        p.error(f"the world (nodes × ranks per node) must be <= {MAX_WORLD}")


def topology_name(args) -> str:
    """"w4" for 4 nodes of one rank, "n2x2" for 2 nodes of 2: the default output's tag."""
    return f"w{args.world}" if args.ranks_per_node == 1 else f"n{args.nodes}x{args.ranks_per_node}"


def output_name(args) -> str:
    """The default output's name: net-<rate>-<topology>.json, the mode before the topology
    under FSDP2 or HSDP (net-1gbit-fsdp-w2.json, net-1gbit-hsdp-n2x2.json)."""
    mode = getattr(args, "mode", "ddp")
    return f"net-{args.rate}-" + ("" if mode == "ddp" else f"{mode}-") + f"{topology_name(args)}.json"


def main(argv=None, out_dir: str = ".") -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if os.geteuid() != 0:
        print("gradcomp bench net: needs root, to create network namespaces and shape links with tc; "
              "nothing was done (run it as root, e.g. sudo $(which gradcomp) bench net ...)", file=sys.stderr)
        return 1
    unsupported = hierarchy_missing(args.methods) if args.mode == "ddp" else fsdp_missing(args.mode)
    if unsupported:  # before any namespace and minutes of the other methods
        print(f"gradcomp bench net: {unsupported}; nothing was done", file=sys.stderr)
        return 1
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        print(f"gradcomp bench net: needs iproute2's {' and '.join(missing)} on PATH", file=sys.stderr)
        return 1
    out = args.out or os.path.join(out_dir, output_name(args))
    out_folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_folder, exist_ok=True)
    if not os.access(out_folder, os.W_OK):  # before minutes of measuring, not after
        print(f"gradcomp bench net: cannot write {out}", file=sys.stderr)
        return 1
    stale = Namespaces.remove_stale()
    if stale:
        print(f"removed namespaces left by an earlier killed run: {', '.join(stale)}")

    netns = Namespaces(args.nodes)
    old_handlers = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    workdir = tempfile.mkdtemp(prefix="gradcomp-bench-net-")
    try:
        netns.create()
        runs = {"unshaped": [], "shaped": []}
        # rounds alternate the two links, so a slow spell of a shared machine hits both
        for round_ in range(args.rounds):
            for phase in ([] if args.no_unshaped else ["unshaped"]) + ["shaped"]:
                if phase == "shaped":
                    netns.shape(args.rate, args.burst, args.latency)
                else:
                    netns.unshape()
                print(f"== round {round_ + 1}/{args.rounds}, {phase} link"
                      + (f": tbf rate {args.rate} burst {args.burst} latency {args.latency}"
                         if phase == "shaped" else ""), flush=True)
                runs[phase].append(_run_phase(netns, args, phase, workdir, round_))
        result = _summarize(args, {phase: _merge(r) for phase, r in runs.items() if r}, runs)
    except KeyboardInterrupt:
        failure, status = "interrupted", 130
    except (RuntimeError, TimeoutError) as e:
        failure, status = str(e), 1
    else:
        failure, status = None, 0
    finally:
        # a second Ctrl-C must not cut the clean-up short
        cleanup_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in cleanup_signals}
        netns.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in {**saved, **old_handlers}.items():
            signal.signal(sig, handler)
    if failure is not None:
        left = [ns for ns in netns.all_names() if _namespace_exists(ns)]
        print(f"\ngradcomp bench net: {failure}; " + (f"namespaces NOT removed: {', '.join(left)}" if left
                                                      else "namespaces removed"), file=sys.stderr)
        return status
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


def _run_phase(netns: Namespaces, args, phase: str, workdir: str, round_: int) -> dict:
    """Runs one set of rank processes in the namespaces; returns rank 0's measurements."""
    phase_tag = f"{phase}{round_}"
    result_path = os.path.join(workdir, f"{phase_tag}.json")
    config = {k: getattr(args, k) for k in ("world", "nodes", "ranks_per_node", "methods", "params", "batch",
                                            "steps", "warmup", "bucket_cap_mb", "powersgd_rank", "threads",
                                            "rate_bps", "mode")}
    config.update(phase=phase, result=result_path, master=netns.address(0))
    config_path = os.path.join(workdir, f"{phase_tag}-config.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    procs, logs = [], []
    try:
        per_node = args.ranks_per_node
        for r in range(args.world):
            # contiguous ranks a node; all of them on the node's eth0 address, Gloo's ports their own
            ns = netns.nodes[r // per_node]
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.world), LOCAL_RANK=str(r % per_node),
                       LOCAL_WORLD_SIZE=str(per_node), GROUP_RANK=str(r // per_node),
                       MASTER_ADDR=netns.address(0), MASTER_PORT=str(PORT), GLOO_SOCKET_IFNAME="eth0",
                       PYTHONUNBUFFERED="1", PYTHONPATH=worker_pythonpath())
            log = open(os.path.join(workdir, f"{phase_tag}-rank{r}.log"), "w")  # closed in the finally below
            logs.append(log)
            # rank 0 prints progress here; every rank's output is also in its log for errors
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "gradcomp.benchmarks.net", "--worker", config_path]
            procs.append(subprocess.Popen(cmd, env=env, stdout=None if r == 0 else log, stderr=log,
                                          start_new_session=True, preexec_fn=_die_with_parent))
        return _wait_for_ranks(procs, [log.name for log in logs], result_path, phase, args.timeout)
    finally:
        for p in procs:  # on failure or Ctrl-C: the ranks run in their own sessions
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
        for log in logs:
            log.close()


def _wait_for_ranks(procs: list, log_paths: list[str], result_path: str, phase: str, timeout: float,
                    grace: float = EXIT_GRACE_S) -> dict:
    """Waits for a phase's ranks and returns rank 0's result: raises if one fails or the
    phase outlasts ``timeout`` s; ranks still running ``grace`` s after the result was
    written (stuck in their teardown) leave their stacks in their logs and the result
    stands, with a warning (the caller kills them)."""
    deadline = time.monotonic() + timeout
    result_since = None  # when rank 0's result appeared
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            raise RuntimeError(f"{phase} phase: rank {failed[0]} exited with {codes[failed[0]]}:\n"
                               + _tail(log_paths[failed[0]]))
        if None not in codes:
            break
        if result_since is None and os.path.exists(result_path):
            result_since = time.monotonic()
        if result_since is not None and time.monotonic() - result_since > grace:
            stuck = [r for r, code in enumerate(codes) if code is None]
            _dump_stacks([procs[r] for r in stuck])
            print(f"gradcomp bench net: {phase} phase: rank(s) {', '.join(map(str, stuck))} had not exited "
                  f"{grace:.0f} s after the results were written; they are killed and the results stand. "
                  f"Rank {stuck[0]}'s log, its stacks last:\n{_tail(log_paths[stuck[0]], 60)}",
                  file=sys.stderr, flush=True)
            break
        if time.monotonic() > deadline:
            _dump_stacks(procs)
            raise TimeoutError(f"{phase} phase took over {timeout:.0f} s; rank 1's log, its stacks last:\n"
                               + _tail(log_paths[min(1, len(log_paths) - 1)], 60))
        time.sleep(0.2)
    with open(result_path) as f:
        return json.load(f)


def _dump_stacks(procs) -> None:
    """Has each rank still running write its threads' Python stacks to its log (the
    ranks' faulthandler answers SIGUSR1), and gives them a moment to."""
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
    time.sleep(1.0)


def _tail(path: str, lines: int = 25) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _merge(runs: list[dict]) -> dict:
    """One phase's rounds as one: the medians over every timed step of every round."""
    merged = dict(runs[-1])
    merged["link_bps"] = statistics.median(r["link_bps"] for r in runs)
    merged["compute_ms"] = statistics.median(r["compute_ms"] for r in runs)
    merged["methods"] = {}
    for method in runs[0]["methods"]:
        ms = [r["methods"][method] for r in runs]
        steps = [t for m in ms for t in m["steps_ms"]]
        merged["methods"][method] = {
            "step_ms": statistics.median(steps), "steps_ms": steps,
            "bytes_per_step": statistics.fmean(m["bytes_per_step"] for m in ms),
            "eth0_tx_bytes_per_step": statistics.fmean(m["eth0_tx_bytes_per_step"] for m in ms),
            "node_tx_bytes_per_step": [statistics.fmean(node) for node in zip(*(m["node_tx_bytes_per_step"]
                                                                               for m in ms))],
            "node_lo_tx_bytes_per_step": [statistics.fmean(node) for node in zip(*(m["node_lo_tx_bytes_per_step"]
                                                                                  for m in ms))],
            "codec_ms_per_step": statistics.fmean(m["codec_ms_per_step"] for m in ms),
            "round_medians_ms": [m["step_ms"] for m in ms],
        }
        for key in (*SPLIT_STATS, "allgather_bytes"):
            if all(f"{key}_per_step" in m for m in ms):
                merged["methods"][method][f"{key}_per_step"] = statistics.fmean(m[f"{key}_per_step"] for m in ms)
        if all("compression_ratio" in m for m in ms):
            merged["methods"][method]["compression_ratio"] = statistics.fmean(m["compression_ratio"] for m in ms)
    return merged


def _summarize(args, phases: dict, runs: dict) -> dict:
    shaped = phases["shaped"]
    unshaped = phases.get("unshaped")
    mode = getattr(args, "mode", "ddp")
    base = baseline(mode)
    floor = unshaped["methods"][base]["step_ms"] if unshaped and base in unshaped["methods"] else None
    rate = shaped["link_bps"]
    print()
    per_node = args.ranks_per_node
    topology = f"{args.world} ranks" if per_node == 1 else \
        f"{args.world} ranks ({args.nodes} nodes × {per_node} ranks)"
    print(f"gradcomp bench net ({MODE_TEXT[mode]}): {topology}, MLP of {shaped['parameters'] / 1e6:.1f} M "
          f"parameters, batch {args.batch} per rank, {shaped['threads']} thread(s) a rank, median of "
          f"{args.rounds} × {args.steps} steps")
    print(f"link{' between nodes' if per_node > 1 else ''}: tbf rate {args.rate} burst {args.burst}: "
          f"measured {rate / 1e9:.3f} Gbit/s"
          + (f"; unshaped {unshaped['link_bps'] / 1e9:.2f} Gbit/s" if unshaped else ""))
    print(f"step without communication: {shaped['compute_ms']:.0f} ms"
          + (f"; floor ({FLOOR_TEXT[mode]}, unshaped link): {floor:.0f} ms" if floor else ""))
    print(f"{'method':<16} {'shaped ms':>9} {'unshaped':>9} {'x floor':>8} {'x own':>6} {'MB sent':>8} "
          f"{'node MB':>8} " + (f"{'MB/rank':>8} " if per_node > 1 else "") + f"{'wire ms':>8} {'codec ms':>8}")
    rows = {}
    for method, s in shaped["methods"].items():
        u = unshaped["methods"].get(method) if unshaped else None
        inter = statistics.fmean(s["node_tx_bytes_per_step"])  # what a node sent to the others, mean over nodes
        inter_wire_ms = 1e3 * inter * 8 / rate
        row = {"shaped_step_ms": s["step_ms"], "unshaped_step_ms": u["step_ms"] if u else None,
               "ratio_to_floor": s["step_ms"] / floor if floor else None,
               "ratio_to_own_unshaped": s["step_ms"] / u["step_ms"] if u else None,
               "bytes_per_step": s["bytes_per_step"], "eth0_tx_bytes_per_step": s["eth0_tx_bytes_per_step"],
               "node_tx_bytes_per_step": s["node_tx_bytes_per_step"],
               "inter_node_bytes_per_step": inter, "inter_node_bytes_per_rank_per_step": inter / per_node,
               # what a node's ranks sent each other over its loopback, mean over nodes
               "node_lo_tx_bytes_per_step": s["node_lo_tx_bytes_per_step"],
               "intra_node_bytes_per_step": statistics.fmean(s["node_lo_tx_bytes_per_step"]),
               "wire_ms_at_measured_rate": 1e3 * s["bytes_per_step"] * 8 / rate,
               "inter_node_wire_ms_at_measured_rate": inter_wire_ms,
               "codec_ms_per_step": s["codec_ms_per_step"],
               "shaped_steps_ms": s["steps_ms"], "unshaped_steps_ms": u["steps_ms"] if u else None,
               "shaped_round_medians_ms": s["round_medians_ms"],
               "unshaped_round_medians_ms": u["round_medians_ms"] if u else None}
        for key in (*SPLIT_STATS, "allgather_bytes"):  # gradcomp's own split, where its State counts it
            if f"{key}_per_step" in s:
                row[f"{key}_per_step"] = s[f"{key}_per_step"]
        if "compression_ratio" in s:
            row["compression_ratio"] = s["compression_ratio"]
        rows[method] = row

        def fmt(v, spec, width, unit=""):
            return format(v, spec) + unit if v is not None else "-".rjust(width)

        print(f"{method:<16} {s['step_ms']:>9.0f} {fmt(row['unshaped_step_ms'], '>9.0f', 9)} "
              f"{fmt(row['ratio_to_floor'], '>7.2f', 8, 'x')} {fmt(row['ratio_to_own_unshaped'], '>5.2f', 6, 'x')} "
              f"{s['bytes_per_step'] / 1e6:>8.2f} {inter / 1e6:>8.2f} "
              + (f"{inter / per_node / 1e6:>8.2f} " if per_node > 1 else "")
              + f"{inter_wire_ms:>8.0f} {s['codec_ms_per_step']:>8.0f}")
    print(f"(x floor: shaped step / {FLOOR_TEXT[mode]}'s unshaped step; x own: shaped / the method's unshaped step; "
          "MB sent: what rank 0 sent a step, counted"
          + (", to its own node's ranks too" if per_node > 1 else "")
          + ("" if mode == "ddp" else f", {BYTES_TEXT[mode]} ({GLOO_RS_TEXT})")
          + "; node MB: what a node's eth0 sent to the other nodes a step, headers included, mean over nodes"
          + ("" if mode != "fsdp" else ", FSDP2's all-gathers included")
          + ("; MB/rank: node MB / ranks a node" if per_node > 1 else "")
          + "; wire ms: node MB at the measured rate; codec ms: gradcomp's encode + decode, wall time)")
    return {
        "meta": {"mode": mode, "baseline": base,
                 "bytes_counted": "gradient reduction only" if mode == "ddp" else BYTES_TEXT[mode],
                 **({} if mode == "ddp" else {"note": GLOO_RS_TEXT}),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "host": platform.node(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                 "python": platform.python_version(), "argv": sys.argv[1:], "rate": args.rate, "burst": args.burst,
                 "latency": args.latency, "world": args.world, "nodes": args.nodes,
                 "ranks_per_node": args.ranks_per_node, "batch_per_rank": args.batch, "steps": args.steps,
                 "warmup": args.warmup, "rounds": args.rounds, "bucket_cap_mb": args.bucket_cap_mb,
                 "statistic": "median",
                 "link_bps_shaped": rate, "link_bps_unshaped": unshaped["link_bps"] if unshaped else None,
                 "floor_ms": floor, "compute_ms_shaped_phase": shaped["compute_ms"],
                 "compute_ms_unshaped_phase": unshaped["compute_ms"] if unshaped else None,
                 **{k: shaped[k] for k in ("parameters", "layers", "width", "threads", "torch", "gradcomp")}},
        "methods": rows,
        "rounds": runs,
    }


MODE_TEXT = {"ddp": "DDP", "fsdp": "FSDP2, fully_shard over all ranks",
             "hsdp": "HSDP, FSDP2 within a node, replicas across nodes"}
FLOOR_TEXT = {"ddp": "plain all-reduce", "fsdp": "plain: FSDP2's own reduce-scatter",
              "hsdp": "plain: FSDP2's reduce-scatter + exact replica all-reduce"}
BYTES_TEXT = {"fsdp": "gradient reduction and parameter all-gathers (FSDP2's own counted as a ring's)",
              "hsdp": "gradient reduction only (FSDP2's parameter all-gathers stay inside the node, the same for "
                      "every method, and are not counted)"}
GLOO_RS_TEXT = ("plain's reduce-scatter is counted as a ring's, (W-1)/W of the gradient; torch's Gloo (2.13 at least) "
                "sends an all-reduce's 2(W-1)/W for a reduce_scatter_tensor, which the measured eth0 / lo bytes and "
                "the step times show; gradcomp's reduce-scatter is its own all-to-all")


def _cpu_name() -> str:
    import torch

    from .kernels import device_name

    return device_name(torch.device("cpu"))


# ---- inside a namespace: one rank ------------------------------------------------------


def _measure_link(rank: int, master: str, nbytes: int, sender: int = 1) -> float | None:
    """Rank ``sender`` (the first rank of node 1: another node than rank 0's) streams
    ``nbytes`` to rank 0 over plain TCP; rank 0 returns the bits per second from the first
    byte to the last (others return None)."""
    if rank == 0:
        with socket.create_server((master, RATE_PORT)) as server:
            server.settimeout(120)
            conn, _ = server.accept()
            with conn:
                buf = bytearray(1 << 20)
                got = first = conn.recv_into(buf)
                t0 = time.perf_counter()
                while got < nbytes:
                    n = conn.recv_into(buf)
                    if n == 0:
                        raise RuntimeError("the link measurement's sender closed early")
                    got += n
                elapsed = time.perf_counter() - t0
                conn.sendall(b"k")
        return 8 * (nbytes - first) / max(elapsed, 1e-9)
    if rank == sender:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection((master, RATE_PORT), timeout=120)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with conn:
            chunk = bytes(1 << 20)
            sent = 0
            while sent < nbytes:
                conn.sendall(chunk[: min(len(chunk), nbytes - sent)])
                sent += min(len(chunk), nbytes - sent)
            conn.recv(1)
    return None


def _tx_bytes(dev: str = "eth0") -> int:
    """Bytes this node's ``dev`` has sent, headers included: on eth0 all its ranks' traffic
    to other nodes, on lo their traffic to each other (``ip netns exec`` mounts the
    namespace's own /sys)."""
    with open(f"/sys/class/net/{dev}/statistics/tx_bytes") as f:
        return int(f.read())


def _drained_tx_bytes(reader: bool) -> tuple[int, int] | None:
    """On the ``reader`` of each node (its first rank): ``_tx_bytes`` of eth0 and of lo once
    every rank is here and what the node's ranks sent has left eth0's queue (a step ends
    when a rank has received, while its own last bytes may still wait in tbf; lo has no
    queue); None on the other ranks. All ranks wait until the readers have read, so that
    none starts sending before."""
    import torch.distributed as dist

    dist.barrier()
    counts = None
    if reader:
        last, stable_since = _tx_bytes(), time.monotonic()
        while time.monotonic() - stable_since < 0.05:
            time.sleep(0.005)
            now = _tx_bytes()
            if now != last:
                last, stable_since = now, time.monotonic()
        counts = last, _tx_bytes("lo")
    dist.barrier()
    return counts


def _per_node(value: float | None, node: int, nodes: int) -> list[float]:
    """Every node's ``value`` (given on its first rank, None on the others), on every rank."""
    import torch
    import torch.distributed as dist

    t = torch.zeros(nodes, dtype=torch.float64)
    if value is not None:
        t[node] = value
    dist.all_reduce(t)
    return t.tolist()


def _model(params: float):
    import torch.nn as nn

    layers = 4
    width = max(16, round((params / layers) ** 0.5))
    mods = []
    for i in range(layers):
        mods += [nn.Linear(width, width)] + ([nn.ReLU()] if i < layers - 1 else [])
    return nn.Sequential(*mods), layers, width


SPLIT_STATS = ("bytes_sent_intra_node", "bytes_sent_inter_node")


def _mesh(mode: str, world: int, nodes: int, per_node: int):
    """FSDP2's device mesh: the world (``fsdp``), or (replicate = nodes, shard = a node's
    contiguous ranks) (``hsdp``); None for DDP."""
    if mode == "ddp":
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if mode == "hsdp":
        return init_device_mesh("cpu", (nodes, per_node), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (world,))


def _split_bytes(m, steps: int) -> dict[str, float]:
    """gradcomp's counts of the bytes this rank sent within its node and to other nodes in
    its first ``steps`` steps, where its State keeps them (a hierarchical one) or the method
    knows them (HSDP's); empty otherwise."""
    if hasattr(m, "split_bytes"):
        return m.split_bytes(steps)
    stats = m.state.stats if m.state is not None else {}
    return {key: float(stats[key]) for key in SPLIT_STATS if key in stats}


def _worker(config_path: str) -> int:
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    import gradcomp

    from ..drivers.methods import AttachOptions, attach, is_diloco_method

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the stacks, if the parent finds us stuck
    with open(config_path) as f:
        cfg = json.load(f)
    rank, world, _ = environment_rank()
    per_node, nodes = cfg["ranks_per_node"], cfg["nodes"]
    node, reader = rank // per_node, rank % per_node == 0  # a node's first rank reads its counters
    threads = cfg["threads"] or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    # about 2 s of traffic at the nominal rate (at least 16 MB), from node 1 to node 0
    link_bps = _measure_link(rank, cfg["master"], max(16 << 20, int(cfg["rate_bps"] / 8 * 2)), sender=per_node)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    try:
        mode = cfg.get("mode", "ddp")
        mesh = _mesh(mode, world, nodes, per_node)
        torch.manual_seed(1000 + rank)
        model, layers, width = _model(cfg["params"])
        x = torch.randn(cfg["batch"], width)
        y = torch.randint(0, width, (cfg["batch"],))

        def timed_steps(step_fn, n_warmup: int, n: int) -> list[float]:
            for _ in range(n_warmup):
                step_fn()
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                step_fn()
                times.append(1e3 * (time.perf_counter() - t0))
            return times

        # every rank computes at once, as in training, so the cores are shared as they are then
        def compute_only():
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()

        dist.barrier()
        compute_ms = statistics.median(timed_steps(compute_only, 2, cfg["steps"]))

        def measure(method: str) -> dict:
            """Times ``method``; its DDP model (and its Reducer) goes with this call while the
            process group is still registered: a Reducer freed after ``destroy_process_group``
            frees the group itself, holding the GIL, and that can deadlock Gloo's teardown."""
            torch.manual_seed(0)
            net, _, _ = _model(cfg["params"])
            # DDP and its bucket cap, the model sharded (--fsdp, --hsdp) or the plain one (DiLoCo)
            options = AttachOptions(bucket_cap_mb=cfg["bucket_cap_mb"], powersgd_rank=cfg["powersgd_rank"],
                                    ranks_per_node=per_node, sharding=mode, mesh=mesh)
            setup = attach(method, net, lambda parameters: torch.optim.SGD(parameters, lr=1e-3, momentum=0.9),
                           options)
            # DiLoCo: whole periods of H steps from a sync on, each period's mean step a sample
            period = setup.method.sync_every if is_diloco_method(method) else 1
            warmup = -(-cfg["warmup"] // period) * period
            n_timed = -(-cfg["steps"] // period) * period

            def step(module=setup.module, optimizer=setup.optimizer, attached=setup.method):
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(module(x), y).backward()
                optimizer.step()
                attached.after_step()

            with setup.method as attached:
                dist.barrier()
                for _ in range(warmup):
                    step()
                sent0, codec0 = attached.bytes_sent(warmup), attached.codec_seconds()
                split0 = _split_bytes(attached, warmup)
                tx0 = _drained_tx_bytes(reader)
                times = timed_steps(step, 0, n_timed)
                tx1 = _drained_tx_bytes(reader)
                total = warmup + n_timed
                node_tx = [b / n_timed for b in _per_node(tx1[0] - tx0[0] if reader else None, node, nodes)]
                node_lo = [b / n_timed for b in _per_node(tx1[1] - tx0[1] if reader else None, node, nodes)]
                samples = [statistics.fmean(times[i:i + period]) for i in range(0, n_timed, period)]
                result = {
                    "step_ms": statistics.median(samples), "steps_ms": samples,
                    "timed_steps": n_timed, "period": period,
                    "bytes_per_step": (attached.bytes_sent(total) - sent0) / n_timed,
                    # node 0's eth0 (rank 0's own where a node is one rank)
                    "eth0_tx_bytes_per_step": node_tx[0],
                    "node_tx_bytes_per_step": node_tx,
                    "node_lo_tx_bytes_per_step": node_lo,
                    "codec_ms_per_step": 1e3 * (attached.codec_seconds() - codec0) / n_timed,
                    "stats": dict(attached.state.stats) if attached.state is not None else None,
                }
                if attached.state is not None:  # gradcomp's own uncompressed / sent over the run
                    result["compression_ratio"] = float(attached.state.stats["ratio"])
                if hasattr(attached, "allgather_per_step"):  # FSDP2's parameter all-gathers: computed, not counted
                    result["allgather_bytes_per_step"] = attached.allgather_per_step
                for key, value in _split_bytes(attached, total).items():  # gradcomp's own intra / inter-node counts
                    result[f"{key}_per_step"] = (value - split0[key]) / n_timed
            if rank == 0:
                print(f"  {cfg['phase']:>8} {method:<16} {result['step_ms']:8.0f} ms/step  "
                      f"{result['bytes_per_step'] / 1e6:8.2f} MB sent/step  "
                      f"{statistics.fmean(node_tx) / 1e6:8.2f} MB/step from a node to the others", flush=True)
            return result

        methods = {}
        for method in cfg["methods"]:
            methods[method] = measure(method)
            gc.collect()  # a model held by a reference cycle goes now, not after the group
        if rank == 0:  # whole or not at all: the parent takes it as the phase's end
            with open(cfg["result"] + ".part", "w") as f:
                json.dump({"mode": mode, "link_bps": link_bps, "compute_ms": compute_ms, "methods": methods,
                           "parameters": sum(p.numel() for p in model.parameters()), "layers": layers,
                           "width": width, "threads": threads, "torch": torch.__version__,
                           "gradcomp": gradcomp.build_info()}, f)
            os.replace(cfg["result"] + ".part", cfg["result"])
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
