"""Who talks to whom: a group's ranks as N nodes of L ranks (docs/design.md, "Hierarchy").

Ranks of a node are contiguous in the group: group rank i is local rank i mod L of node
i // L. The intra-node group of a rank holds its node's L ranks; its inter-node group holds
the N ranks of its local index, one a node. L = 1 is the flat exchange.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


def check_ranks_per_node(value) -> int | str | None:
    """A State's ``ranks_per_node`` option: None, "auto" or a positive int."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"gradcomp: ranks_per_node must be None, 'auto' or a positive int, got {value!r}")
    return value


def resolve_ranks_per_node(value, world: int) -> int | None:
    """The L a State runs with over a group of ``world`` ranks (None: flat, topology unknown)."""
    if value is None:
        return None
    if value == "auto":
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            raise ValueError("gradcomp: ranks_per_node='auto' reads torchrun's LOCAL_WORLD_SIZE, which is not set: "
                             "launch with torchrun or give ranks_per_node=L")
        value = int(env)
    if world % value:
        raise ValueError(f"gradcomp: ranks_per_node={value} does not divide the group's {world} ranks: every node "
                         "must hold the same number of ranks")
    return value


@dataclass
class Topology:
    """A rank's place: ``world`` = ``nodes`` · ``per_node``; ``node`` and ``local`` are its own.
    ``intra`` / ``inter`` are its process groups (None until made, and when of one rank)."""

    world: int
    rank: int
    per_node: int  # L
    nodes: int  # N
    node: int
    local: int
    known: bool = True  # False: flat because no ranks_per_node was given (which bytes cross nodes is unknown)
    intra: object = None
    inter: object = None

    @classmethod
    def of(cls, world: int, rank: int, per_node: int | None) -> Topology:
        L = per_node or 1
        return cls(world, rank, L, world // L, rank // L, rank % L, per_node is not None)

    def node_ranks(self, group_ranks: list[int]) -> list[int]:
        return group_ranks[self.node * self.per_node : (self.node + 1) * self.per_node]

    def peer_ranks(self, group_ranks: list[int]) -> list[int]:
        return group_ranks[self.local :: self.per_node]

    def make_groups(self, group_ranks: list[int], backend: str | None, timeout) -> None:
        """Makes this rank's intra- and inter-node groups. Only a group's members make it
        (``use_local_synchronization``), each rank the intra-node group first: every member of
        a group makes it at the same point in the same order."""
        kwargs = {"use_local_synchronization": True}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if backend is not None:
            kwargs["backend"] = backend
        if self.per_node > 1:
            self.intra = dist.new_group(ranks=self.node_ranks(group_ranks), **kwargs)
        if self.nodes > 1:
            self.inter = dist.new_group(ranks=self.peer_ranks(group_ranks), **kwargs)


def check_contiguous_nodes(gathered: list[tuple[int, int]], per_node: int) -> None:
    """``gathered[i]`` = (torchrun's GROUP_RANK, LOCAL_RANK) of group rank i: the ranks of a
    node must be contiguous, in local-rank order."""
    for i, (node_id, local) in enumerate(gathered):
        first = gathered[i - i % per_node][0]
        if local != i % per_node or node_id != first:
            raise ValueError(f"gradcomp: ranks_per_node='auto': group rank {i} is local rank {local} of node "
                             f"{node_id}, where contiguous nodes of {per_node} ranks would make it local rank "
                             f"{i % per_node} of the node of group rank {i - i % per_node} (node {first}); "
                             "launch with torchrun's default rank assignment or give ranks_per_node explicitly")
    firsts = [gathered[i][0] for i in range(0, len(gathered), per_node)]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"gradcomp: ranks_per_node='auto': nodes {firsts} repeat: the ranks of a node are not "
                         "contiguous in the group")
