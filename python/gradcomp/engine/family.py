"""What every codec family's exchange is: the ``Exchange`` interface, the compressed pieces of
a buffer (``Span``) and the plan of one buffer layout (``Plan``), whose family-specific part
is the family's own object (docs/design.md, "The pipeline").

A family's ``build`` returns that part once per buffer layout; its ``run`` is a generator of
two steps, as in collectives.py: the first ``next()`` encodes and issues the first
collective, the end finishes and returns (bytes sent inside nodes, bytes sent across nodes,
codec seconds). Exact lanes (parameters below min_numel, dtypes the codec does not take) are
the engine's, not a family's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .topology import Topology


@dataclass(frozen=True)
class Span:
    """A compressed parameter inside a buffer."""

    offset: int
    numel: int
    first_block: int
    ordinal: int
    key: object


@dataclass
class Plan:
    """How one buffer layout is reduced: its compressed part (``family`` runs ``detail``, the
    object its ``build`` returned) and its exact lane."""

    family: Exchange | None  # None: the whole buffer is reduced exactly
    fallback_index: torch.Tensor | None  # element indices reduced exactly, None when none
    params_compressed: int
    params_fallback: int
    detail: object = None  # the family's plan: tables, residuals it keeps alive, ...


class Exchange:
    """A codec family's exchange; ``flat_because``, where set, says why it cannot run across
    nodes only (hierarchically)."""

    flat_because: str | None = None

    def build(self, engine, spans: list[Span], buf: torch.Tensor, topo: Topology) -> object:
        """The family's plan of a buffer layout (``Plan.detail``)."""
        raise NotImplementedError

    def run(self, engine, buf: torch.Tensor, detail, call):
        """Reduces ``buf``'s compressed spans by ``detail`` (a generator of two steps)."""
        raise NotImplementedError
