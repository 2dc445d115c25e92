"""One rank of a gradcomp.DiLoCo scenario (run by tests/support/dist_utils.run_ranks), and the model,
data and inner step that tests/multirank/test_diloco.py's pure-torch reference replays (and
tests/cuda/test_cuda.py's DiLoCo test runs on a GPU).

Usage: python diloco_worker.py SCENARIO OUT_DIR JSON_ARGS   (RANK, WORLD_SIZE, MASTER_* in env)
Also run under torchrun (no arguments but OUT_DIR: the "torchrun" scenario).
"""

import io
import json
import os
import sys
import warnings

import gradcomp
import torch
import torch.distributed as dist
import torch.nn as nn

IN, HIDDEN, OUT, BATCH = 8, 48, 4, 16
MIN_NUMEL = 256  # the 8x48 and 48x48 weights are compressed; the 48x4 weight and the biases go exactly
LR = 1e-2


def make_model(seed: int, hidden: int = HIDDEN) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, OUT))


def make_inner(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)


def inner_step(model, opt, seed: int, rank: int, step: int, nan_at=None) -> None:
    """Rank ``rank``'s inner step ``step`` (0-based) on its own batch; ``nan_at`` = (rank, step)
    writes a NaN into the first weight after that step."""
    g = torch.Generator().manual_seed((seed * 7919 + rank) * 100_003 + step)
    x = torch.randn(BATCH, IN, generator=g)
    y = torch.randint(0, OUT, (BATCH,), generator=g)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if nan_at is not None and tuple(nan_at) == (rank, step):
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("nan")


def build(a: dict, rank: int, seed: int | None = None, device="cpu"):
    model = make_model(a["init_seed"] + rank if seed is None else seed).to(device)  # rank 0's reach every rank
    opt = make_inner(model)
    d = gradcomp.DiLoCo(model, opt, sync_every=a["H"], codec=a["codec"], fragments=a["fragments"],
                        delay=a.get("delay"), ranks_per_node=a.get("per_node"), min_numel=MIN_NUMEL,
                        outer_lr=a.get("outer_lr", 0.7), outer_momentum=a.get("outer_momentum", 0.9),
                        nesterov=a.get("nesterov", True), force_compression=a.get("force", False))
    return model, opt, d


def params_of(model) -> list:
    return [p.detach().clone() for p in model.parameters()]


def train(a: dict, rank: int) -> dict:
    """DiLoCo for a["steps"] inner steps; the anchor after every step."""
    model, opt, d = build(a, rank)
    initial = params_of(model)
    anchors = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(a["steps"]):
            inner_step(model, opt, a["seed"], rank, s, a.get("nan_at"))
            d.step()
            anchors.append([t.clone() for t in d.anchor.values()])
    for _, fut, _, _ in d._pending.values():  # the residuals once the syncs in flight are done
        fut.wait()
    names = [n for n, _ in model.named_parameters()]
    return {"initial": initial, "anchors": anchors, "params": params_of(model), "stats": d.stats,
            "state_stats": dict(d.state.stats), "warnings": [str(w.message) for w in caught],
            "residuals": {names.index(k): r.clone() for k, r in d.state.residuals.items()},
            "fragments": d.fragments, "schedule": [d.sync_steps(p, a["steps"]) for p in range(len(d.fragments))]}


