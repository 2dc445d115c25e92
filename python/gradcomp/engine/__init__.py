"""The compression engine under every front end (docs/design.md, "Engine and front ends").

    csrc (math, kernels) -> ops.py (validate, dispatch) -> engine (keys, plans, residuals, exchanges, stats)
                                                             ^ the DDP hook, gradcomp.all_reduce

``Engine`` reduces flat buffers of keyed pieces; ``ResidualStore`` owns residual memory;
``Topology`` places a rank in its node; ``GlooWorker`` and ``run_on_side_stream`` run a
State's collectives in one fixed order.
"""

from .core import Call, Engine, GradcompError, agree, new_stats
from .runner import GlooWorker, run_on_side_stream
from .store import ResidualStore
from .topology import Topology

__all__ = ["Call", "Engine", "GlooWorker", "GradcompError", "ResidualStore", "Topology", "agree", "new_stats",
           "run_on_side_stream"]
