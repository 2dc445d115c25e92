"""One rank of a multi-process DDP scenario (run by tests/support/dist_utils.run_ranks with
worker=this file; tests/support/worker_main.main runs the scenario).

Usage: PYTHONPATH=tests/support python ddp_worker.py SCENARIO OUT_DIR JSON_ARGS   (RANK, WORLD_SIZE, MASTER_* in env)
Writes OUT_DIR/rank{r}.pt with what the scenario records.
"""

import contextlib
import os
import pickle
import sys
import time
from datetime import timedelta

import gradcomp
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from worker_main import main, state_fields


def DDP(module, *, bucket_cap_mb: float, **kwargs) -> DistributedDataParallel:
    """DistributedDataParallel with today's bucket rule on every torch: the cap given caps the
    first bucket too. Older releases (2.3 among them) capped the first bucket at
    dist._DEFAULT_FIRST_BUCKET_BYTES (1 MiB) whatever the cap, giving the scenarios fewer
    buckets than they are written for."""
    saved = dist._DEFAULT_FIRST_BUCKET_BYTES
    dist._DEFAULT_FIRST_BUCKET_BYTES = int(bucket_cap_mb * 2**20)
    try:
        return DistributedDataParallel(module, bucket_cap_mb=bucket_cap_mb, **kwargs)
    finally:
        dist._DEFAULT_FIRST_BUCKET_BYTES = saved


def make_model(layers: int, width: int, seed: int = 0, dtype=torch.float32, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width, bias=bias), nn.Tanh()]
    return nn.Sequential(*mods).to(dtype)


class Permuted(nn.Module):
    """Layers applied in the reverse of their registration order: DDP's first-iteration
    buckets follow registration order, its rebuilt ones the order gradients become ready,
    so the rebuild after step 0 really changes which parameters sit where."""

    def __init__(self, layers: int, width: int, dtype=torch.float32, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in range(layers)).to(dtype)

    def forward(self, x):
        for layer in reversed(self.layers):
            x = torch.tanh(layer(x))
        return x


class WithUnused(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.unused = nn.Linear(width, width)

    def forward(self, x):
        return self.used(x)


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1).float().clone() for p in model.parameters() if p.grad is not None])


def batch(rank: int, step: int, width: int, n: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, width, generator=g).to(dtype), torch.randn(n, width, generator=g).to(dtype)


def scenario_train(rank, world, args):
    """DDP training with a gradcomp hook; records each step's averaged gradient, the exact
    mean of the ranks' local gradients (computed on a twin model, reduced exactly), the
    losses and the hook's stats."""
    width, layers, steps = args.get("width", 64), args.get("layers", 10), args["steps"]
    dtype = getattr(torch, args.get("dtype", "float32"))
    unused = args.get("unused", False)
    if unused:
        model, twin = WithUnused(width), WithUnused(width)
    elif args.get("permuted"):
        bias = args.get("bias", True)
        model, twin = Permuted(layers, width, dtype, bias), Permuted(layers, width, dtype, bias)
    else:
        bias = args.get("bias", True)
        model, twin = (make_model(layers, width, dtype=dtype, bias=bias) for _ in range(2))
    twin.load_state_dict(model.state_dict())
    group, gworld = None, world
    if args.get("subgroups"):  # e.g. [[0, 1], [2, 3]]: one DDP per subgroup, side by side
        groups = [dist.new_group(ranks) for ranks in args["subgroups"]]
        group, ranks = next((g, r) for g, r in zip(groups, args["subgroups"]) if rank in r)
        gworld = len(ranks)
    ddp = DDP(model, bucket_cap_mb=args.get("bucket_cap_mb", 0.02), find_unused_parameters=unused,
              process_group=group, static_graph=args.get("static_graph", False),
              gradient_as_bucket_view=args.get("grad_view", False),
              **({"bucket_cap_mb_list": args["bucket_cap_mb_list"]} if "bucket_cap_mb_list" in args else {}))
    kwargs = {**args.get("state", {}), **args.get("state_per_rank", {}).get(str(rank), {})}
    codec = args.get("codec_per_rank", {}).get(str(rank), args.get("codec", "int8"))
    layouts = []  # (step, bucket index, ordinals of its parameters)
    if args.get("style") == "torch":
        state = gradcomp.State(codec=codec, **kwargs)
        ddp.register_comm_hook(state, gradcomp.comm_hook)
    elif args.get("style") == "recording":
        state = gradcomp.State(codec=codec, **kwargs)

        def recording_hook(st, bucket):
            step = st.step
            fut = gradcomp.comm_hook(st, bucket)
            layouts.append((step, bucket.index(), tuple(st.front.ordinal_of[id(p)] for p in bucket.parameters())))
            return fut

        ddp.register_comm_hook(state, recording_hook)
    else:
        state = gradcomp.register(ddp, codec, **kwargs)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.get("lr", 0.01))
    twin_opt = torch.optim.SGD(twin.parameters(), lr=args.get("lr", 0.01))
    out = {"grads": [], "exact": [], "losses": []}
    micro = args.get("accumulate", 1)  # micro-batches per step, all but the last under no_sync
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        twin.load_state_dict(model.state_dict())
        twin_opt.zero_grad(set_to_none=False)
        for m in range(micro):
            x, y = batch(rank, 0 if args.get("fixed_batch") else step * micro + m, width, dtype=dtype)
            with ddp.no_sync() if m < micro - 1 else contextlib.nullcontext():
                loss = ((ddp(x) - y) ** 2).mean()
                loss.backward()
            # exact reference: the same local gradient on the twin (same weights), averaged exactly
            ((twin(x) - y) ** 2).mean().backward()
        exact = flat_grads(twin)
        out.setdefault("local", []).append(exact.clone())
        dist.all_reduce(exact, group=group)
        exact /= gworld
        out["grads"].append(flat_grads(model))
        out["exact"].append(exact)
        out["losses"].append(float(loss))
        opt.step()
    out["stats"] = dict(state.stats)
    out["layouts"] = layouts
    out["residual_norm"] = float(sum(r.float().norm() ** 2 for r in state.residuals.values()) ** 0.5)
    out["ordinals"] = [state.front.ordinal_of.get(id(p), -1) for p in model.parameters()]
    out["residuals"] = {o: r.clone() for o, r in state.residuals.items()}
    out["step"] = state.step
    out["seed"] = state.seed
    clone = pickle.loads(pickle.dumps(state))
    out["pickled"] = {"step": clone.step, "stats": clone.stats, "residuals": clone.residuals,
                      "config": clone.config(), "process_group": clone.process_group, "seed": clone.seed}
    return out


