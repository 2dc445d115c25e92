"""A Lightning DDP strategy that registers gradcomp's hook, on CPU and GPU alike::

    from gradcomp.integrations.lightning import GradcompDDPStrategy
    trainer = L.Trainer(strategy=GradcompDDPStrategy("int8"), accelerator="cpu", devices=2)

Lightning's own ``DDPStrategy(ddp_comm_state=, ddp_comm_hook=)`` registers a hook only when
the device is CUDA and silently runs plain all-reduce on CPU; this one always registers.
``start_method="spawn"`` gives ``ddp_spawn``: the State is pickled into the workers before
any process group exists, which a State allows.

Checkpoints: Lightning writes its checkpoint from rank 0 only, but error-feedback residuals
are each rank's own. Every rank therefore also writes ``<checkpoint>.gradcomp-rank<R>.pt``
(``State.state_dict()``) beside it and reads it back when training resumes from that
checkpoint, so a resumed run keeps its residuals, step counter and seed.
"""

from __future__ import annotations

import logging
import os

import torch

from ..hooks import State, comm_hook

try:
    from lightning.pytorch.strategies import DDPStrategy
except ImportError:  # the standalone pytorch_lightning package
    try:
        from pytorch_lightning.strategies import DDPStrategy
    except ImportError as e:
        raise ImportError("gradcomp.integrations.lightning needs Lightning: pip install 'gradcomp[lightning]'") from e

__all__ = ["GradcompDDPStrategy", "side_file"]

logger = logging.getLogger("gradcomp")


def side_file(checkpoint_path, rank: int) -> str:
    """Where rank ``rank`` keeps its gradcomp state beside a Lightning checkpoint."""
    return f"{os.fspath(checkpoint_path)}.gradcomp-rank{rank}.pt"


class GradcompDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy with gradcomp's hook registered on every device type.

    Args:
        codec: a gradcomp spec or Codec (ignored when ``state`` is given).
        state: a ready :class:`gradcomp.State`; by default one is made from ``codec`` and
            ``state_kwargs``.
        state_kwargs: keyword arguments of :class:`gradcomp.State` (min_numel, start_step,
            timeout, seed, ...).
        **kwargs: everything else goes to Lightning's DDPStrategy (start_method, timeout,
            find_unused_parameters, static_graph, gradient_as_bucket_view, ...).
    """

    strategy_name = "gradcomp_ddp"

    def __init__(self, codec="int8", *, state: State | None = None, state_kwargs: dict | None = None, **kwargs):
        for taken in ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper"):
            if kwargs.get(taken) is not None:
                raise TypeError(f"GradcompDDPStrategy registers gradcomp's hook itself: {taken} is not taken")
        if state is not None and state_kwargs:
            raise TypeError("GradcompDDPStrategy: give either a State or state_kwargs, not both")
        self.gradcomp_state = state if state is not None else State(codec, **(state_kwargs or {}))
        super().__init__(**kwargs)

    def _register_ddp_hooks(self) -> None:
        # DDPStrategy does this only when the device is CUDA
        self.model.register_comm_hook(self.gradcomp_state, comm_hook)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        path = side_file(filepath, self.global_rank)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(self.gradcomp_state.state_dict(), path)

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)
        path = side_file(filepath, self.global_rank)
        if os.path.exists(path):
            os.remove(path)

    def load_checkpoint(self, checkpoint_path, *args, **kwargs):
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        path = side_file(checkpoint_path, self.global_rank)
        if os.path.exists(path):
            self.gradcomp_state.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            logger.warning("gradcomp: %s has no gradcomp state for rank %d (%s): residuals start from zero",
                           checkpoint_path, self.global_rank, path)
        return checkpoint
