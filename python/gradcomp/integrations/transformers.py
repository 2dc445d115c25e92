"""The Hugging Face Trainer with gradcomp's hook on the DDP model it trains.

    from gradcomp.integrations.transformers import GradcompTrainer
    trainer = GradcompTrainer(model=model, args=args, train_dataset=data, gradcomp="int8")
    trainer.train()   # under torchrun: gradcomp compresses DDP's gradient exchange

Trainer builds its DistributedDataParallel model inside ``train()`` (Accelerate's
``prepare``) and hands it only to ``training_step``: ``trainer.model`` and the callbacks see
the bare model, and Accelerate's ``DistributedDataParallelKwargs(comm_hook=...)`` takes only
its built-in hooks. So ``GradcompTrainerMixin.training_step`` registers gradcomp's State on
the DDP model it receives, once (a second ``train()`` gets the same DDP model and reuses the
registration, step counter and residuals; a DDP model Trainer rebuilt gets the same State).

Checkpoints: every rank writes ``gradcomp-rank<R>.pt`` (``State.state_dict()``) into each
``checkpoint-<N>/`` directory before Trainer writes the rest, and ``train(resume_from_checkpoint=...)``
loads it back on each rank, so a resumed run continues the step counter, the seed and the
error-feedback residuals bit for bit. Trainer's logs get ``gradcomp/ratio``,
``gradcomp/bytes_sent`` and ``gradcomp/bytes_uncompressed`` (this rank's, since the start).
"""

from __future__ import annotations  # no comm hook is defined here

import glob
import logging
import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..hooks import State, attach

try:
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as e:
    raise ImportError("gradcomp.integrations.transformers needs transformers: "
                      "pip install 'gradcomp[transformers]'") from e

__all__ = ["GradcompTrainer", "GradcompTrainerMixin", "checkpoint_file"]

logger = logging.getLogger("gradcomp")

SYNC_STEPS_BEFORE_CHECK = 2  # synchronizing training steps after which the State's step must have moved

_DOUBLE_WRAP = (
    "gradcomp: the model given to the Trainer is already a DistributedDataParallel model; Trainer (Accelerate) "
    "wraps it in a second DDP, whose plain all-reduce then decides the gradients whatever hook the inner one has "
    "(gradcomp's stats would look healthy while nothing it computed is used). Pass the bare model: Trainer wraps "
    "it in DDP itself, and GradcompTrainer registers gradcomp on that DDP model.")
_NESTED_DDP = (
    "gradcomp: the DistributedDataParallel model Trainer trains wraps another DistributedDataParallel model (was a "
    "DDP model given to the Trainer, or made by model_init?): the outer DDP's reduction decides the gradients "
    "whatever hook the inner one has. Give the Trainer the bare model: it wraps it in DDP itself.")


def checkpoint_file(checkpoint_dir, rank: int) -> str:
    """Where rank ``rank`` keeps its gradcomp state inside a Trainer checkpoint directory."""
    return os.path.join(os.fspath(checkpoint_dir), f"gradcomp-rank{rank}.pt")


