"""gradcomp for FSDP2 (``torch.distributed.fsdp.fully_shard``) and HSDP::

    fully_shard(block, mesh=mesh) for each block; fully_shard(model, mesh=mesh)
    state = gradcomp.fsdp.register(model, "int8")          # a compressed reduce-scatter
    state = gradcomp.fsdp.register(model, "int8", all_gather="int8")  # and parameter all-gather

    # HSDP: shard inside a node with FSDP2, replicate across nodes through gradcomp
    mesh = init_device_mesh("cuda", (nodes, per_node), mesh_dim_names=("replicate", "shard"))
    fully_shard(block, mesh=mesh["shard"]) ...
    state = gradcomp.fsdp.register(model, "int8", replicate_group=mesh)

The same engine, codecs and block rules as the DDP hook (docs/design.md, "FSDP2 and HSDP").
Without ``replicate_group`` every FSDP unit's gradient reduce-scatter is replaced
(``set_custom_reduce_scatter``) by the engine's compressed reduce-scatter, which owns all
scaling (FSDP is told to sum and divide by 1). With ``replicate_group`` FSDP's reduce-scatter
inside the node stays exact and divides by the node's ranks, and the replica all-reduce of
each shard is gradcomp's compressed all-reduce (``set_all_reduce_hook``), which divides by
the replica count. With ``all_gather`` every unit's parameter all-gather is replaced too
(``set_custom_all_gather``) by the engine's compressed gather (engine/all_gather.py): the
sharded weights the optimizer updates stay exact, the unsharded weights forward and backward
use are decoded from the same bytes on every rank. A gather over a smaller group than the
shard group (``reshard_after_forward=<int>``: backward's gather inside the node, ZeRO++'s hpZ)
re-gathers weights forward already decoded, and stays exact.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from . import codecs
from .engine import Call, GradcompError, Topology, agree
from .engine import all_gather as gather
from .engine.collectives import all_gather_single, run_to_end
from .engine.reduce_scatter import Chunked, cached_plan, reduce_scatter_, update_total_ratio
from .state import State

__all__ = ["register", "FSDPState"]


_NOT_OPTIONS = ("ranks_per_node", "intra_node")
logger = logging.getLogger("gradcomp")


def _delegated(name: str) -> property:
    return property(lambda self: getattr(self.state, name), doc=f"The State's ``{name}``.")


class FSDPState:
    """The state :func:`register` returns: a :class:`gradcomp.State` (``.state``: stats,
    per-rank ``state_dict()`` / ``load_state_dict()``, config agreement at the first reduction)
    serving an FSDP2 model, and this front end's own bookkeeping. ``mode`` is
    ``"reduce_scatter"`` or ``"hsdp"``. The State's settings, statistics and checkpoints are
    reachable here directly (``stats``, ``step``, ``state_dict()``, ...).

    Steps: one step is one backward's reductions. A step begins when a unit reduces for the
    second time since the last began (or for the first time at all), so gradient
    accumulation (``set_requires_gradient_sync(False)``) counts one step per reduction."""

    def __init__(self, codec, process_group, *, mode: str, all_gather=None, replicate_group=None, **options):
        # without a reduce-scatter codec (FSDP's own reduction) the State runs the gather's
        self.state = State(codec if codec is not None else all_gather, process_group, **options)
        self.all_gather_codec = gather.check_codec(all_gather) if all_gather is not None else None
        config = {"fsdp": mode}
        if self.all_gather_codec is not None:  # absent otherwise: earlier checkpoints keep loading
            config["all_gather"] = self.all_gather_codec.config()
        if codec is None:
            config["reduce_scatter"] = "fsdp"
        # checkpoint entries are the job's ranks: under HSDP a replica group's rank alone would
        # not say which shard its residuals are of
        self.state.claim("fsdp", config=config, job_ranks=True)
        self.mode = mode
        self.reduces = codec is not None  # False: FSDP's own reduce-scatter, gradcomp gathers only
        self.replicate_group = replicate_group  # HSDP's replica ProcessGroup, or None
        self.units: list = []  # _Unit a registered parameter group, in the model's module order
        self._units_this_step: set = set()
        self._current_step = 0
        self._group_seen = None
        self._said: set = set()  # what has been logged once
        if self.all_gather_codec is not None:
            self.state.stats.update(all_gather_bytes_sent=0.0, all_gather_bytes_uncompressed=0.0, total_ratio=1.0)

    engine = _delegated("engine")
    process_group = _delegated("process_group")
    min_numel = _delegated("min_numel")
    start_step = _delegated("start_step")
    force_compression = _delegated("force_compression")
    timeout = _delegated("timeout")
    chunk_numel = _delegated("chunk_numel")
    step = _delegated("step")
    seed = _delegated("seed")
    stats = _delegated("stats")
    residuals = _delegated("residuals")

    @property
    def codec(self):
        """The reduction's Codec, or None where FSDP's own reduce-scatter runs."""
        return self.state.codec if self.reduces else None

    def config(self) -> dict:
        """Everything every rank must agree on: the State's configuration, the mode and the
        all-gather's codec."""
        return self.state.config()

    def state_dict(self) -> dict:
        """This rank's State, as :meth:`gradcomp.State.state_dict` (safe under DCP)."""
        return self.state.state_dict()

    def load_state_dict(self, state_dict: dict, **kwargs) -> None:
        """Restores what :meth:`state_dict` saved, as :meth:`gradcomp.State.load_state_dict`."""
        self.state.load_state_dict(state_dict, **kwargs)
        self._units_this_step = set()

    def __getstate__(self):
        raise TypeError("gradcomp: an FSDPState is not pickled; checkpoint it with state_dict() (per rank, or DCP)")

    def __repr__(self) -> str:
        gathers = f", all_gather={self.all_gather_codec!r}" if self.all_gather_codec is not None else ""
        return f"gradcomp.fsdp.FSDPState(mode={self.mode!r}{gathers}, {self.state!r})"

    def say_once(self, what, message: str, *args) -> None:
        """Logs ``message`` the first time ``what`` happens."""
        if what not in self._said:
            self._said.add(what)
            logger.warning(message, *args)

    def agree_once(self, unit: _Unit, device: torch.device) -> None:
        """The first call's checks, from whichever of a unit's comms runs first (the first
        forward's gather, when gradcomp gathers)."""
        if self.replicate_group is None:
            self.first_call(unit.group.mesh_info.shard_process_group, device)
        else:
            info = unit.group.mesh_info
            self.first_call(self.replicate_group, device,
                            (info.shard_process_group, info.shard_mesh_size, info.shard_mesh_rank))

    def begin(self, unit: int) -> int:
        """The step a unit's reduction runs as, counting a new one where it begins."""
        if not self._units_this_step or unit in self._units_this_step:
            self._current_step = self.state.take_step()
            self._units_this_step = {unit}
        else:
            self._units_this_step.add(unit)
        return self._current_step

    def first_call(self, group, device: torch.device, shard: tuple | None = None) -> None:
        """The configuration check (once), and that every unit reduces over the same group.
        ``shard``: HSDP's (shard group, its size, this rank's index in it): the node's ranks
        must run one configuration too, and the replica group must join ranks holding the same
        shard, or its all-reduce would average different shards."""
        if self._group_seen is None:
            self._group_seen = group
            self.state.current_step()  # checks a state_dict loaded before the process group was up
            if shard is not None:
                shard_group, size, index = shard
                agree(shard_group, device, self.config(), self.seed)
                _, rows = agree(group, device, self.config(), self.seed, (size, index))
                if len({tuple(r) for r in rows}) != 1:
                    raise GradcompError("gradcomp.fsdp: replicate_group must join the ranks that hold the same shard "
                                        "(one rank of each node, of the same index within its node); its ranks hold "
                                        f"shards (shard group size, index) {[tuple(r) for r in rows]}: pass the "
                                        "replicate dimension of the mesh the model was sharded on")
            self.state.ready(group, device)
            label = f"fsdp ({self.mode if self.reduces else 'FSDP reduce-scatter'}"
            gathers = f", all-gather {self.all_gather_codec.name}" if self.all_gather_codec is not None else ""
            self.state.log_once(dist.get_world_size(group), label=label + gathers + ")")
        elif group is not self._group_seen:
            raise GradcompError("gradcomp.fsdp: FSDP units reduce or gather over different process groups; one "
                                "gradcomp state serves units sharded on one mesh")


