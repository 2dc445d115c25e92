"""Plain DistributedDataParallel training, launched by torchrun; gradcomp is one line.

One machine, 2 CPU processes (Gloo):
    torchrun --standalone --nproc-per-node=2 examples/train_ddp.py --codec int8

Two machines, 4 GPUs each (NCCL), run on both with NODE_RANK 0 and 1:
    torchrun --nnodes=2 --node-rank=$NODE_RANK --nproc-per-node=4 \
        --rdzv-backend=c10d --rdzv-endpoint=$HEAD_NODE_IP:29500 \
        examples/train_ddp.py --codec int8
"""

import argparse
import logging
import os

import gradcomp
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--codec", default="int8", help='a gradcomp codec spec, e.g. "int8", "sign", "topk:0.01"')
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--save", help="write the trained model's state_dict here (rank 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(message)s")

    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")  # rank and world size come from torchrun
    rank = dist.get_rank()

    # A synthetic task: a fixed random teacher labels random inputs (the same data on every rank;
    # the DistributedSampler gives each rank its own part).
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(16384, 128, generator=gen)
    teacher = torch.randn(128, 10, generator=gen)
    labels = (inputs @ teacher).argmax(1)
    dataset = TensorDataset(inputs, labels)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    model = DDP(model.to(device), device_ids=[local_rank] if use_cuda else None)
    gradcomp.register(model, args.codec)  # the one gradcomp line: compress DDP's gradient exchange
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total, count = torch.zeros((), device=device), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            count += 1
        mean_loss = total / count
        dist.all_reduce(mean_loss)
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {mean_loss.item() / dist.get_world_size():.4f}", flush=True)

    if args.save and rank == 0:
        torch.save(model.module.state_dict(), args.save)
    # DDP before its process group: a DDP model freed after destroy_process_group frees the
    # group from its reducer, holding the GIL, which can deadlock Gloo's worker threads at exit
    del model, optimizer
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