def scenario_order(rank, world, args):
    """Many buckets, many steps of training with gradcomp's int8 hook (counting the buckets
    it sees). Records each step's averaged gradients and the local ones of a twin with the
    same weights (the reference's input), a list a step in parameter order; the parameters'
    ordinals, the final residuals and the stats."""
    width, layers, steps = args.get("width", 64), args.get("layers", 12), args["steps"]
    model, twin = make_model(layers, width), make_model(layers, width)
    ddp = DDP(model, bucket_cap_mb=args.get("bucket_cap_mb", 0.01))
    state = gradcomp.State("int8")
    seen = set()

    def counting_hook(st, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        seen.add(bucket.index())
        return gradcomp.comm_hook(st, bucket)

    ddp.register_comm_hook(state, counting_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    out = {"grads": [], "local": []}
    for step in range(steps):
        x, y = batch(rank, step, width)
        opt.zero_grad()
        ((ddp(x) - y) ** 2).mean().backward()
        twin.load_state_dict(model.state_dict())
        twin.zero_grad()
        ((twin(x) - y) ** 2).mean().backward()
        out["grads"].append([p.grad.detach().clone() for p in model.parameters()])
        out["local"].append([q.grad.detach().clone() for q in twin.parameters()])
        opt.step()
    out.update(steps=steps, buckets=len(seen), stats=dict(state.stats),
               ordinals=[state.front.ordinal_of[id(p)] for p in model.parameters()],
               residuals={o: r.clone() for o, r in state.residuals.items()})
    return out


def scenario_resume(rank, world, args):
    """Training with SGD momentum, steps [start, stop): optionally loads (model, optimizer and
    gradcomp state, torch.load(weights_only=True)) before and saves after, every rank its own
    file. Records each step's averaged gradient and the final weights."""
    width, start, stop = args.get("width", 64), args["start"], args["stop"]
    ckpt = args.get("ckpt")
    model = make_model(args.get("layers", 6), width)
    saved = None
    if args.get("load"):
        src = args.get("load_rank_map", {}).get(str(rank), rank)
        saved = torch.load(os.path.join(ckpt, f"rank{src}.ckpt"), weights_only=True)
        model.load_state_dict(saved["model"])
    ddp = DDP(model, bucket_cap_mb=args.get("bucket_cap_mb", 0.02))
    state = gradcomp.register(ddp, args["codec"], **args.get("state", {}))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    out = {"grads": {}, "losses": {}}
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        if args.get("load_gradcomp", True):
            try:
                state.load_state_dict(saved["gradcomp"], **args.get("load_kwargs", {}))
            except ValueError as e:
                out["load_error"] = str(e)
                return out
    for step in range(start, stop):
        x, y = batch(rank, step, width)
        opt.zero_grad()
        loss = ((ddp(x) - y) ** 2).mean()
        loss.backward()
        out["grads"][step] = flat_grads(model)
        out["losses"][step] = float(loss)
        opt.step()
    out["params"] = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    out["seed"], out["step"], out["stats"] = state.seed, state.step, dict(state.stats)
    out["residuals"] = {o: r.clone() for o, r in state.residuals.items()}
    if args.get("save"):
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "gradcomp": state.state_dict()},
                   os.path.join(ckpt, f"rank{rank}.ckpt"))
    return out