def _fsdp_api():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError as e:  # torch < 2.6
        raise RuntimeError(f"gradcomp.fsdp needs FSDP2 (torch.distributed.fsdp.FSDPModule, torch >= 2.6); torch "
                           f"{torch.__version__} has none") from e
    return FSDPModule


def _require(module, names: tuple, what: str) -> None:
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise RuntimeError(f"gradcomp.fsdp: {what} needs FSDPModule.{', '.join(missing)}, which torch "
                           f"{torch.__version__} lacks (torch >= 2.9 has them); gradcomp will not run uncompressed "
                           "silently: upgrade torch or reduce without gradcomp")


def _replicate_of(replicate_group):
    """A ProcessGroup, a 1-D DeviceMesh, or a 2-D DeviceMesh whose replicate dimension is named
    "replicate" (or is dim 0)."""
    if isinstance(replicate_group, dist.ProcessGroup):
        return replicate_group
    mesh = replicate_group
    if hasattr(mesh, "get_group") and hasattr(mesh, "ndim"):
        if mesh.ndim == 1:  # the replicate dimension itself, e.g. mesh["replicate"]
            return mesh.get_group()
        if mesh.ndim != 2:
            raise ValueError(f"gradcomp.fsdp: replicate_group as a DeviceMesh must be 2-D (replicate, shard) or its "
                             f"1-D replicate dimension, got {mesh.ndim}-D")
        names = mesh.mesh_dim_names or ()
        return mesh.get_group("replicate" if "replicate" in names else 0)
    raise TypeError(f"gradcomp.fsdp: replicate_group must be a ProcessGroup or a 2-D DeviceMesh, got "
                    f"{type(replicate_group).__name__}")


