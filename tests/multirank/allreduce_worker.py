"""One rank of a multi-process gradcomp.all_reduce scenario (run by
tests/support/dist_utils.run_ranks with worker=this file, for tests/multirank/test_allreduce.py
and test_powersgd.py; tests/support/worker_main.main runs the scenario).

Usage: PYTHONPATH=tests/support python allreduce_worker.py allreduce OUT_DIR JSON_ARGS   (RANK, WORLD_SIZE, ... in env)
Writes OUT_DIR/rank{r}.pt with what the scenario records.
"""

import os

import gradcomp
import torch
from worker_main import main, state_fields


def allreduce_inputs(seed: int, rank: int, step: int, shapes: list, dtypes: list | None = None) -> list:
    """The tensors rank ``rank`` averages at ``step`` in the all_reduce scenarios (the tests
    rebuild them to compute the reference)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 1009 + step)
    dtypes = dtypes or ["float32"] * len(shapes)
    return [(torch.randn(shape, generator=g) * (1 + rank)).to(getattr(torch, d)) for shape, d in zip(shapes, dtypes)]


def scenario_allreduce(rank, world, args):
    """gradcomp.all_reduce over ``steps`` steps of fresh random tensors (list or dict, sync or
    async), optionally checkpointed (torch.save or DCP) at ``save_at`` and resumed by a fresh
    State. Records every step's inputs and outputs, the final residuals and stats."""
    shapes, steps, seed = args["shapes"], args["steps"], args.get("seed", 0)
    names = args.get("names")
    os.environ.update(args.get("env_per_rank", {}).get(str(rank), {}))
    if str(rank) in args.get("threads_per_rank", {}):
        torch.set_num_threads(args["threads_per_rank"][str(rank)])
    state_args = {**args.get("state", {}), **args.get("state_per_rank", {}).get(str(rank), {})}
    state = gradcomp.State(args["codec"], **state_args)
    out = {"inputs": [], "outputs": [], "saved": None, "loaded": None}
    drift = None
    if args.get("drift"):  # a constant part, so that the true mean's running sum grows
        drift = allreduce_inputs(seed + 7, rank, 0, shapes)
    for step in range(steps):
        if step == args.get("save_at"):
            out["saved"] = state_fields(state)
            fresh = gradcomp.State(args["codec"], **state_args)
            if args.get("dcp"):
                import torch.distributed.checkpoint as dcp

                path = os.path.join(args["ckpt"], "dcp")
                dcp.save({"gradcomp": state.state_dict()}, checkpoint_id=path)
                sd = {"gradcomp": fresh.state_dict()}
                dcp.load(sd, checkpoint_id=path)
                fresh.load_state_dict(sd["gradcomp"])
            else:
                path = os.path.join(args["ckpt"], f"rank{rank}.pt")
                torch.save(state.state_dict(), path)
                fresh.load_state_dict(torch.load(path, weights_only=True))
            state = fresh
            out["loaded"] = state_fields(state)
        xs = allreduce_inputs(seed, rank, step, shapes, args.get("dtypes"))
        if "scale" in args:
            xs = [x * args["scale"] for x in xs]
        if drift is not None:
            xs = [x + args["drift"] * d for x, d in zip(xs, drift)]
        for p_step, p_rank, p_index, p_value in args.get("poison", []):  # a non-finite element, here only
            if (p_step, p_rank) == (step, rank):
                xs[p_index].view(-1)[0] = float(p_value)
        out["inputs"].append([x.clone() for x in xs])
        arg = dict(zip(names, xs)) if names else xs
        try:
            if args.get("async"):
                handle = gradcomp.all_reduce(arg, state, async_op=True)
                result = handle.wait()
            else:
                result = gradcomp.all_reduce(arg, state)
        except Exception as e:
            if not args.get("expect_error"):
                raise
            out["error"] = f"{type(e).__name__}: {e}"
            return out
        assert result is arg
        out["outputs"].append([x.clone() for x in xs])
    out["stats"] = dict(state.stats)
    out["residuals"] = {k: r.clone() for k, r in state.residuals.items()}
    out["factors"] = {k: q.clone() for k, q in state.engine.factors.items()}
    out["seed"], out["step"] = state.seed, state.step
    return out


SCENARIOS = {"allreduce": scenario_allreduce}


if __name__ == "__main__":
    main(SCENARIOS)
