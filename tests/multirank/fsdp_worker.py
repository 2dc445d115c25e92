"""One rank of a multi-process FSDP2 scenario (run by tests/support/dist_utils.run_ranks with
worker=this file; tests/support/worker_main.main runs the scenario).

Usage: PYTHONPATH=tests/support python fsdp_worker.py SCENARIO OUT_DIR JSON_ARGS   (RANK, WORLD_SIZE, MASTER_* in env)
Writes OUT_DIR/rank{r}.pt with what the scenario records.
"""

import os

import gradcomp
import gradcomp.fsdp
import reference
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64, None: None}


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 3 * width)
        self.down = nn.Linear(3 * width, width)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    """Several FSDP units (each block, and the root holding the input and head layers) with
    odd dim-0 sizes (padding at 2 and 4 ranks; the head's bias has no rows on rank 3 of 4)
    and parameters on both sides of min_numel."""

    def __init__(self, width: int = 37, blocks: int = 2, inputs: int = 13, outputs: int = 5, unused: bool = False,
                 frozen: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(inputs, width)
        if unused:  # compressed, but never in the graph: no gradient, ever
            self.spare = nn.Linear(width, 2 * width, bias=False)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, outputs)
        if frozen:  # a frozen parameter in block 0 (gathered, never reduced), of that dtype
            self.blocks[0].frozen = nn.Parameter(torch.randn(3 * width, width).to(DTYPES[frozen]), requires_grad=False)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def batch(rank: int, step: int, micro: int = 0, n: int = 8, inputs: int = 13, outputs: int = 5):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(n, inputs, generator=g), torch.randn(n, outputs, generator=g)


def shard(model: Net, mesh, args) -> Net:
    mp = None
    if args.get("reduce_dtype") or args.get("param_dtype"):
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[args.get("param_dtype")],
                                  reduce_dtype=DTYPES[args.get("reduce_dtype")])
    kw = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    block_kw = dict(kw)
    if args.get("shard1"):  # weights whose dim 1 divides evenly (and dim 0 does not) shard on dim 1
        from torch.distributed.tensor import Shard

        n = mesh.size()
        block_kw["shard_placement_fn"] = lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % n == 0 and \
            p.shape[0] % n else None
    if "reshard" in args:  # reshard_after_forward: True, False, or the group size backward gathers over
        block_kw["reshard_after_forward"] = args["reshard"]
    for b in model.blocks:
        fully_shard(b, **block_kw)
    fully_shard(model, **kw)
    return model


def units_of(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class Spy:
    """Records what a unit's comm (or hook) was given and produced."""

    def __init__(self, inner, unit: int, log: list, kind: str):
        self.inner, self.unit, self.log, self.kind = inner, unit, log, kind

    def allocate(self, size, *, dtype, device):
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, *a, **kw):
        if self.kind == "ag":  # recorded once the gather is complete: at once, or when FSDP waits
            before = kw["input_tensor"].clone()
            work = self.inner(*a, **kw)

            def record():
                self.log.append((self.unit, kw["group"].size(), before, kw["output_tensor"].clone(), kw["async_op"]))
            if work is None:
                record()
                return None
            assert isinstance(work, dist.Work), f"an asynchronous gather returned {type(work).__name__}"
            return Recorded(work, record)
        if self.kind == "rs":
            inp = kw["input_tensor"].clone()
            r = self.inner(*a, **kw)
            self.log.append((self.unit, inp, kw["output_tensor"].clone()))
            return r
        before = a[0].clone()
        self.inner(*a, **kw)
        self.log.append((self.unit, before, a[0].clone()))


class Recorded(dist.Work):
    """An asynchronous gather's work, recording the output when FSDP waits for it."""

    def __init__(self, inner, record):
        super().__init__()
        self.inner, self.record = inner, record

    def wait(self, timeout=None):
        self.inner.wait()
        self.record()
        return True


class ReferenceGather:
    """A pure-torch compressed all-gather (tests/support/reference.py) as FSDP's comm: an exact
    gather, then every row quantized and dequantized; exact over a smaller group (hpZ)."""

    def __init__(self, unit, spec: str, min_numel: int):
        from gradcomp import codecs

        codec = codecs.parse(spec)
        self.unit, self.min_numel = unit, min_numel
        self.block, self.bits = getattr(codec, "block_size", 0), codec.bits
        self.wire = getattr(codec, "wire_dtype", None)

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        dist.all_gather_into_tensor(output_tensor, input_tensor, group=group)
        if group.size() != dist.get_world_size() or output_tensor.dtype == torch.uint8:
            return None
        world = group.size()
        pieces = self.unit.gathered(world)
        wire = self.wire if input_tensor.dtype == torch.float32 else None
        inputs = [r.clone() for r in output_tensor.view(world, -1)]
        min_numel = self.min_numel if wire is None else 0
        output_tensor.copy_(reference.fsdp_all_gather(inputs, pieces, self.block, self.bits, min_numel, wire))
        return None


