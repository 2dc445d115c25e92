"""A torchrun job for tests/multirank/test_allreduce.py: gradcomp.all_reduce with ranks_per_node="auto"
(read from torchrun's LOCAL_WORLD_SIZE) and with the same L given explicitly.

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank N ... allreduce_job.py OUT_DIR
"""

import os
import sys

import gradcomp
import torch
import torch.distributed as dist


def main():
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        g = torch.Generator().manual_seed(rank)
        xs = [torch.randn(5000, generator=g), torch.randn(64, 40, generator=g)]
        auto, explicit = [x.clone() for x in xs], [x.clone() for x in xs]
        state = gradcomp.State("int8", ranks_per_node="auto", seed=3)
        gradcomp.all_reduce(auto, state)
        gradcomp.all_reduce(explicit, gradcomp.State("int8", ranks_per_node=int(os.environ["LOCAL_WORLD_SIZE"]),
                                                     seed=3))
        topo = state.runtime.topology
        torch.save({"auto": auto, "explicit": explicit, "per_node": topo.per_node, "node": topo.node,
                    "local": topo.local, "stats": dict(state.stats)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
