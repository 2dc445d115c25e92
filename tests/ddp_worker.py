"""One rank of a multi-process DDP scenario (run by tests/dist_utils.run_ranks).

Usage: python ddp_worker.py SCENARIO OUT_DIR JSON_ARGS   (RANK, WORLD_SIZE, MASTER_* in env)
Writes OUT_DIR/rank{r}.pt with what the scenario records.
"""

import json
import os
import pickle
import sys
from datetime import timedelta

import gradcomp
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


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

    def __init__(self, layers: int, width: int, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers)).to(dtype)

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
        model, twin = Permuted(layers, width, dtype), Permuted(layers, width, dtype)
    else:
        bias = args.get("bias", True)
        model, twin = (make_model(layers, width, dtype=dtype, bias=bias) for _ in range(2))
    twin.load_state_dict(model.state_dict())
    ddp = DDP(model, bucket_cap_mb=args.get("bucket_cap_mb", 0.02), find_unused_parameters=unused)
    kwargs = {**args.get("state", {}), **args.get("state_per_rank", {}).get(str(rank), {})}
    codec = args.get("codec_per_rank", {}).get(str(rank), args.get("codec", "int8"))
    if args.get("style") == "torch":
        state = gradcomp.State(codec=codec, **kwargs)
        ddp.register_comm_hook(state, gradcomp.comm_hook)
    else:
        state = gradcomp.register(ddp, codec, **kwargs)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.get("lr", 0.01))
    twin_opt = torch.optim.SGD(twin.parameters(), lr=args.get("lr", 0.01))
    out = {"grads": [], "exact": [], "losses": []}
    for step in range(steps):
        x, y = batch(rank, 0 if args.get("fixed_batch") else step, width, dtype=dtype)
        opt.zero_grad(set_to_none=False)
        loss = ((ddp(x) - y) ** 2).mean()
        loss.backward()
        # exact reference: the same local gradient on the twin (same weights), averaged exactly
        twin.load_state_dict(model.state_dict())
        twin_opt.zero_grad(set_to_none=False)
        ((twin(x) - y) ** 2).mean().backward()
        exact = flat_grads(twin)
        out.setdefault("local", []).append(exact.clone())
        dist.all_reduce(exact)
        exact /= world
        out["grads"].append(flat_grads(model))
        out["exact"].append(exact)
        out["losses"].append(float(loss))
        opt.step()
    out["stats"] = dict(state.stats)
    out["residual_norm"] = float(sum(r.float().norm() ** 2 for r in state._residuals.values()) ** 0.5)
    out["ordinals"] = [state._ordinal_of.get(id(p), -1) for p in model.parameters()]
    out["residuals"] = {o: r.clone() for o, r in state._residuals.items()}
    out["step"] = state.step
    out["seed"] = state.seed
    clone = pickle.loads(pickle.dumps(state))
    out["pickled"] = {"step": clone.step, "stats": clone.stats, "residuals": clone._residuals,
                      "config": clone.config(), "process_group": clone.process_group, "seed": clone.seed}
    return out


def scenario_order(rank, world, args):
    """Many buckets, many steps, with a given hook: ours, PyTorch's PowerSGD, or a naive hook
    that chains its second collective in a future callback."""
    width, layers, steps = args.get("width", 64), args.get("layers", 12), args["steps"]
    model = make_model(layers, width)
    ddp = DDP(model, bucket_cap_mb=args.get("bucket_cap_mb", 0.01))
    hook = args["hook"]
    seen = set()
    if hook == "gradcomp":
        state = gradcomp.State("int8")

        def counting_hook(st, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            seen.add(bucket.index())
            return gradcomp.comm_hook(st, bucket)

        ddp.register_comm_hook(state, counting_hook)
    elif hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        ddp.register_comm_hook(psgd.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                                  start_powerSGD_iter=2, min_compression_rate=0.5),
                               psgd.powerSGD_hook)
    elif hook == "naive":
        ddp.register_comm_hook(None, naive_chained_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for step in range(steps):
        x, y = batch(rank, step, width)
        opt.zero_grad()
        ((ddp(x) - y) ** 2).mean().backward()
        opt.step()
    return {"steps": steps, "buckets": len(seen)}


def naive_chained_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Two-phase exchange whose second collective is launched from the first one's future
    callback (as PyTorch's PowerSGD hook does): another bucket's first phase can overtake it
    on one rank and not on another."""
    buf = bucket.buffer()
    world = dist.get_world_size()
    n = buf.numel() // world * world
    send = buf[:n].clone()
    recv = torch.empty_like(send)
    fut = dist.all_to_all_single(recv, send, async_op=True).get_future()

    def phase2(_):
        part = recv.view(world, -1).sum(0) / world
        gathered = torch.empty(n, dtype=buf.dtype)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, part, async_op=True).wait()
        buf[:n] = gathered
        return buf

    return fut.then(phase2)


SCENARIOS = {"train": scenario_train, "order": scenario_order}


def main():
    scenario, out_dir, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=args.get("pg_timeout", 60)))
    try:
        out = SCENARIOS[scenario](rank, world, args)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