def layout_of(state) -> list:
    """Every unit's pieces (engine.reduce_scatter.Chunked) as plain dicts."""
    units = []
    for m in state.units:
        units.append([vars(p) | {"real": list(p.real)} for p in m.pieces(m.group.mesh_info.shard_mesh_size)])
    return units


def fields(state) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()  # the job's ranks name an FSDP state's entries
    return {"rank": rank, "world_size": world, "step": state.step, "seed": state.seed, "stats": dict(state.stats),
            "config": state.config(), "residuals": {k: r.clone() for k, r in state.residuals.items()}}


def local_grads(model) -> dict:
    return {n: p.grad.to_local().clone() for n, p in model.named_parameters() if p.grad is not None}


def scenario_train(rank, world, args):
    per_node = args.get("per_node")
    if per_node:  # HSDP: FSDP inside a node, gradcomp across
        mesh2 = init_device_mesh("cpu", (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))
        mesh = mesh2["shard"]
    else:
        mesh2, mesh = None, init_device_mesh("cpu", (world,))
    model = shard(Net(args.get("width", 37), unused=args.get("unused", False), frozen=args.get("frozen")), mesh,
                  args)
    log: list = []
    gathers: list = []
    state = None
    if args.get("codec") or args.get("all_gather"):
        opts = dict(args.get("state", {}))
        state = gradcomp.fsdp.register(model, args.get("codec"), all_gather=args.get("all_gather"),
                                       replicate_group=mesh2 if per_node else None, **opts)
        for i, m in enumerate(units_of(model)):
            pg = m._get_fsdp_state()._fsdp_param_group
            if args.get("reference_gather"):  # the same run through the pure-torch gather
                pg._all_gather_comm = ReferenceGather(state.units[i], args["all_gather"], opts["min_numel"])
            if args.get("all_gather"):
                pg._all_gather_comm = Spy(pg._all_gather_comm, i, gathers, "ag")
            if not args.get("codec"):
                continue
            if per_node:
                pg._all_reduce_hook = Spy(pg._all_reduce_hook, i, log, "ar")
            else:
                pg._reduce_scatter_comm = Spy(pg._reduce_scatter_comm, i, log, "rs")
    opt = torch.optim.AdamW(model.parameters(), lr=args.get("lr", 1e-2))
    out = {"calls": {}, "grads": {}, "loss": {}, "gathers": {}}
    ckpt = args.get("ckpt")
    start, stop = args.get("start", 0), args.get("stop", args.get("steps", 3))
    if args.get("load"):
        load(args["load"], ckpt, rank, model, opt, state)
        out["loaded"] = fields(state)
    micro = args.get("accumulate", 1)
    for step in range(start, stop):
        opt.zero_grad()
        for k in range(micro):
            if micro > 1:
                model.set_requires_gradient_sync(k == micro - 1)
            x, y = batch(rank, step, k)
            if args.get("poison") == {"rank": rank, "step": step}:
                y[0, 0] = float("inf")  # every gradient of this rank becomes non-finite
            if args.get("poison_weight") == {"rank": rank, "step": step}:
                with torch.no_grad():  # one weight of this rank's shard
                    model.blocks[0].up.weight.to_local().view(-1)[0] = float("inf")
            if args.get("async_unshard"):  # the root's gather started ahead, waited on by forward
                model.unshard(async_op=True)
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
        out["loss"][step] = float(loss)
        out["calls"][step] = list(log)
        log.clear()
        out["gathers"][step] = list(gathers)
        gathers.clear()
        out["grads"][step] = local_grads(model)
        opt.step()
    if state is not None:
        out["final"] = fields(state)
        out["layout"] = layout_of(state)
        out["gathered"] = [[vars(p) | {"real": list(p.real)} for p in m.gathered(world if not per_node else per_node)]
                           for m in state.units]
        out["first_blocks"] = {k: state.engine.first_block(k) for k in state.engine.keys()}
    out["params"] = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    if args.get("save"):
        save(args["save"], ckpt, rank, model, opt, state)
    return out


def save(how, ckpt, rank, model, opt, state):
    if how == "torch":
        torch.save({"model": {n: p.to_local().detach().clone() for n, p in model.named_parameters()},
                    "opt": opt.state_dict(), "gradcomp": state.state_dict()}, os.path.join(ckpt, f"rank{rank}.pt"))
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "opt": osd, "gradcomp": state}, checkpoint_id=os.path.join(ckpt, "dcp"))