def scenario_nonfinite(rank, world, args):
    """Training under torch.amp.GradScaler; at one step one rank's gradient of one parameter
    gets a NaN or Inf (a tensor hook, so it enters DDP's bucket). Records per step the
    unscaled averaged gradient, whether the step was taken, the scale, the exact mean of the
    local gradients (twin model) and whether every residual is finite."""
    width, steps = args.get("width", 64), args["steps"]
    model, twin = make_model(args.get("layers", 6), width), make_model(args.get("layers", 6), width)
    ddp = DDP(model, bucket_cap_mb=args.get("bucket_cap_mb", 0.02))
    state = gradcomp.register(ddp, args["codec"])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=args.get("init_scale", 1024.0))
    target = list(model.parameters())[args.get("bad_param", 2)]
    bad = float(args.get("value", "nan"))

    def poison(g):
        g = g.clone()
        g.view(-1)[5] = bad
        return g

    out = {k: [] for k in ("grads", "exact", "taken", "scale", "residuals_finite", "param_finite", "losses")}
    for step in range(steps):
        x, y = batch(rank, step, width)
        opt.zero_grad()
        handle = target.register_hook(poison) if (rank == args["bad_rank"] and step == args["bad_step"]) else None
        loss = ((ddp(x) - y) ** 2).mean()
        scaler.scale(loss).backward()
        if handle is not None:
            handle.remove()
        scaler.unscale_(opt)
        out["grads"].append(flat_grads(model))
        out["param_finite"].append([bool(torch.isfinite(p.grad).all()) for p in model.parameters()])
        twin.load_state_dict(model.state_dict())
        twin.zero_grad()
        ((twin(x) - y) ** 2).mean().backward()
        exact = flat_grads(twin)
        dist.all_reduce(exact)
        out["exact"].append(exact / world)
        before = [p.detach().clone() for p in model.parameters()]
        out["scale"].append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        out["taken"].append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
        out["residuals_finite"].append(all(bool(torch.isfinite(r).all()) for r in state.residuals.values()))
        out["losses"].append(float(loss))
    out["stats"] = dict(state.stats)
    out["n_residuals"] = len(state.residuals)
    return out


def scenario_failure(rank, world, args):
    """A peer fails at one step: it exits ("exit") or stalls without exiting ("stall"). The
    survivors record the error their backward raised and how long it took to come."""
    width = args.get("width", 64)
    model = make_model(4, width)
    ddp = DDP(model, bucket_cap_mb=0.02)
    gradcomp.register(ddp, args.get("codec", "int8"), timeout=timedelta(seconds=args["timeout_s"]))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    out = {"steps_done": 0}
    for step in range(args["steps"]):
        if rank == args["bad_rank"] and step == args["bad_step"]:
            if args["how"] == "exit":
                os._exit(3)
            time.sleep(args["stall_s"])
            os._exit(4)
        x, y = batch(rank, step, width)
        opt.zero_grad()
        t0 = time.monotonic()
        try:
            ((ddp(x) - y) ** 2).mean().backward()
        except Exception as e:  # what a training loop would see
            out["error"] = f"{type(e).__name__}: {e}"
            out["seconds"] = time.monotonic() - t0
            torch.save(out, os.path.join(sys.argv[2], f"rank{rank}.pt"))
            os._exit(0)  # the group is broken: skip destroy_process_group
        opt.step()
        out["steps_done"] = step + 1
    return out


