"""The gradient-exchange methods the demo and the benchmarks compare: one registry of method
specs, one parser, and the classes that attach a method to a model.

A method is a spec string; each kind of spec means the same in every command that takes it:

    "allreduce"       DDP's own all-reduce, no hook
    "torch-fp16"      torch's fp16_compress_hook
    "torch-powersgd"  torch's powerSGD_hook (rank ``powersgd_rank``)
    "torch-powersgd:R"
                      the same at matrix_approximation_rank R ("torch-powersgd:1")
    "pipe:<spec>"     a gradcomp codec spec whose buckets are cut into pipelined chunks of
                      PIPE_CHUNK_NUMEL elements (State's ``chunk_numel=``)
    "node:<spec>"     a gradcomp codec spec reduced hierarchically, node by node
                      ("node:int8"): registered with ``ranks_per_node=`` the topology's
                      ranks a node (gradcomp.State's keyword; the hierarchy is State's)
    "diloco:<codec>:H=<n>[:F=<f>][:delay=<d>][:lr=<x>][:momentum=<x>][:nesterov=0|1]"
                      no per-step exchange: gradcomp.DiLoCo on the plain model, syncing every
                      n steps with that codec ("fp32": an exact average), in f fragments
                      ("diloco:int8:H=20", "diloco:fp32:H=10", "diloco:int4:block=64:H=50:F=2")
    "fsdp", "fsdp:<spec>"
                      the model sharded with FSDP2 over the world, reduced by FSDP2's own
                      reduce-scatter or gradcomp's with that codec (gradcomp.fsdp.register);
                      "fsdp:<spec>" takes what a sharded run takes (below)
    anything else     a gradcomp codec spec ("int8", "sign", "topk:0.01", ...)

Under FSDP2 (``fully_shard``) and HSDP (FSDP2 inside a node, replicas across nodes), as
``gradcomp bench net --fsdp`` and ``--hsdp`` run them, every method is a sharded one
(parsed with ``parse_methods(text, sharded_kinds(mode))``, run by ``FSDPMethod``):

    "plain"           FSDP2's own exact reduction: its reduce-scatter (FSDP); its reduce-scatter
                      inside the node and a plain all-reduce of each shard across the replicas
                      (``set_all_reduce_hook``; HSDP)
    anything else     a gradcomp codec spec ("int8", "int4", "fp16", ...): gradcomp.fsdp.register,
                      a compressed reduce-scatter (FSDP) or replica all-reduce (HSDP)
    "<that>+ag:<spec>"
                      FSDP only: the parameter all-gather compressed too (``all_gather=<spec>``),
                      e.g. "int8+ag:int8", "plain+ag:int8" (FSDP's own reduce-scatter)
    "<that>+hpz"      FSDP only: ``fully_shard(..., reshard_after_forward=L)``, L the topology's
                      ranks a node: backward's gather stays inside the node (ZeRO++'s hpZ)

Each kind is a ``MethodKind`` (which specs it takes, and the check that refuses a bad one);
a command passes ``parse_methods`` the kinds it runs (``DDP_KINDS``, ``DEMO_KINDS``,
``sharded_kinds(mode)``), and a spec of a kind it does not run is taken for a codec spec.

``attach(method, model, make_optimizer, options)`` readies a model for a method: DDP with the
bucket cap the method needs and ``Method`` on it (the bytes this rank puts on the wire), the
model sharded and ``FSDPMethod``, or the plain model under ``DiLoCoMethod``, whose
``after_step()`` the loop calls after every optimizer step (Method's and FSDPMethod's do
nothing).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import codecs
from ..engine.collectives import ring_allreduce_bytes

TORCH_METHODS = ("allreduce", "torch-fp16", "torch-powersgd")
TORCH_POWERSGD = "torch-powersgd"  # and "torch-powersgd:R", R its matrix_approximation_rank
NODE_PREFIX = "node:"  # "node:<spec>": gradcomp's codec, reduced within each node, then across nodes
PIPE_PREFIX = "pipe:"  # "pipe:<spec>": gradcomp's codec, buckets cut into pipelined chunks of PIPE_CHUNK_NUMEL
PIPE_CHUNK_NUMEL = 1 << 20  # 4 MB of fp32 gradient a chunk
DILOCO_PREFIX = "diloco:"  # "diloco:<codec>:H=<n>[:F=<f>][:delay=<d>]": gradcomp.DiLoCo, no per-step exchange
FSDP_METHOD = "fsdp"  # FSDP2's own reduce-scatter over the world
FSDP_PREFIX = "fsdp:"  # "fsdp:<spec>": gradcomp.fsdp.register with that codec
DEFAULT_METHODS = ("allreduce", "torch-fp16", "torch-powersgd", "int8", "int4", "sign", "topk:0.01")
FSDP_PLAIN = "plain"  # FSDP2's own exact reduction, the FSDP and HSDP baseline
FSDP_DEFAULT_METHODS = (FSDP_PLAIN, "int8", "int4")
GATHER_PREFIX = "ag:"  # "<reduction>+ag:<spec>": the parameter all-gather compressed too
HPZ = "hpz"  # "<reduction>+hpz": reshard_after_forward=<ranks a node>


@dataclass(frozen=True)
class Sharded:
    """A sharded method's parts: the reduction's codec spec (None: FSDP's own), the parameter
    all-gather's (None: FSDP's own), and whether backward gathers inside the node (hpZ)."""

    reduce: str | None
    gather: str | None
    hpz: bool


def parse_sharded(method: str) -> Sharded:
    """``"<plain|spec>[+ag:<spec>][+hpz]"`` split into its parts (not checked)."""
    first, *extras = method.split("+")
    gather, hpz = None, False
    for extra in extras:
        if extra.startswith(GATHER_PREFIX) and gather is None:
            gather = extra[len(GATHER_PREFIX):]
        elif extra == HPZ and not hpz:
            hpz = True
        else:
            raise ValueError(f"{method!r}: {extra!r} is neither {GATHER_PREFIX}<spec> nor {HPZ} (each at most once)")
    return Sharded(None if first == FSDP_PLAIN else first, gather, hpz)


# ---- the registry and the parser ---------------------------------------------------------


@dataclass(frozen=True)
class MethodKind:
    """One kind of method spec: ``matches(method)`` says whether a spec is of this kind,
    ``check(method)`` raises ValueError naming a bad one."""

    matches: Callable[[str], bool]
    check: Callable[[str], None]


def parse_methods(text: str, kinds: tuple[MethodKind, ...] | None = None) -> list[str]:
    """A comma-separated list of methods, each checked by the first of ``kinds`` that takes
    it (the last takes whatever the others do not); ``kinds`` defaults to ``DDP_KINDS``. A bad
    spec raises ValueError naming it, as does a method listed twice."""
    kinds = DDP_KINDS if kinds is None else kinds
    methods = [method.strip() for method in text.split(",") if method.strip()]
    if not methods:
        raise ValueError("no methods given")
    for method in methods:
        kind_of(method, kinds).check(method)
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is listed twice: {text}")
    return methods


def kind_of(method: str, kinds: tuple[MethodKind, ...]) -> MethodKind:
    """The first of ``kinds`` that takes ``method``; the last kind when none does."""
    return next((kind for kind in kinds[:-1] if kind.matches(method)), kinds[-1])


def parse_fsdp_methods(text: str, mode: str = "fsdp") -> list[str]:
    """The methods of an FSDP2 (``mode="fsdp"``) or HSDP run: "plain" and gradcomp codec
    specs that gradcomp.fsdp takes (quantizers and casts: no top-k or random-k, which choose
    per whole parameter). A bad one raises ValueError naming it."""
    return parse_methods(text, sharded_kinds(mode))


def is_diloco_method(method: str) -> bool:
    """Whether ``method`` is a ``diloco:...`` method (gradcomp.DiLoCo, no per-step exchange)."""
    return method.startswith(DILOCO_PREFIX)


def is_node_method(method: str) -> bool:
    """Whether ``method`` is a hierarchical ``node:<spec>`` method."""
    return method.startswith(NODE_PREFIX)


def is_pipe_method(method: str) -> bool:
    """Whether ``method`` is a pipelined ``pipe:<spec>`` method."""
    return method.startswith(PIPE_PREFIX)


def is_fsdp_method(method: str) -> bool:
    """Whether ``method`` is ``fsdp`` or ``fsdp:<spec>`` (the model sharded with FSDP2)."""
    return method == FSDP_METHOD or method.startswith(FSDP_PREFIX)


def is_torch_powersgd(method: str) -> bool:
    """Whether ``method`` is torch's PowerSGD hook: "torch-powersgd" or "torch-powersgd:R"."""
    return method == TORCH_POWERSGD or method.startswith(TORCH_POWERSGD + ":")