class _Unit:
    """One FSDP unit's parameter group: its parameters' chunk layout, in FSDP's order."""

    def __init__(self, state: FSDPState, index: int, module, param_group, names: dict, first_index: int):
        self.state = state
        self.index = index
        self.module = module
        self.group = param_group
        self.fqn = names.get(id(module), "")
        self.params = list(param_group.fsdp_params)
        self.names = [names[id(fp.sharded_param)] for fp in self.params]
        self.first_index = first_index
        self._layout_cache: dict = {}
        self.topology = None

    def what(self) -> str:
        return f"FSDP unit {self.fqn or '<root>'!r}"

    def pieces(self, world: int) -> list:
        """The chunk layout of the parameters that reduce (those requiring grad: with
        ``set_reduce_scatter_unused_params(True)`` FSDP includes them whether or not they got a
        gradient)."""
        flags = tuple(fp.sharded_param.requires_grad for fp in self.params)
        cached = self._layout_cache.get(world)
        if cached is not None:
            if cached[0] != flags:
                raise GradcompError(f"gradcomp.fsdp: {self.what()}: the parameters requiring grad changed since the "
                                    "first reduction; error feedback is laid out per parameter chunk, so freezing or "
                                    "unfreezing needs a new gradcomp state (register again)")
            return cached[1]
        out = self._chunks(world, flags)
        self._layout_cache[world] = (flags, out)
        return out

    def gathered(self, world: int) -> list:
        """The chunk layout of the parameter all-gather: every parameter, frozen ones too."""
        if ("gather", world) not in self._layout_cache:
            self._layout_cache[("gather", world)] = self._chunks(world, (True,) * len(self.params))
        return self._layout_cache[("gather", world)]

    def _chunks(self, world: int, included: tuple) -> list:
        """The chunks of the ``included`` parameters, one after another in a row, as FSDP lays
        out its reduce-scatter input and its all-gather output."""
        out, offset = [], 0
        for i, (fp, name) in enumerate(zip(self.params, self.names)):
            if not included[i]:
                continue
            size = fp._orig_size
            chunk = fp.padded_sharded_param_size.numel()
            numel = size.numel()
            if fp.fsdp_placement.dim == 0 and len(size) > 0:
                per = fp.padded_sharded_param_size[0]
                inner = chunk // per if per else 0
                real = tuple(max(0, min(per, size[0] - j * per)) * inner for j in range(world))
            else:  # Shard(i > 0) shards evenly
                real = (chunk,) * world
            out.append(Chunked(name, self.first_index + i, numel, offset, chunk, real))
            offset += chunk
        return out

    def gather_plan(self, front: FSDPState, world: int, rank: int, dtype: torch.dtype,
                    device: torch.device) -> gather.AGPlan:
        """The all-gather's tables of this unit (built at its first gather)."""
        key = ("gather_plan", world, rank, dtype, device)
        if key not in self._layout_cache:
            self._layout_cache[key] = gather.plan_all_gather(front.all_gather_codec, front.min_numel,
                                                             self.gathered(world), world, rank, dtype, device)
        return self._layout_cache[key]

    def check_size(self, numel: int, expected: int, where: str) -> None:
        if numel != expected:
            hint = ("" if hasattr(self.module, "set_reduce_scatter_unused_params") else
                    f" (torch {torch.__version__} leaves parameters without a gradient out of the reduction, and "
                    "lacks set_reduce_scatter_unused_params to keep them in)")
            raise GradcompError(f"gradcomp.fsdp: {self.what()}: the {where} holds {numel} elements, the layout of its "
                                f"parameters {expected}: a parameter got no gradient this step or the layout changed"
                                f"{hint}; gradcomp refuses to apply residuals to the wrong elements")


