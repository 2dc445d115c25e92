"""Accelerate training on CPU processes launched by torchrun, with gradcomp registered on
the model accelerator.prepare returned (the recipe of docs/getting-started/accelerate.md); run by
tests/integrations/test_integrations.py.

Usage: torchrun --nproc_per_node 2 accelerate_job.py OUT_DIR
Every rank writes OUT_DIR/rank{r}.pt: stats, the final weights, and each step's gradient.
"""

import os
import sys

import gradcomp
import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset


def main():
    out_dir = sys.argv[1]
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(256, 64, generator=g), torch.randn(256, 64, generator=g))
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=16))

    # the recipe: Accelerate wraps the model in DDP when it runs on several processes
    state = None
    if isinstance(model, DistributedDataParallel):
        state = gradcomp.register(model, "int8", min_numel=256)

    grads = []
    for x, y in loader:
        with accelerator.accumulate(model):  # no_sync on all but every 2nd micro-batch
            loss = ((model(x) - y) ** 2).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grads.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
            optimizer.step()
            optimizer.zero_grad()
    torch.save({"stats": dict(state.stats) if state else None, "world": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type), "grads": grads,
                "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()])},
               os.path.join(out_dir, f"rank{accelerator.process_index}.pt"))
    accelerator.end_training()


if __name__ == "__main__":
    main()