def is_torch_method(method: str) -> bool:
    """Whether ``method`` is DDP's own all-reduce or one of torch's hooks."""
    return method in TORCH_METHODS or is_torch_powersgd(method)


def torch_powersgd_rank(method: str, default: int) -> int:
    """The matrix_approximation_rank of a torch-powersgd method: R for "torch-powersgd:R",
    ``default`` for plain "torch-powersgd". A rank that is not a positive integer raises
    ValueError naming the method."""
    if method == TORCH_POWERSGD:
        return default
    text = method[len(TORCH_POWERSGD) + 1:]
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"{method!r}: {TORCH_POWERSGD}:R takes a positive integer rank R "
                         f"(e.g. {TORCH_POWERSGD}:2), got {text!r}")
    return int(text)


def codec_spec(method: str) -> str:
    """The gradcomp codec spec of a gradcomp method: "int8" for "int8", "node:int8" and "pipe:int8"."""
    for prefix in (NODE_PREFIX, PIPE_PREFIX):
        if method.startswith(prefix):
            return method[len(prefix):]
    return method


def parse_diloco(method: str) -> dict:
    """gradcomp.DiLoCo's keywords of a ``diloco:<codec>:H=<n>[:F=<f>][:delay=<d>]`` method:
    codec (None for "fp32"), sync_every, fragments, delay (None: DiLoCo's default); and, where
    given, the outer optimizer's ``lr=<x>``, ``momentum=<x>``, ``nesterov=0|1``. A bad one
    raises ValueError naming it."""
    options, codec_parts = _diloco_options(method)
    spec = ":".join(codec_parts)
    if "H" not in options or options["H"] < 1:
        raise ValueError(f"{method!r}: a DiLoCo method needs H=<steps between syncs>, at least 1 "
                         f"(e.g. {DILOCO_PREFIX}int8:H=20)")
    if options.get("F", 1) < 1:
        raise ValueError(f"{method!r}: F= (fragments) must be at least 1")
    if not spec:
        raise ValueError(f"{method!r}: a DiLoCo method needs a codec: a gradcomp codec spec or fp32 "
                         f"(e.g. {DILOCO_PREFIX}int8:H=20)")
    if spec != "fp32":
        try:
            codec = codecs.parse(spec)
        except ValueError as e:
            raise ValueError(f"{method!r}: {DILOCO_PREFIX} takes a gradcomp codec spec or fp32: {e}") from e
        if isinstance(codec, codecs.PowerSGD):
            raise ValueError(f"{method!r}: DiLoCo takes no powersgd (use a quantizer, a sparsifier or a cast)")
    keywords = {"codec": None if spec == "fp32" else spec, "sync_every": options["H"],
                "fragments": options.get("F", 1), "delay": options.get("delay")}
    for key, name in (("lr", "outer_lr"), ("momentum", "outer_momentum"), ("nesterov", "nesterov")):
        if key in options:  # otherwise DiLoCo's defaults, the paper's
            keywords[name] = bool(options[key]) if key == "nesterov" else options[key]
    return keywords