class CompressedReduceScatter:
    """FSDP2's ``ReduceScatter`` comm of one unit (``set_custom_reduce_scatter``)."""

    def __init__(self, unit: _Unit):
        self.unit = unit

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op=None,
                 async_op: bool = False):
        unit, state = self.unit, self.unit.state
        scaling = (getattr(unit.group, "gradient_divide_factor", 1.0), getattr(unit.group,
                                                                              "force_sum_reduction_for_comms", True))
        if (op is not None and op != dist.ReduceOp.SUM) or scaling[0] not in (None, 1.0) or not scaling[1]:
            raise GradcompError(f"gradcomp.fsdp: {unit.what()} was asked for reduce op {op} with divide factor "
                                f"{scaling[0]} and force-sum {scaling[1]}; gradcomp owns the scaling and takes SUM "
                                "only (register sets set_force_sum_reduction_for_comms(True) and "
                                "set_gradient_divide_factor(1.0) on every unit: do not change them)")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if input_tensor.dim() != 1 or output_tensor.dim() != 1 or input_tensor.numel() != world * output_tensor.numel():
            raise GradcompError(f"gradcomp.fsdp: {unit.what()}: a reduce-scatter input of {input_tensor.numel()} and "
                                f"output of {output_tensor.numel()} elements do not fit {world} ranks")
        if group is not unit.group.mesh_info.shard_process_group:
            raise GradcompError(f"gradcomp.fsdp: {unit.what()}: a reduce-scatter over another group than the unit's "
                                "shard group")
        state.agree_once(unit, input_tensor.device)
        pieces = unit.pieces(world)
        unit.check_size(output_tensor.numel(), sum(p.chunk for p in pieces), "reduce-scatter output")
        step = state.begin(unit.index)
        compress = state.state.compressing(step)
        plan = cached_plan(state.engine, unit.index, pieces, world, rank, input_tensor.dtype, input_tensor.device,
                           compress)
        reduce_scatter_(state.engine, plan, input_tensor, output_tensor, group, step)
        return None  # FSDP reads the output when the call returns: the work is done


class _DecodeOnWait(dist.Work):
    """The work handle an asynchronous gather returns: FSDP waits on it before reading the
    output, and waiting decodes."""

    def __init__(self, pending: gather.Pending, stats: dict):
        super().__init__()
        self._pending, self._stats = pending, stats

    def wait(self, timeout=None) -> bool:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait()
            self._stats["codec_seconds"] += pending.codec_seconds
        return True

    def is_completed(self) -> bool:
        return self._pending is None  # decoded by a wait


