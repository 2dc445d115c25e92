"""One rank of tests/multirank/test_python_reducer.py: a few SGD steps of DDP with gradcomp registered,
with DDP's C++ reducer (buckets) or its python reducer (a hook call per parameter), in eager
mode or under compiled autograd. argv: mode, output folder, JSON options."""

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


class Net(torch.nn.Module):
    def __init__(self, unused: bool):
        super().__init__()
        self.a = torch.nn.Linear(40, 300)  # 12000 weights: compressed; the biases go exactly
        self.b = torch.nn.Linear(300, 7)
        self.spare = torch.nn.Parameter(torch.zeros(3000)) if unused else None

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def main() -> None:
    mode, out_dir, opts = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import gradcomp
    from torch._dynamo import config as dynamo_config

    if mode != "buckets":
        dynamo_config.optimize_ddp = "python_reducer"
    torch.manual_seed(0)
    model = Net(opts.get("unused", False))
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.02)  # several buckets
    state = gradcomp.register(ddp, opts["codec"], seed=3, min_numel=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(100 + rank)
    grads, caught = [], []
    for _ in range(opts["steps"]):
        x, y = torch.randn(16, 40, generator=data), torch.randn(16, 7, generator=data)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if mode == "compiled_autograd":
                from torch._dynamo import compiled_autograd

                with compiled_autograd._enable(torch.compile(backend="eager")):
                    loss.backward()
            else:
                loss.backward()
        caught += [str(m.message) for m in w if "gradcomp" in str(m.message)]
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
    torch.save({"grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "step": state.step, "residuals": {k: r.clone() for k, r in state.residuals.items()}, "warnings": caught,
                "python_reducer": ddp._use_python_reducer, "stats": dict(state.stats)}, out_dir / f"rank{rank}.pt")
    del ddp, model, opt  # DDP before its group (docs/guides/failures.md, "A hang at exit")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
