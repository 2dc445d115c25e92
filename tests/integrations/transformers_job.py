"""Hugging Face Trainer runs with GradcompTrainer on a tiny GPT-2 built from its config (no
downloads, token ids from torch); run by tests/integrations/test_transformers.py.

Usage:
    torchrun --nproc_per_node 2 transformers_job.py OUT_DIR   # the 2-rank scenarios, one after another
    python transformers_job.py OUT_DIR single                 # one process: no DDP

Every rank writes OUT_DIR/rank{r}.pt: for each scenario, the final weights, the State's
fields, the gradcomp warnings raised, the log history, and what the scenario checked.
"""

import contextlib
import os
import shutil
import sys
import time
import warnings

import gradcomp.integrations  # noqa: F401 - before transformers: neither imports it

GRADCOMP_ALONE = "transformers" not in sys.modules
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from gradcomp.integrations.transformers import GradcompTrainer, checkpoint_file  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

STEPS, SAVE_AT, BATCH = 6, 3, 4
OPTIONS = {"min_numel": 256}


class Tokens(torch.utils.data.Dataset):
    """Random token ids, the same on every rank (Trainer shards them)."""

    def __init__(self, n=STEPS * BATCH * 2, length=16):
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def targs(out_dir, **kw):
    base = dict(output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=3e-3,
                use_cpu=True, report_to="none", logging_steps=1, save_strategy="steps",
                save_steps=SAVE_AT, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    if "WORLD_SIZE" in os.environ:  # (given in one process, Accelerate asks for a process group that is not there)
        base["ddp_backend"] = "gloo"
    return TrainingArguments(**{**base, **kw})


class Probe(TrainerCallback):
    """The State's step after the first optimizer step of a train() call."""

    def __init__(self, trainer_ref):
        self.trainer_ref, self.first = trainer_ref, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.first is None and hasattr(self.trainer_ref[0], "gradcomp_state"):
            self.first = self.trainer_ref[0].gradcomp_state.step


def params(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def fields(state):
    return {"step": state.step, "seed": state.seed, "stats": dict(state.stats),
            "residuals": {k: r.clone() for k, r in state.residuals.items()}}


@contextlib.contextmanager
def recorded(into: list):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    into.extend(str(w.message) for w in caught if str(w.message).startswith("gradcomp"))


def run(out_dir, cls=GradcompTrainer, resume=None, trainer_kw=None, **kw):
    """One Trainer, trained once; returns (trainer, what it did)."""
    ref = [None]
    probe = Probe(ref)
    extra = {} if cls is Trainer else {"gradcomp": "int8", "gradcomp_options": OPTIONS}
    trainer = cls(model=gpt2(), args=targs(out_dir, **kw), train_dataset=Tokens(), callbacks=[probe],
                  **extra, **(trainer_kw or {}))
    ref[0] = trainer
    out = {"warnings": []}
    t = time.perf_counter()
    with recorded(out["warnings"]):
        result = trainer.train(resume_from_checkpoint=resume)
    out.update(seconds=time.perf_counter() - t, loss=result.training_loss, params=params(trainer.model),
               first_step=probe.first, log=list(trainer.state.log_history))
    if cls is not Trainer:
        out["state"] = fields(trainer.gradcomp_state)
        ddp = trainer._gradcomp_ddp
        out["ddp"] = None if ddp is None else {
            "is_wrapped": ddp is trainer.model_wrapped, "inner_is_ddp": isinstance(ddp.module, DistributedDataParallel),
            "hooks": [(h.__qualname__, s is trainer.gradcomp_state) for h, s in ddp._comm_hooks]}
    return trainer, out


class Bypassing(GradcompTrainer):
    """A compute_loss that calls the bare module: DDP's forward never runs."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model.module(**inputs).loss


def two_ranks(out_dir):
    res = {}
    rank = int(os.environ["RANK"])
    # the reference: Trainer's own DDP, plain all-reduce
    _, res["plain"] = run(os.path.join(out_dir, "plain"), cls=Trainer)
    rank = dist.get_rank()
    world = dist.get_world_size()

    # uninterrupted, checkpoint at step 3; then a second train() on the same trainer
    straight_dir = os.path.join(out_dir, "straight")
    trainer, res["straight"] = run(straight_dir)
    ckpt = os.path.join(straight_dir, f"checkpoint-{SAVE_AT}")
    res["ckpt_files"] = sorted(os.listdir(ckpt))
    saved = torch.load(checkpoint_file(ckpt, rank), weights_only=True)
    res["saved_step"] = saved["step"]
    dist.barrier()
    keep, lost = os.path.join(out_dir, "ckpt3"), os.path.join(out_dir, "ckpt3-lost")
    if rank == 0:
        shutil.copytree(ckpt, keep)
        shutil.copytree(ckpt, lost, ignore=shutil.ignore_patterns("gradcomp-rank*"))
    dist.barrier()
    ddp_before = trainer._gradcomp_ddp
    again = {"warnings": []}
    with recorded(again["warnings"]):
        trainer.train()
    again.update(same_ddp=trainer._gradcomp_ddp is ddp_before and trainer.model_wrapped is ddp_before,
                 hooks=len(ddp_before._comm_hooks), step=trainer.gradcomp_state.step)
    res["again"] = again
    del trainer

    # resumed from the step-3 checkpoint, with and without the gradcomp files
    _, res["resumed"] = run(os.path.join(out_dir, "resumed"), resume=keep)
    _, res["lost"] = run(os.path.join(out_dir, "lost"), resume=lost)

    # gradient accumulation: one hook round per optimizer step
    _, res["accum"] = run(os.path.join(out_dir, "accum"), max_steps=3, gradient_accumulation_steps=2,
                          save_strategy="no")

    # gradients that bypass the DDP model: both bypass warnings
    _, res["bypass"] = run(os.path.join(out_dir, "bypass"), cls=Bypassing, max_steps=4, save_strategy="no")

    # a model already in DDP is refused, at construction and at the first training step
    errors = {}
    try:
        GradcompTrainer(model=DistributedDataParallel(gpt2()), args=targs(os.path.join(out_dir, "x")))
    except TypeError as e:
        errors["init"] = str(e)
    probe_trainer = GradcompTrainer(model=gpt2(), args=targs(os.path.join(out_dir, "y")), train_dataset=Tokens())
    try:
        probe_trainer._gradcomp_register(DistributedDataParallel(DistributedDataParallel(gpt2())))
    except RuntimeError as e:
        errors["step"] = str(e)
    res["double_wrap"] = errors
    res["world"] = world
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def single(out_dir):
    res = {}
    trainer, res["single"] = run(os.path.join(out_dir, "single"), max_steps=2, save_steps=2)
    res["ckpt_files"] = sorted(os.listdir(os.path.join(out_dir, "single", "checkpoint-2")))
    res["registered"] = trainer._gradcomp_ddp is not None
    res["gradcomp_alone"] = GRADCOMP_ALONE
    # a checkpoint with another rank's gradcomp file but not this rank's is refused
    partial = os.path.join(out_dir, "partial")
    os.makedirs(partial)
    torch.save({}, checkpoint_file(partial, 1))
    try:
        trainer._gradcomp_load(partial)
    except FileNotFoundError as e:
        res["partial"] = str(e)
    torch.save(res, os.path.join(out_dir, "rank0.pt"))


if __name__ == "__main__":
    (single if sys.argv[2:] == ["single"] else two_ranks)(sys.argv[1])