def resume(a: dict, rank: int, out_dir: str) -> dict:
    """The same run straight, and stopped after a["save_at"] steps, checkpointed (torch.save
    or DCP), rebuilt from other weights and resumed."""
    straight = train(a, rank)
    model, opt, d = build(a, rank)
    for s in range(a["save_at"]):
        inner_step(model, opt, a["seed"], rank, s)
        d.step()
    in_flight = sorted(d._pending)
    mine = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, mine)
    if a["via"] == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save({"diloco": d.state_dict()}, checkpoint_id=os.path.join(out_dir, "ckpt"))
    else:
        blob = io.BytesIO()
        torch.save(d.state_dict(), blob)
    del model, opt, d
    model, opt, d = build(a, rank, seed=1234)  # other weights: only the checkpoint makes them right
    mine.seek(0)
    own = torch.load(mine, weights_only=True)
    model.load_state_dict(own["model"])
    opt.load_state_dict(own["opt"])
    if a["via"] == "dcp":
        import torch.distributed.checkpoint as dcp

        template = {"diloco": d.state_dict()}
        dcp.load(template, checkpoint_id=os.path.join(out_dir, "ckpt"))
        d.load_state_dict(template["diloco"])
    else:
        blob.seek(0)
        d.load_state_dict(torch.load(blob, weights_only=True))
    anchors = []
    for s in range(a["save_at"], a["steps"]):
        inner_step(model, opt, a["seed"], rank, s)
        d.step()
        anchors.append([t.clone() for t in d.anchor.values()])
    for _, fut, _, _ in d._pending.values():
        if fut is not None:
            fut.wait()
    return {"straight": straight, "in_flight": in_flight, "anchors": anchors, "params": params_of(model),
            "residuals": {k: r.clone() for k, r in d.state.residuals.items()},
            "straight_residuals": straight["residuals"], "names": [n for n, _ in model.named_parameters()]}


def errors(a: dict, rank: int) -> dict:
    out = {}

    def expect(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded, checked by the test
            out[name] = f"{type(e).__name__}: {e}"
        else:
            out[name] = None

    base = {"H": 4, "codec": "int8", "fragments": 1, "init_seed": 0, "seed": 0}
    # the parameter list changed after the DiLoCo was built: the next sync says so
    model, opt, d = build(base, rank)

    def grown():
        model.register_parameter("extra", nn.Parameter(torch.zeros(3)))
        for s in range(4):
            inner_step(model, opt, 0, rank, s)
            d.step()
    expect("grown", grown)
    # a checkpoint of another model, of another configuration, of another rank
    _, _, other = build(base, rank)
    _, _, d2 = build(base, rank)
    narrow = gradcomp.DiLoCo(make_model(0, hidden=40), make_inner(make_model(0, hidden=40)), sync_every=4,
                             codec="int8", min_numel=MIN_NUMEL)
    expect("other_model", lambda: d2.load_state_dict(narrow.state_dict()))
    expect("other_config", lambda: d2.load_state_dict(gradcomp.DiLoCo(
        make_model(0), make_inner(make_model(0)), sync_every=5, codec="int8", min_numel=MIN_NUMEL).state_dict()))
    sd = other.state_dict()
    theirs = {k: v for k, v in sd.items() if k != f"rank{rank}"}
    theirs[f"rank{1 - rank}"] = sd[f"rank{rank}"]
    expect("other_rank", lambda: d2.load_state_dict(theirs))
    expect("ddp", lambda: gradcomp.DiLoCo(nn.parallel.DistributedDataParallel(make_model(0)), opt, sync_every=4))
    # ranks that disagree: rank 1 syncs every 5 steps, rank 0 every 4: both fail at their first sync
    m3, o3, d3 = build({**base, "H": 4 + rank}, rank)

    def disagree():
        for s in range(5):
            inner_step(m3, o3, 0, rank, s)
            d3.step()
    expect("disagree", disagree)
    m4, o4, d4 = build({**base, "outer_lr": 0.7 if rank == 0 else 0.5}, rank)

    def disagree_lr():
        for s in range(4):
            inner_step(m4, o4, 0, rank, s)
            d4.step()
    expect("disagree_lr", disagree_lr)
    return out


def torchrun(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        a = {"H": 3, "codec": "int8", "fragments": 2, "delay": 1, "init_seed": 0, "seed": 5, "steps": 7}
        auto = train({**a, "per_node": "auto"}, rank)
        explicit = train({**a, "per_node": int(os.environ["LOCAL_WORLD_SIZE"])}, rank)
        torch.save({"auto": auto, "explicit": explicit}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main():
    if len(sys.argv) == 2:
        torch.set_num_threads(1)
        return torchrun(sys.argv[1])
    scenario, out_dir, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        if scenario == "train":
            out = train(args, rank)
        elif scenario == "resume":
            out = resume(args, rank, out_dir)
        elif scenario == "errors":
            out = errors(args, rank)
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