def scenario_compile(rank, world, args):
    """torch.compile of a DDP model under DDP's default DDPOptimizer, with gradcomp's int8
    hook: each step's averaged gradient and the exact mean (a twin, reduced exactly). Then
    what register() and the hook say of DDP's python reducer (compiled autograd)."""
    import torch._dynamo

    width, steps = 128, args["steps"]
    model, twin = make_model(3, width), make_model(3, width)
    twin.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model)  # default buckets: a small cap trips DDPOptimizer's own assertion
    state = gradcomp.register(ddp, "int8")
    compiled = torch.compile(ddp, backend=args.get("backend", "aot_eager"))
    out = {"grads": [], "exact": []}
    for step in range(steps):
        x, y = batch(rank, step, width)
        ddp.zero_grad(set_to_none=False)
        ((compiled(x) - y) ** 2).mean().backward()
        twin.load_state_dict(model.state_dict())
        twin.zero_grad(set_to_none=False)
        ((twin(x) - y) ** 2).mean().backward()
        exact = flat_grads(twin)
        dist.all_reduce(exact)
        out["grads"].append(flat_grads(model))
        out["exact"].append(exact / world)
    out["stats"] = dict(state.stats)
    out["frames_compiled"] = int(torch._dynamo.utils.counters["frames"]["ok"])
    old = torch._dynamo.config.optimize_ddp
    torch._dynamo.config.optimize_ddp = "python_reducer"
    try:
        reducer_ddp = DistributedDataParallel(make_model(1, 8))
    finally:
        torch._dynamo.config.optimize_ddp = old
    errors = {}
    for name, call in (("register", lambda: gradcomp.register(reducer_ddp, "int8")),
                       ("hook", lambda: gradcomp.comm_hook(gradcomp.State("int8"), (torch.zeros(4), None)))):
        try:
            call()
            errors[name] = None
        except RuntimeError as e:
            errors[name] = str(e)
    out["errors"] = errors
    out["python_reducer"] = bool(getattr(reducer_ddp, "_use_python_reducer", False))
    return out


def out_dir_of_this_run() -> str:
    return sys.argv[2]


def scenario_dcp(rank, world, args):
    """DDP training whose gradcomp State is checkpointed with torch.distributed.checkpoint at
    step ``stop`` (save) or restored from it at ``start`` (load), as scenario_resume does with
    torch.save. ``stateful``: the State itself goes into DCP's dict (DCP calls its state_dict
    and load_state_dict); otherwise its state_dict. ``naive``: the control, a per-rank dict
    with plain keys (what State/1 wrote) through DCP, to show what DCP does to it."""
    import torch.distributed.checkpoint as dcp

    width, start, stop = args.get("width", 64), args["start"], args["stop"]
    ckpt = args.get("ckpt", out_dir_of_this_run())
    path = os.path.join(ckpt, "dcp")
    model = make_model(args.get("layers", 6), width)
    src = rank if os.path.exists(os.path.join(ckpt, f"model{rank}.pt")) else 0  # replicas: any rank's
    if args.get("load"):
        model.load_state_dict(torch.load(os.path.join(ckpt, f"model{src}.pt"), weights_only=True))
    ddp = DDP(model, bucket_cap_mb=args.get("bucket_cap_mb", 0.02))
    state = gradcomp.register(ddp, args["codec"], **args.get("state", {}))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    out = {"grads": {}}
    if args.get("load"):
        opt.load_state_dict(torch.load(os.path.join(ckpt, f"opt{src}.pt"), weights_only=True))
        planner = dcp.DefaultLoadPlanner(allow_partial_load=True) if args.get("partial") else None
        if args.get("stateful"):
            dcp.load({"gradcomp": state}, checkpoint_id=path, planner=planner)
        else:
            sd = {"gradcomp": state.state_dict()}
            dcp.load(sd, checkpoint_id=path, planner=planner)
            state.load_state_dict(sd["gradcomp"])
        out["loaded"] = state_fields(state)
    for step in range(start, stop):
        x, y = batch(rank, step, width)
        opt.zero_grad()
        ((ddp(x) - y) ** 2).mean().backward()
        out["grads"][step] = flat_grads(model)
        opt.step()
    out["params"] = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    out["final"] = state_fields(state)
    if args.get("save"):
        torch.save(model.state_dict(), os.path.join(ckpt, f"model{rank}.pt"))
        torch.save(opt.state_dict(), os.path.join(ckpt, f"opt{rank}.pt"))
        dcp.save({"gradcomp": state} if args.get("stateful") else {"gradcomp": state.state_dict()},
                 checkpoint_id=path)
    if args.get("naive"):
        mine = {"rank": rank, "step": state.step + rank,
                "residuals": {o: r.clone() for o, r in state.residuals.items()}}
        dcp.save({"gc": mine}, checkpoint_id=os.path.join(ckpt, "naive"))
        zeros = {o: torch.zeros_like(r) for o, r in mine["residuals"].items()}
        template = {"gc": {"rank": -1, "step": -1, "residuals": zeros}}
        dcp.load(template, checkpoint_id=os.path.join(ckpt, "naive"))
        out["naive"] = {"saved": mine, "loaded": template["gc"]}
    return out


SCENARIOS = {"train": scenario_train, "compile": scenario_compile, "order": scenario_order, "resume": scenario_resume,
             "nonfinite": scenario_nonfinite, "failure": scenario_failure, "dcp": scenario_dcp}


if __name__ == "__main__":
    main(SCENARIOS)