def _diloco_options(method: str) -> tuple[dict, list[str]]:
    """({H, F, delay, lr, momentum, nesterov given}, the other parts: the codec spec's)."""
    options, codec_parts = {}, []
    for part in method[len(DILOCO_PREFIX):].split(":"):
        key, equals, value = part.partition("=")
        if not (equals and key in ("H", "F", "delay", "lr", "momentum", "nesterov")):
            codec_parts.append(part)
            continue
        if key in options:
            raise ValueError(f"{method!r}: {key}= is given twice")
        if key in ("lr", "momentum"):
            try:
                options[key] = float(value)
            except ValueError:
                raise ValueError(f"{method!r}: {key}={value!r} is not a number") from None
            continue
        if not (value.isascii() and value.isdigit()):
            raise ValueError(f"{method!r}: {key}={value!r} is not a non-negative integer")
        options[key] = int(value)
    return options, codec_parts


def _check_torch(method: str) -> None:
    if method.startswith(TORCH_POWERSGD + ":"):
        torch_powersgd_rank(method, 4)  # raises ValueError naming a bad rank


def _prefixed_codec_check(prefix: str) -> Callable[[str], None]:
    """The check of ``<prefix><codec spec>`` methods: the spec must be a gradcomp codec's."""
    def check(method: str) -> None:
        try:
            codecs.parse(method[len(prefix):])
        except ValueError as e:
            raise ValueError(f"{method!r}: {prefix} takes a gradcomp codec spec (e.g. {prefix}int8): {e}") from e
    return check