class CompressedAllGather:
    """FSDP2's ``AllGather`` comm of one unit (``set_custom_all_gather``): the parameter
    all-gather, compressed with the state's all-gather codec (engine/all_gather.py)."""

    def __init__(self, unit: _Unit):
        self.unit = unit

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, async_op: bool = False):
        unit, front = self.unit, self.unit.state
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if input_tensor.dim() != 1 or output_tensor.dim() != 1 or output_tensor.numel() != world * input_tensor.numel():
            raise GradcompError(f"gradcomp.fsdp: {unit.what()}: an all-gather input of {input_tensor.numel()} and "
                                f"output of {output_tensor.numel()} elements do not fit {world} ranks")
        front.agree_once(unit, input_tensor.device)
        stats, plain = front.stats, gather.ring_bytes(input_tensor, world)
        why_exact = self._exact_reason(group, input_tensor, world)
        if why_exact is not None:
            if why_exact:
                front.say_once((unit.index, why_exact), "gradcomp.fsdp: %s: %s; this unit's gathers stay exact",
                               unit.what(), why_exact)
            gather.count(stats, plain, plain)
            return all_gather_single(output_tensor, input_tensor, group, async_op=async_op)  # FSDP's own gather
        plan = unit.gather_plan(front, world, rank, input_tensor.dtype, input_tensor.device)
        if input_tensor.dtype not in front.all_gather_codec.dtypes:  # e.g. all_gather="bf16" of bf16 weights
            front.say_once("dtype", "gradcomp.fsdp: all_gather=%s does not take %s weights: they are gathered exactly",
                           front.all_gather_codec.name, str(input_tensor.dtype).replace("torch.", ""))
        pending, sent = gather.start_all_gather(front.all_gather_codec, plan, input_tensor, output_tensor, group)
        gather.count(stats, sent, plain)
        if async_op:
            return _DecodeOnWait(pending, stats)
        pending.wait()
        stats["codec_seconds"] += pending.codec_seconds
        return None  # FSDP reads the output when the call returns: the work is done

    def _exact_reason(self, group, input_tensor: torch.Tensor, world: int) -> str | None:
        """Why this gather runs exactly ("" for no reason worth a log), or None to compress."""
        unit = self.unit
        if group is not unit.group.mesh_info.shard_process_group:
            # reshard_after_forward=<int>: backward's gather inside the node re-gathers the
            # weights forward decoded; compressing again would give backward other weights
            return ""
        if input_tensor.dtype == torch.uint8:
            return ("its parameters have different dtypes, so FSDP gathers them as bytes; gradcomp compresses "
                    "gathers of one floating dtype")
        expected = sum(p.chunk for p in unit.gathered(world))
        if input_tensor.numel() != expected:
            return (f"its gather input holds {input_tensor.numel()} elements but its parameters' shards "
                    f"{expected} (an fsdp_pre_all_gather extension?)")
        return None


class CompressedReplicaAllReduce:
    """FSDP2's all-reduce hook of one unit (``set_all_reduce_hook``): the replica all-reduce
    of HSDP, compressed, averaged over the replica group, in place on the shard."""

    def __init__(self, unit: _Unit, replicate_group):
        self.unit = unit
        self.replicate_group = replicate_group

    def __call__(self, reduce_output: torch.Tensor) -> None:
        unit, state, group = self.unit, self.unit.state, self.replicate_group
        if not unit.group.all_reduce_grads:
            raise GradcompError(f"gradcomp.fsdp: {unit.what()}: set_requires_all_reduce(False) is not supported with "
                                "gradcomp's replica all-reduce (FSDP runs the hook on every microbatch's shard); "
                                "accumulate with set_requires_gradient_sync(False) instead")
        mesh_info = unit.group.mesh_info
        shard_world, shard_rank = mesh_info.shard_mesh_size, mesh_info.shard_mesh_rank
        state.agree_once(unit, reduce_output.device)
        if reduce_output.is_cuda:
            # FSDP keeps this buffer alive for its native HSDP only: without this, a cast or an
            # accumulation after the hook frees it to the allocator while the exchange queued on
            # this stream still reads and writes it (no host sync either way)
            reduce_output.record_stream(torch.cuda.current_stream(reduce_output.device))
        pieces = unit.pieces(shard_world)
        unit.check_size(reduce_output.numel(), sum(p.chunk for p in pieces), "reduce-scattered shard")
        step = state.begin(unit.index)
        entries = []
        for p in pieces:  # the chunk's valid part and its padding are keyed apart
            real = p.real[shard_rank]
            entries.append((p.key, real, reduce_output.dtype))
            if p.chunk > real:
                entries.append((p.key + "#pad", p.chunk - real, reduce_output.dtype))
        ordinals = state.engine.ordinals(entries)
        if unit.topology is None:  # the replica group spans nodes: every byte it sends crosses one
            unit.topology = Topology.of(dist.get_world_size(group), dist.get_rank(group), 1)
        call = Call(group, unit.topology, step, f"{unit.what()} (step {step})", state.state.compressing(step))
        run_to_end(state.engine.exchange(reduce_output, ordinals, call))
        if state.all_gather_codec is not None:  # the exchange counted its bytes: the total moves
            update_total_ratio(state.stats)


