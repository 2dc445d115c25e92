"""What the scenario workers share: one rank's entry point, ``main(SCENARIOS)`` (ddp_worker.py,
allreduce_worker.py and fsdp_worker.py in tests/multirank), and ``state_fields``, a State's
per-rank checkpoint fields as they stand (the DDP and all_reduce workers; fsdp_worker.py keeps
its own ``fields``, the job's ranks and no PowerSGD factors).

A worker runs as ``python WORKER SCENARIO OUT_DIR JSON_ARGS`` (RANK, WORLD_SIZE, MASTER_* in
env), started by tests/support/dist_utils.run_ranks, which puts this folder on its PYTHONPATH.
"""

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def state_fields(state) -> dict:
    """Every per-rank field of a State's checkpoint, as they stand."""
    world, rank = state.world_rank()
    return {"rank": rank, "world_size": world, "step": state.step, "seed": state.seed, "stats": dict(state.stats),
            "config": state.config(), "residuals": {k: r.clone() for k, r in state.residuals.items()},
            "factors": {k: q.clone() for k, q in state.engine.factors.items()}}


def main(scenarios: dict):
    """Runs one of ``scenarios`` (each worker passes its own) as this rank."""
    scenario, out_dir, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=args.get("pg_timeout", 60)))
    try:
        out = scenarios[scenario](rank, world, args)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        print(f"rank {rank}: scenario done, output saved", flush=True)  # tells a crash at exit from one before
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: process group destroyed", flush=True)