def _check_fsdp(method: str) -> None:
    """``fsdp:<spec>`` takes what an FSDP2 run takes (``plain`` included, the same as ``fsdp``)."""
    if method.startswith(FSDP_PREFIX):
        try:
            parse_fsdp_methods(method[len(FSDP_PREFIX):])
        except ValueError as e:
            raise ValueError(f"{method!r}: {FSDP_PREFIX} takes a gradcomp codec spec (e.g. {FSDP_PREFIX}int8): "
                             f"{e}") from e


def _check_codec(method: str) -> None:
    try:
        codecs.parse(method)
    except ValueError as e:
        raise ValueError(f"{method!r} is neither one of {', '.join(TORCH_METHODS)} nor a gradcomp codec "
                         f"(nor {NODE_PREFIX}<codec>): {e}") from e


def _sharded_codec_check(mode: str) -> Callable[[str], None]:
    """The check of a sharded run's codec specs: gradcomp.fsdp's codecs, no DDP method."""
    what = "--hsdp" if mode == "hsdp" else "--fsdp"

    def check(method: str) -> None:
        if is_torch_method(method) or is_node_method(method) or is_pipe_method(method):
            raise ValueError(f"{method!r} is a DDP method; under {what} the methods are {FSDP_PLAIN!r} (FSDP2's "
                             "own exact reduction) and gradcomp codec specs (int8, int4, ...)")
        parts = parse_sharded(method)
        if mode == "hsdp" and (parts.gather is not None or parts.hpz):
            raise ValueError(f"{method!r}: under --hsdp FSDP2 gathers inside the node; +{GATHER_PREFIX} and +{HPZ} "
                             "are for --fsdp")
        if parts.reduce is not None:
            try:
                spec = codecs.parse(parts.reduce)
            except ValueError as e:
                raise ValueError(f"{method!r} is neither {FSDP_PLAIN!r} nor a gradcomp codec: {e}") from e
            if isinstance(spec, codecs.Sparsifier):
                raise ValueError(f"{method!r}: gradcomp.fsdp takes no sparsifier (it chooses per whole parameter, "
                                 "which a sharded reduction never holds); use a quantizer (int8, int4, int2, sign) "
                                 "or fp16/bf16")
        if parts.gather is not None:
            from ..engine.all_gather import check_codec

            check_codec(parts.gather)
    return check


def _no_check(method: str) -> None:
    pass


TORCH_KIND = MethodKind(is_torch_method, _check_torch)

PIPE_KIND = MethodKind(is_pipe_method, _prefixed_codec_check(PIPE_PREFIX))
NODE_KIND = MethodKind(is_node_method, _prefixed_codec_check(NODE_PREFIX))
DILOCO_KIND = MethodKind(is_diloco_method, parse_diloco)
FSDP_KIND = MethodKind(is_fsdp_method, _check_fsdp)
CODEC_KIND = MethodKind(lambda method: True, _check_codec)
PLAIN_KIND = MethodKind(lambda method: method == FSDP_PLAIN, _no_check)

# what each command runs: bench net (DDP) the first, gradcomp demo and bench converge the second
DDP_KINDS = (TORCH_KIND, PIPE_KIND, NODE_KIND, DILOCO_KIND, CODEC_KIND)
DEMO_KINDS = (TORCH_KIND, PIPE_KIND, NODE_KIND, DILOCO_KIND, FSDP_KIND, CODEC_KIND)


def sharded_kinds(mode: str) -> tuple[MethodKind, ...]:
    """What a sharded run (``mode`` "fsdp" or "hsdp", bench net's --fsdp and --hsdp) takes:
    "plain" and gradcomp.fsdp's codec specs, with FSDP's "+ag:<spec>" and "+hpz"."""
    return PLAIN_KIND, MethodKind(lambda method: True, _sharded_codec_check(mode))


def baseline(mode: str) -> str:
    """The exact method of ``mode`` (the floor of the benchmark's table)."""
    return "allreduce" if mode == "ddp" else FSDP_PLAIN


def hierarchy_missing(methods) -> str | None:
    """Why the ``node:`` methods among ``methods`` cannot run here (this gradcomp's State has
    no ``ranks_per_node=`` keyword), or None: for a check before minutes of other methods."""
    import inspect

    from .. import State

    node = [method for method in methods if is_node_method(method)]
    if node and "ranks_per_node" not in inspect.signature(State).parameters:
        return (f"{', '.join(node)}: this gradcomp's State takes no ranks_per_node= keyword, so it cannot reduce "
                f"node by node; {NODE_PREFIX} methods need a gradcomp with hierarchical reduction")
    return None