def register(model: torch.nn.Module, codec="int8", *, all_gather=None, replicate_group=None,
             **options) -> FSDPState:
    """Compresses the gradient reduction, and optionally the parameter all-gather, of every
    FSDP2 unit in ``model``'s tree.

    Args:
        model: a module on which ``fully_shard`` was called (its root and, typically, its
            blocks): every ``FSDPModule`` in its tree is registered.
        codec: the reduction's spec (``"int8"``, ``"int4:ef=0:stochastic"``,
            ``"int8:residual=bf16"``, ...) or a Codec: a block quantizer or a cast codec (fp16,
            bf16). Top-k and random-k choose per whole parameter and are refused. None: FSDP's
            own exact reduce-scatter stays (with ``all_gather``: only the gather is compressed).
        all_gather: None (default): FSDP's exact parameter all-gather. A quantizer spec
            (``"int8"``, ``"int4"``, ``"int8:block=128"``; rounded to nearest, no error feedback)
            or fp16/bf16: every unit's parameter all-gather is compressed (with a quantizer,
            parameters below min_numel are gathered exactly; a cast casts every float32
            parameter). Independent of ``codec``.
        replicate_group: None: FSDP over the whole group, its reduce-scatter compressed.
            A ProcessGroup or a 2-D DeviceMesh ``(replicate, shard)``: HSDP on a model sharded
            with ``fully_shard`` over the shard (intra-node) mesh only; FSDP's reduce-scatter
            stays exact and gradcomp compresses the all-reduce across the replica group.
        **options: State options: min_numel, start_step, seed, force_compression (compress
            even over one replica: HSDP on one node; FSDP itself never calls its reduce-scatter
            at world size 1), and (HSDP only) chunk_numel.

    Returns the :class:`FSDPState`: keep it, checkpoint it per rank with ``state_dict()``.
    """
    FSDPModule = _fsdp_api()  # first: without FSDP2 nothing else can be checked
    spec, gather_spec = _check_options(codec, all_gather, replicate_group, options)
    modules, names, groups = _units_of(model, FSDPModule)
    hsdp = replicate_group is not None
    if hsdp:
        group = _replicate_of(replicate_group)
        _require(modules[0], ("set_all_reduce_hook",), "HSDP")
    else:
        group = groups[0][1].mesh_info.shard_process_group
        if spec is not None:
            _require(modules[0], ("set_custom_reduce_scatter", "set_force_sum_reduction_for_comms",
                                  "set_gradient_divide_factor"), "a compressed reduce-scatter")
    if gather_spec is not None:
        _require(modules[0], ("set_custom_all_gather",), "a compressed all-gather")
    state = FSDPState(spec, group, mode="hsdp" if hsdp else "reduce_scatter", all_gather=gather_spec,
                      replicate_group=group if hsdp else None, **options)
    first = 0
    for index, (module, param_group) in enumerate(groups):
        unit = _Unit(state, index, module, param_group, names, first)
        state.units.append(unit)
        first += len(unit.params)
        _install(module, unit, gathers=gather_spec is not None, reduces=spec is not None,
                 replicate_group=group if hsdp else None)
    return state


def _install(module, unit: _Unit, *, gathers: bool, reduces: bool, replicate_group) -> None:
    """Sets one FSDP unit's comms and hooks to gradcomp's."""
    if gathers:
        module.set_custom_all_gather(CompressedAllGather(unit))
    if not reduces:
        return
    if hasattr(module, "set_reduce_scatter_unused_params"):  # the layout then stays fixed
        module.set_reduce_scatter_unused_params(True, recurse=False)
    if replicate_group is not None:
        module.set_all_reduce_hook(CompressedReplicaAllReduce(unit, replicate_group))
    else:
        module.set_custom_reduce_scatter(CompressedReduceScatter(unit))
        module.set_force_sum_reduction_for_comms(True)
        module.set_gradient_divide_factor(1.0)


