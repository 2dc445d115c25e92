"""The compression engine under every front end (docs/design.md, "Engine and front ends").

    csrc (math, kernels) -> ops.py (validate, dispatch) -> engine (keys, plans, residuals, exchanges, stats)
                                                             ^ the DDP hook, FSDP2, gradcomp.all_reduce, DiLoCo

``Engine`` reduces flat buffers of keyed pieces; ``ResidualStore`` owns residual memory;
``Topology`` places a rank in its node; ``Runtime`` runs a State's collectives in one fixed
order (a ``GlooWorker`` thread, or a CUDA side stream) after the ranks' agreement.
"""

from .core import Call, Engine, GradcompError, agree, new_stats
from .runner import GlooWorker, Runtime, Setup, live_workers, run_on_side_stream
from .store import ResidualStore
from .topology import Topology

__all__ = ["Call", "Engine", "GlooWorker", "GradcompError", "ResidualStore", "Runtime", "Setup", "Topology", "agree",
           "live_workers", "new_stats", "run_on_side_stream"]