def fsdp_missing(mode: str) -> str | None:
    """Why ``mode`` ("fsdp" or "hsdp") cannot run with this torch and gradcomp, or None: for
    a check before any namespace is made."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    try:
        from .. import fsdp  # noqa: F401
    except ImportError as e:
        return f"this gradcomp has no gradcomp.fsdp ({e})"
    needed = ("set_all_reduce_hook",) if mode == "hsdp" else \
        ("set_custom_reduce_scatter", "set_force_sum_reduction_for_comms", "set_gradient_divide_factor")
    lacking = [name for name in needed if not hasattr(FSDPModule, name)]
    if lacking:
        return f"torch {torch.__version__}'s FSDPModule lacks {', '.join(lacking)}"
    return None


# ---- a method on a model -----------------------------------------------------------------


@dataclass(frozen=True)
class AttachOptions:
    """How a command attaches its methods. ``device``: a CUDA device gives DDP its
    ``device_ids``. ``ranks_per_node``: the topology's ranks a node, for ``node:`` methods
    and a hierarchical DiLoCo. ``sharding``: "fsdp" or "hsdp" shards the model for every
    method (bench net's --fsdp and --hsdp) over ``mesh``; "ddp" shards only ``fsdp`` and
    ``fsdp:<spec>`` methods, over the world."""

    backend: str = "gloo"
    device: torch.device | None = None
    bucket_cap_mb: float = 25.0
    start_step: int = 0
    powersgd_rank: int = 4
    ranks_per_node: int | None = None
    sharding: str = "ddp"
    mesh: object = None


class Attached(NamedTuple):
    """A model readied for a method: ``module`` is what the loop calls (the DDP model, the
    sharded model or, under DiLoCo, the plain one), ``method`` the context manager that
    counts its bytes, ``bucket_cap_mb`` DDP's cap (None without DDP)."""

    module: torch.nn.Module
    optimizer: object
    method: object
    bucket_cap_mb: float | None


def attach(method: str, model: torch.nn.Module, make_optimizer, options: AttachOptions) -> Attached:
    """``model`` readied for ``method``, with ``make_optimizer(parameters)``'s optimizer over
    what it trains: DDP and Method, the model sharded and FSDPMethod, or the plain model and
    DiLoCoMethod around the optimizer (each rank steps alone between syncs)."""
    if is_diloco_method(method):
        optimizer = make_optimizer(model.parameters())
        return Attached(model, optimizer, DiLoCoMethod(method, model, optimizer,
                                                       ranks_per_node=options.ranks_per_node), None)
    if options.sharding != "ddp" or is_fsdp_method(method):
        mode, name, mesh = _sharding(method, options)
        reshard = True
        if parse_sharded(name).hpz:
            if not options.ranks_per_node or options.ranks_per_node < 2:
                raise ValueError(f"{method!r}: +{HPZ} keeps backward's gather inside a node, which needs nodes of "
                                 "2 or more ranks (--ranks-per-node)")
            reshard = options.ranks_per_node
        shard = fully_shard_layers(model, mesh["shard"] if mode == "hsdp" else mesh, reshard)
        attached = FSDPMethod(name, shard, mode=mode, mesh=mesh, start_step=options.start_step)
        return Attached(shard, make_optimizer(shard.parameters()), attached, None)
    cap = bucket_cap_mb(method, model, options.backend, options.bucket_cap_mb)
    device = options.device
    ddp = make_ddp(model, cap, device_ids=[device.index] if device is not None and device.type == "cuda" else None)
    attached = Method(method, ddp, start_step=options.start_step, powersgd_rank=options.powersgd_rank,
                      ranks_per_node=options.ranks_per_node)
    return Attached(ddp, make_optimizer(ddp.parameters()), attached, cap)


def _sharding(method: str, options: AttachOptions) -> tuple[str, str, object]:
    """(mode, FSDPMethod's name, mesh) of a sharded method: bench net's, as given, or an
    ``fsdp[:<spec>]`` one over a mesh of the world (FSDP2's own reduce-scatter for ``fsdp``)."""
    if options.sharding != "ddp":
        return options.sharding, method, options.mesh
    from torch.distributed.device_mesh import init_device_mesh

    device_type = options.device.type if options.device is not None else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    name = method[len(FSDP_PREFIX):] if method.startswith(FSDP_PREFIX) else FSDP_PLAIN
    return "fsdp", name, mesh


def bucket_cap_mb(method: str, model: torch.nn.Module, backend: str, default: float) -> float:
    """DDP's bucket cap for ``method``. torch's PowerSGD hook on Gloo needs one bucket: it
    issues its second all-reduce (Q) from the callback of the first (P), and Gloo runs the
    callbacks of different buckets on its own threads in whatever order they finish, so with
    several buckets the ranks issue their collectives in different orders and Gloo aborts
    ("Received data size doesn't match expected size"). NCCL takes several buckets."""
    if is_torch_powersgd(method) and backend == "gloo":
        return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1
    return default


def make_ddp(model: torch.nn.Module, cap_mb: float, **kwargs) -> torch.nn.parallel.DistributedDataParallel:
    """DistributedDataParallel whose every bucket, the first included, is capped at ``cap_mb``,
    as torch does today when a cap is given. Older releases (2.3 among them) capped the first
    bucket at ``dist._DEFAULT_FIRST_BUCKET_BYTES`` (1 MiB) whatever the cap: PowerSGD's one
    bucket on Gloo would be two there, and Gloo aborts (see bucket_cap_mb)."""
    saved = getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", None)
    if saved is not None:
        dist._DEFAULT_FIRST_BUCKET_BYTES = int(cap_mb * 2**20)
    try:
        return torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cap_mb, **kwargs)
    finally:
        if saved is not None:
            dist._DEFAULT_FIRST_BUCKET_BYTES = saved