def _check_options(codec, all_gather, replicate_group, options: dict) -> tuple:
    """The reduction's and the gather's codecs, parsed (None where FSDP's own runs), once the
    options are known to suit FSDP."""
    for name in _NOT_OPTIONS:
        if name in options:
            raise ValueError(f"gradcomp.fsdp: {name} is a DDP option; with FSDP the shard mesh is the node: give "
                             "replicate_group for HSDP")
    gather_spec = gather.check_codec(all_gather) if all_gather is not None else None
    if codec is None:
        if all_gather is None:
            raise ValueError("gradcomp.fsdp: codec=None and all_gather=None compress nothing: give a codec for the "
                             "reduce-scatter, all_gather= for the parameter gather, or both")
        if replicate_group is not None:
            raise ValueError("gradcomp.fsdp: with replicate_group the replica all-reduce is gradcomp's: give it a "
                             "codec (codec=None keeps FSDP's own reduction, which has no replica all-reduce here)")
        if "start_step" in options or "chunk_numel" in options:
            raise ValueError("gradcomp.fsdp: start_step and chunk_numel apply to the reduction, which codec=None "
                             "leaves to FSDP")
        return None, gather_spec
    spec = codecs.parse(codec)
    if isinstance(spec, codecs.Sparsifier):
        raise ValueError(f"gradcomp.fsdp: {spec.name} chooses its values per whole parameter, which a sharded "
                         "reduction never holds; use a quantizer (int8, int4, int2, sign) or fp16/bf16")
    if isinstance(spec, codecs.PowerSGD):
        raise ValueError("gradcomp.fsdp: powersgd needs each parameter's whole gradient matrix (P = MQ is "
                         "orthogonalized over all its rows), which FSDP's reduce-scatter and HSDP's shards never hold; "
                         "use a quantizer (int8, int4, int2, sign) or fp16/bf16, or powersgd with DDP")
    if replicate_group is None and "chunk_numel" in options:
        raise ValueError("gradcomp.fsdp: chunk_numel applies to HSDP's replica all-reduce only")
    return spec, gather_spec


def _units_of(model: torch.nn.Module, FSDPModule) -> tuple[list, dict, list]:
    """The FSDP modules of ``model``'s tree, the names of its modules and parameters (by id),
    and the (module, parameter group) pairs to register, refusing what gradcomp cannot serve."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise ValueError("gradcomp.fsdp.register: the model holds no FSDPModule; call fully_shard on it (and its "
                         "blocks) first")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    names.update({id(m): n for n, m in model.named_modules()})
    groups = []
    for module in modules:
        param_groups = module._get_fsdp_state()._fsdp_param_groups
        if len(param_groups) > 1:
            raise ValueError(f"gradcomp.fsdp: FSDP unit {names.get(id(module), '?')!r} has {len(param_groups)} "
                             "parameter groups (a per-parameter mesh); torch's custom reduce-scatter and all-reduce "
                             "hooks take one")
        for param_group in param_groups:
            if param_group._is_hsdp or type(param_group.mesh_info).__name__ in ("DDPMeshInfo", "HSDPMeshInfo"):
                raise ValueError("gradcomp.fsdp: this model is sharded with torch's native HSDP (a 2-D mesh): its "
                                 "exact replica all-reduce runs before any hook and cannot be replaced. Shard with "
                                 "fully_shard(mesh=mesh['shard']) and pass replicate_group=mesh")
            if isinstance(getattr(param_group, "_reduce_scatter_comm", None), CompressedReduceScatter) or \
                    isinstance(getattr(param_group, "_all_reduce_hook", None), CompressedReplicaAllReduce) or \
                    isinstance(getattr(param_group, "_all_gather_comm", None), CompressedAllGather):
                raise ValueError("gradcomp.fsdp: this model is already registered with gradcomp")
            groups.append((module, param_group))
    if not groups:
        raise ValueError("gradcomp.fsdp.register: the model's FSDP units hold no parameters")
    return modules, names, groups