def load(how, ckpt, rank, model, opt, state):
    if how == "torch":
        saved = torch.load(os.path.join(ckpt, f"rank{rank}.pt"), weights_only=False)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.to_local().copy_(saved["model"][n])
        opt.load_state_dict(saved["opt"])
        state.load_state_dict(saved["gradcomp"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "opt": osd, "gradcomp": state}
    dcp.load(sd, checkpoint_id=os.path.join(ckpt, "dcp"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["opt"])


def scenario_errors(rank, world, args):
    """Each misuse, caught: returns {name: message}."""
    out = {}
    mesh = init_device_mesh("cpu", (world,))

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            out[name] = f"{type(e).__name__}: {e}"

    attempt("not_sharded", lambda: gradcomp.fsdp.register(Net(), "int8"))
    attempt("topk", lambda: gradcomp.fsdp.register(shard(Net(), mesh, {}), "topk:0.01"))
    attempt("ranks_per_node", lambda: gradcomp.fsdp.register(shard(Net(), mesh, {}), "int8", ranks_per_node=2))
    twice = shard(Net(), mesh, {})
    gradcomp.fsdp.register(twice, "int8")
    attempt("twice", lambda: gradcomp.fsdp.register(twice, "int8"))
    if world % 2 == 0:
        m2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        native = Net()
        for b in native.blocks:
            fully_shard(b, mesh=m2)
        fully_shard(native, mesh=m2)
        attempt("native_hsdp", lambda: gradcomp.fsdp.register(native, "int8", replicate_group=m2))
    # the parameters requiring grad change after the first step
    frozen = shard(Net(), mesh, {})
    gradcomp.fsdp.register(frozen, "int8", min_numel=256)
    x, y = batch(rank, 0)
    ((frozen(x) - y) ** 2).mean().backward()
    frozen.blocks[0].up.weight.requires_grad_(False)
    attempt("layout_changed", lambda: ((frozen(x) - y) ** 2).mean().backward())
    # a comm called with another op
    saved = FSDPModule.set_custom_reduce_scatter  # a torch without the hook (< 2.9)
    del FSDPModule.set_custom_reduce_scatter
    try:
        attempt("old_torch", lambda: gradcomp.fsdp.register(shard(Net(), mesh, {}), "int8"))
    finally:
        FSDPModule.set_custom_reduce_scatter = saved
    attempt("chunk_numel", lambda: gradcomp.fsdp.register(shard(Net(), mesh, {}), "int8", chunk_numel=4096))
    # the replica group of a model sharded over the whole world: every rank holds another shard
    wrong = shard(Net(), mesh, {})
    gradcomp.fsdp.register(wrong, "int8", replicate_group=dist.group.WORLD)
    attempt("replicas_hold_other_shards", lambda: ((wrong(x) - y) ** 2).mean().backward())
    # a divide factor set after register would scale every gradient silently
    rescaled = shard(Net(), mesh, {})
    gradcomp.fsdp.register(rescaled, "int8")
    rescaled.set_gradient_divide_factor(2.0)
    attempt("divide_factor", lambda: ((rescaled(x) - y) ** 2).mean().backward())
    other = shard(Net(), mesh, {})
    gradcomp.fsdp.register(other, "int8")
    comm = units_of(other)[0]._get_fsdp_state()._fsdp_param_group._reduce_scatter_comm
    attempt("avg", lambda: comm(torch.zeros(world), torch.zeros(world * world), dist.group.WORLD, dist.ReduceOp.AVG))
    attempt("gather_topk", lambda: gradcomp.fsdp.register(shard(Net(), mesh, {}), "int8", all_gather="topk:0.1"))
    attempt("gather_sign", lambda: gradcomp.fsdp.register(shard(Net(), mesh, {}), "int8", all_gather="sign"))
    attempt("gather_stochastic", lambda: gradcomp.fsdp.register(shard(Net(), mesh, {}), "int8",
                                                                all_gather="int4:stochastic"))
    attempt("nothing", lambda: gradcomp.fsdp.register(shard(Net(), mesh, {}), None))
    attempt("gather_only_hsdp", lambda: gradcomp.fsdp.register(shard(Net(), mesh, {}), None, all_gather="int8",
                                                               replicate_group=dist.group.WORLD))
    attempt("gather_only_start_step", lambda: gradcomp.fsdp.register(shard(Net(), mesh, {}), None, all_gather="int8",
                                                                     start_step=3))
    # a checkpoint of int8 gathers, loaded where the gathers are int4
    saved = gradcomp.fsdp.register(shard(Net(), mesh, {}), "int8", all_gather="int8").state_dict()
    other_gathers = gradcomp.fsdp.register(shard(Net(), mesh, {}), "int8", all_gather="int4")
    attempt("gather_codec_changed", lambda: other_gathers.load_state_dict(saved))
    return out


SCENARIOS = {"train": scenario_train, "errors": scenario_errors}


if __name__ == "__main__":
    from worker_main import main

    main(SCENARIOS)