def _compiled_inner(model):
    """The module under torch.compile's wrapper (``OptimizedModule._orig_mod``), else ``model``."""
    return getattr(model, "_orig_mod", model)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class GradcompTrainerMixin:
    """Registers gradcomp on the DistributedDataParallel model a Trainer trains; put it
    before the Trainer class: ``class MyTrainer(GradcompTrainerMixin, SFTTrainer)``
    (:class:`GradcompTrainer` is the mixin on ``transformers.Trainer``).

    Args:
        gradcomp: a codec spec such as ``"int8"``, a Codec, or a ready :class:`gradcomp.State`.
        gradcomp_options: keyword arguments of :class:`gradcomp.State` (min_numel,
            start_step, seed, timeout, ...), when ``gradcomp`` is not a State. The process
            group is the DDP model's.

    Every other argument is the Trainer's own. The State is ``trainer.gradcomp_state``. A model given already wrapped in
    DistributedDataParallel is refused (TypeError): Trainer would wrap it again. Without a
    DDP model (one process, or FSDP / DeepSpeed) nothing is registered and a warning says so
    once. If two synchronizing training steps pass without gradcomp's hook being called
    (the gradients went elsewhere, e.g. a ``compute_loss`` that calls ``model.module``), a
    warning says so once.
    """

    def __init__(self, *args, gradcomp="int8", gradcomp_options: dict | None = None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(_compiled_inner(model), DistributedDataParallel):
            raise TypeError(_DOUBLE_WRAP)
        if isinstance(gradcomp, State):
            if gradcomp_options:
                raise TypeError("GradcompTrainer: give either a State or gradcomp_options, not both")
            self.gradcomp_state = gradcomp
        else:
            self.gradcomp_state = State(gradcomp, **(gradcomp_options or {}))
        self._gradcomp_seen = None  # the last model training_step received
        self._gradcomp_ddp = None  # the DDP model the State is registered on
        self._gradcomp_resume = None  # the checkpoint directory train() resumes from, until loaded
        self._gradcomp_synced = 0  # synchronizing training steps since registration (until the hook was seen)
        self._gradcomp_step0 = 0  # the State's step at registration
        self._gradcomp_warned: set = set()
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ registration
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        path = resume_from_checkpoint
        if isinstance(path, bool):  # True: the last checkpoint in output_dir, as Trainer resolves it
            path = get_last_checkpoint(self.args.output_dir) if path and os.path.isdir(self.args.output_dir) else None
        self._gradcomp_resume = None if path is None else os.fspath(path)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model, *args, **kwargs):
        if model is not self._gradcomp_seen:
            self._gradcomp_register(model)
            self._gradcomp_seen = model
        if self._gradcomp_resume is not None:
            path, self._gradcomp_resume = self._gradcomp_resume, None
            if self._gradcomp_ddp is not None:
                self._gradcomp_load(path)
        loss = super().training_step(model, *args, **kwargs)
        ddp = self._gradcomp_ddp
        # inside Trainer's no_sync context a DDP model does not synchronize (nor call a hook)
        if ddp is not None and self._gradcomp_synced >= 0 and ddp.require_backward_grad_sync:
            self._gradcomp_check_called()
        return loss

    def _gradcomp_register(self, model) -> None:
        ddp = _compiled_inner(model)
        if not isinstance(ddp, DistributedDataParallel):
            self._gradcomp_warn_once(
                "no_ddp", f"gradcomp: Trainer trains a {type(ddp).__name__}, not a DistributedDataParallel model "
                f"(world size {self.args.world_size}; Trainer uses DDP only with several processes, and not under "
                "FSDP or DeepSpeed): gradcomp registers nothing and does not compress; the gradients are whatever "
                "Trainer makes of them")
            return
        if isinstance(_compiled_inner(ddp.module), DistributedDataParallel):
            raise RuntimeError(_NESTED_DDP)
        if ddp is not self._gradcomp_ddp:
            attach(ddp, self.gradcomp_state)
            self._gradcomp_ddp = ddp
            self._gradcomp_synced, self._gradcomp_step0 = 0, self.gradcomp_state.step

    def _gradcomp_check_called(self) -> None:
        """After a synchronizing step: the State's step must have moved (its hook was called)."""
        if self.gradcomp_state.step != self._gradcomp_step0:
            self._gradcomp_synced = -1  # seen working: no more checks
            return
        self._gradcomp_synced += 1
        if self._gradcomp_synced >= SYNC_STEPS_BEFORE_CHECK:
            self._gradcomp_warn_once(
                "not_called", f"gradcomp: {self._gradcomp_synced} synchronizing training steps ran on the "
                "DistributedDataParallel model gradcomp is registered on, but its hook was not called (State.step "
                f"stayed {self._gradcomp_step0}, the stats stay at zero): the gradients did not go through gradcomp "
                "(is the model Trainer passes to training_step bypassed, e.g. by a compute_loss that calls "
                "model.module?)")

    def _gradcomp_warn_once(self, key: str, message: str) -> None:
        if key not in self._gradcomp_warned:
            self._gradcomp_warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial, *args, **kwargs):
        # every rank's file is written before Trainer writes its own (trainer_state.json, rank 0
        # only), so a checkpoint Trainer finished holds the gradcomp state of every rank
        if self._gradcomp_ddp is not None:
            run_dir = self._get_output_dir(trial=trial) if hasattr(self, "_get_output_dir") else self.args.output_dir
            out = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(out, exist_ok=True)
            torch.save(self.gradcomp_state.state_dict(), checkpoint_file(out, _rank()))
            self.accelerator.wait_for_everyone()
        return super()._save_checkpoint(model, trial, *args, **kwargs)

    def _gradcomp_load(self, checkpoint_dir: str) -> None:
        rank = _rank()
        path = checkpoint_file(checkpoint_dir, rank)
        if os.path.isfile(path):
            self.gradcomp_state.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            logger.info("gradcomp: rank %d resumed from %s at step %d", rank, path, self.gradcomp_state.step)
            self._gradcomp_step0 = self.gradcomp_state.step
            return
        others = sorted(glob.glob(checkpoint_file(glob.escape(checkpoint_dir), "*")))
        if others:
            raise FileNotFoundError(f"gradcomp: checkpoint {checkpoint_dir} holds gradcomp state of other ranks "
                                    f"({', '.join(os.path.basename(o) for o in others)}) but none for rank {rank} "
                                    f"({os.path.basename(path)}): every rank must resume its own")
        self._gradcomp_warn_once(
            "no_state", f"gradcomp: checkpoint {checkpoint_dir} has no gradcomp state ({os.path.basename(path)}, "
            "saved by GradcompTrainer): the step counter, seed and error-feedback residuals start afresh, so the "
            "run does not continue bit for bit")

    # ------------------------------------------------------------------ logs
    def log(self, logs: dict, *args, **kwargs):
        if self._gradcomp_ddp is not None:
            stats = self.gradcomp_state.stats
            logs = {**logs, "gradcomp/ratio": float(stats["ratio"]), "gradcomp/bytes_sent": float(stats["bytes_sent"]),
                    "gradcomp/bytes_uncompressed": float(stats["bytes_uncompressed"])}
        return super().log(logs, *args, **kwargs)


class GradcompTrainer(GradcompTrainerMixin, Trainer):
    """``transformers.Trainer`` with gradcomp on its DDP model; see :class:`GradcompTrainerMixin`
    for ``gradcomp=`` and ``gradcomp_options=``."""