class Method:
    """A method attached to a DDP model; ``bytes_sent(steps)`` is what this rank put on the
    wire. Use it as a context manager: torch's PowerSGD sends a data-dependent set of P, Q
    and uncompressed tensors, so while it is attached ``torch.distributed.all_reduce`` is
    wrapped to count them (its future callbacks look the function up when they run).

    ``ranks_per_node`` is the topology's ranks a node (contiguous ranks share a node); only
    ``node:<spec>`` methods use it, and they need it."""

    def __init__(self, name: str, ddp, *, start_step: int = 0, powersgd_rank: int = 4,
                 ranks_per_node: int | None = None):
        self.name = name
        self.state = None  # gradcomp's State, for gradcomp codecs
        self.world = dist.get_world_size(ddp.process_group)
        self._counted = 0.0
        self._lock = threading.Lock()
        self._saved_all_reduce = None
        grad_bytes = sum(p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad)
        self._per_step = None  # bytes per step, where they are fixed
        group = ddp.process_group
        if name == "allreduce":
            self._per_step = ring_allreduce_bytes(grad_bytes, self.world)
        elif name == "torch-fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(group, default_hooks.fp16_compress_hook)
            self._per_step = ring_allreduce_bytes(grad_bytes // 2, self.world)
        elif is_torch_powersgd(name):
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            # with error feedback PowerSGD can start at DDP's third iteration at the earliest
            approx_rank = torch_powersgd_rank(name, powersgd_rank)
            state = powerSGD_hook.PowerSGDState(process_group=group, matrix_approximation_rank=approx_rank,
                                                start_powerSGD_iter=max(2, start_step), random_seed=0)
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
            self._saved_all_reduce = dist.all_reduce
            dist.all_reduce = self._counting_all_reduce
        elif is_node_method(name):
            self.state = _register_hierarchical(ddp, name, start_step, ranks_per_node)
        elif is_pipe_method(name):
            from .. import register

            self.state = register(ddp, codec_spec(name), start_step=start_step, chunk_numel=PIPE_CHUNK_NUMEL)
        else:
            from .. import register

            self.state = register(ddp, name, start_step=start_step)

    def after_step(self) -> None:
        """After each optimizer step: nothing (DDP's hook has reduced the gradients)."""

    def _counting_all_reduce(self, tensor, *args, **kwargs):
        with self._lock:
            self._counted += ring_allreduce_bytes(tensor.numel() * tensor.element_size(), self.world)
        return self._saved_all_reduce(tensor, *args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._saved_all_reduce is not None:
            dist.all_reduce, self._saved_all_reduce = self._saved_all_reduce, None

    def bytes_sent(self, steps: int) -> float:
        """Bytes this rank has sent in its first ``steps`` steps (all of them so far)."""
        if self.state is not None:
            return float(self.state.stats["bytes_sent"])
        if self._per_step is not None:
            return self._per_step * steps
        with self._lock:
            return self._counted

    def codec_seconds(self) -> float:
        """gradcomp's codec time so far (CPU); 0 for torch's methods."""
        return float(self.state.stats["codec_seconds"]) if self.state is not None else 0.0


class _NothingToDetach:
    """A method with nothing to detach: a context manager whose ``close`` does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass


class DiLoCoMethod(_NothingToDetach):
    """A ``diloco:...`` method on a plain (not DDP) model: gradcomp.DiLoCo around its inner
    optimizer, with Method's interface (``bytes_sent(steps)``, ``codec_seconds()``, ``state``);
    the loop calls ``after_step()`` after each optimizer step. ``ranks_per_node`` makes the
    sync hierarchical (exact inside a node, the codec across nodes) where it is given."""

    def __init__(self, name: str, model: torch.nn.Module, inner_optimizer, *, ranks_per_node: int | None = None):
        from .. import DiLoCo

        self.name = name
        self.diloco = DiLoCo(model, inner_optimizer, **parse_diloco(name),
                             ranks_per_node=ranks_per_node if (ranks_per_node or 1) > 1 else None)
        self.state = self.diloco.state
        self.sync_every = self.diloco.sync_every

    def after_step(self) -> None:
        self.diloco.step()

    def bytes_sent(self, steps: int) -> float:
        return float(self.state.stats["bytes_sent"])

    def codec_seconds(self) -> float:
        return float(self.state.stats["codec_seconds"])


def _register_hierarchical(ddp, name: str, start_step: int, ranks_per_node: int | None):
    """``gradcomp.register(ddp, spec, ranks_per_node=L)`` for a ``node:<spec>`` method. The
    hierarchy is gradcomp.State's (its ``ranks_per_node=`` keyword); a gradcomp without
    that keyword cannot run the method, and says so here rather than with a bare TypeError."""
    from .. import register

    if ranks_per_node is None:
        raise ValueError(f"{name}: a {NODE_PREFIX} method needs the topology's ranks per node "
                         "(--ranks-per-node)")
    missing = hierarchy_missing([name])
    if missing:
        raise TypeError(missing)
    return register(ddp, codec_spec(name), start_step=start_step, ranks_per_node=ranks_per_node)


# ---- FSDP2 and HSDP ---------------------------------------------------------------------


def fully_shard_layers(model: torch.nn.Module, mesh, reshard_after_forward: bool | int = True) -> torch.nn.Module:
    """``fully_shard`` on each child of ``model`` that holds parameters (an FSDP unit each; a
    ModuleList's items each, since a list has no forward), then on ``model`` itself: how the
    benchmarks and the demo shard their models. ``reshard_after_forward`` is the layers'."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        layers = list(child) if isinstance(child, torch.nn.ModuleList) else [child]
        for layer in layers:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_units(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def reduce_scatter_bytes(model: torch.nn.Module, shard_world: int) -> tuple[float, float]:
    """(bytes one rank sends in a ring reduce-scatter of the model's gradient over
    ``shard_world`` ranks, bytes of the shard it keeps), with FSDP2's padding: each parameter's
    dim 0 is padded to a multiple of the ranks, and a rank sends W−1 of the W chunks."""
    sent = kept = 0.0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        shape = tuple(p.shape)  # a DTensor's is the unsharded parameter's
        rows = shape[0] if shape else 1
        inner = p.numel() // rows if rows else 0
        chunk = -(-rows // shard_world) * inner * p.element_size()
        sent += (shard_world - 1) * chunk
        kept += chunk
    return sent, kept


def _post_forward_size(units: list) -> int:
    """The group size the units' layers reshard to after forward (hpZ's node; the shard group
    by default); 1 where none reshards."""
    for unit in units:
        group = unit._get_fsdp_state()._fsdp_param_group  # None for a unit without parameters
        if group is not None and group.post_forward_mesh_info is not None:
            return group.post_forward_mesh_info.shard_mesh_size
    return 1


class FSDPMethod(_NothingToDetach):
    """A method attached to an FSDP2 model (``fully_shard`` on its blocks, then its root),
    with Method's interface: ``bytes_sent(steps)``, ``codec_seconds()``, ``split_bytes()``,
    ``state``. Under FSDP bytes count the gradient reduction and the parameter all-gathers
    (FSDP's own computed for a ring, gradcomp's counted); under HSDP the reductions only (the
    gathers run inside the node, the same for every method).

    ``mode="fsdp"``: the model is sharded over the whole world; "plain" is FSDP's own
    reduce-scatter, a gradcomp spec ``gradcomp.fsdp.register(model, spec)``, with
    ``+ag:<spec>`` its ``all_gather=<spec>`` (``parse_sharded``); ``+hpz`` was given to
    ``fully_shard`` (``attach``), which this reads back from the units.
    ``mode="hsdp"``: the model is sharded over ``mesh["shard"]`` (the node's ranks) of a 2-D
    mesh ``(replicate, shard)``; "plain" adds an exact all-reduce over the replica group
    (``set_all_reduce_hook``, divided by the replicas), a gradcomp spec is
    ``gradcomp.fsdp.register(model, spec, replicate_group=mesh)``. FSDP's reduce-scatter inside
    the node is exact in both and counted as intra-node bytes."""

    def __init__(self, name: str, model: torch.nn.Module, *, mode: str, mesh, start_step: int = 0):
        if mode not in ("fsdp", "hsdp"):
            raise ValueError(f"FSDPMethod: mode must be 'fsdp' or 'hsdp', got {mode!r}")
        self.name, self.mode = name, mode
        self.state = None
        if mode == "hsdp":
            self.replicas, shard_world = mesh.size(0), mesh.size(1)
        else:
            self.replicas, shard_world = 1, mesh.size()
        # FSDP's reduce-scatter (the whole reduction under FSDP; inside the node under HSDP)
        self._reduce_scatter_per_step, shard_bytes = reduce_scatter_bytes(model, shard_world)
        self.units = fsdp_units(model)
        if not self.units:
            raise ValueError("FSDPMethod: the model holds no FSDPModule (call fully_shard first)")
        # FSDP's own ring all-gathers of the parameters over the shard group: in forward, and
        # again in backward over the group the layers were resharded to (the whole shard group;
        # a node's ranks under hpZ, gathering chunks that many times larger); the models here
        # keep no parameters in their root
        inner = _post_forward_size(self.units)
        self.allgather_per_step = (shard_world - 1) * shard_bytes + (inner - 1) * shard_bytes * shard_world / inner
        self._replica_per_step = ring_allreduce_bytes(shard_bytes, self.replicas) if mode == "hsdp" else 0.0
        parts = parse_sharded(name)
        self.gathers = parts.gather is not None  # gradcomp's gathers, counted in its stats
        if parts.reduce is None and mode == "hsdp":
            self._exact_replica_all_reduce(mesh.get_group("replicate"))
        elif parts.reduce is not None or parts.gather is not None:
            from .. import fsdp

            options = {} if parts.reduce is None else {"start_step": start_step}
            self.state = fsdp.register(model, parts.reduce, all_gather=parts.gather,
                                       replicate_group=mesh if mode == "hsdp" else None, **options)
        self.reduces = parts.reduce is not None

    def _exact_replica_all_reduce(self, replicate_group) -> None:
        """HSDP's plain baseline: each shard all-reduced exactly across the replicas."""
        replicas = self.replicas

        def replica_all_reduce(tensor: torch.Tensor) -> None:  # exact: the simplest baseline
            dist.all_reduce(tensor, group=replicate_group)
            tensor.div_(replicas)

        for unit in self.units:
            unit.set_all_reduce_hook(replica_all_reduce)

    def after_step(self) -> None:
        """After each optimizer step: nothing (FSDP's reduction has run in backward)."""

    def _gradcomp_sent(self) -> float:
        return float(self.state.stats["bytes_sent"]) if self.state is not None else 0.0

    def bytes_sent(self, steps: int) -> float:
        """Bytes this rank has sent in its first ``steps`` steps: of the gradient reduction and,
        under FSDP, of the parameter all-gathers."""
        if self.mode == "fsdp":
            reduced = self._gradcomp_sent() if self.reduces else self._reduce_scatter_per_step * steps
            gathered = float(self.state.stats["all_gather_bytes_sent"]) if self.gathers else \
                self.allgather_per_step * steps
            return reduced + gathered
        inter = self._gradcomp_sent() if self.state is not None else self._replica_per_step * steps
        return self._reduce_scatter_per_step * steps + inter

    def split_bytes(self, steps: int) -> dict[str, float]:
        """HSDP: the bytes sent inside the node (FSDP's reduce-scatter) and across nodes (the
        replica all-reduce) in the first ``steps`` steps; FSDP: empty (its flat reduce-scatter
        does not tell which hops cross nodes)."""
        if self.mode != "hsdp":
            return {}
        inter = self._gradcomp_sent() if self.state is not None else self._replica_per_step * steps
        return {"bytes_sent_intra_node": self._reduce_scatter_per_step * steps, "bytes_sent_inter_node": inter}

    def codec_seconds(self) -> float:
        return float(self.state.stats["codec_seconds"]) if self.state is not None else 0.0
