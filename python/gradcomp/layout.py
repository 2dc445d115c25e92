"""A bucket's parameters → block-aligned spans and the block table of its payload.

DESIGN rule 3: every decision is per parameter. A block never straddles two parameters
(each parameter's span is padded to whole blocks), and the rank that reduces a block is a
function of the block's place in the model — block j of a parameter whose first block has
model-wide index g goes to rank (g + j) mod W — never of its place in a bucket. A DDP
re-layout therefore changes which bucket a block travels in, not one number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops


@dataclass(frozen=True)
class Span:
    """A compressed parameter's gradient inside a bucket."""

    offset: int  # element offset in the bucket
    numel: int
    first_block: int  # model-wide index of the parameter's first block (decides owners)
    residual_addr: int = 0  # address of its float32 residual, 0 without error feedback


@dataclass
class BlockTable:
    """The payload layout of one bucket: which block goes to which rank and slot."""

    table: torch.Tensor  # [W * S, 3] int64 (CPU): offset, valid length, residual address
    world: int
    slots: int  # S: block slots per shard (the most any rank owns in this bucket)
    block: int
    numel: int  # compressed elements (without padding)

    def rows_of(self, rank: int) -> torch.Tensor:
        """The ``[S, 3]`` rows of the slots ``rank`` owns (a contiguous view)."""
        return self.table[rank * self.slots : (rank + 1) * self.slots]

    def shard_bytes(self, bits: int = 8) -> int:
        return ops.shard_bytes(self.slots, self.block, bits)


def num_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def build_table(spans: list[Span], block: int, world: int) -> BlockTable:
    """Lays the spans' blocks out in W shards of S slots each.

    Within a shard, blocks keep the order of the spans and of the blocks in them, so the
    layout is the same on every rank that sees the same bucket. Slots past a rank's count
    are padding rows (length 0) that encode to zero.
    """
    if world < 1:
        raise ValueError(f"gradcomp: world size must be >= 1, got {world}")
    offs, lens, addrs, owners = [], [], [], []
    for s in spans:
        nb = num_blocks(s.numel, block)
        if nb == 0:
            continue
        j = torch.arange(nb, dtype=torch.int64)
        offs.append(s.offset + j * block)
        lens.append(torch.clamp(s.numel - j * block, max=block))
        addrs.append(s.residual_addr + j * (block * 4) if s.residual_addr else torch.zeros(nb, dtype=torch.int64))
        owners.append((s.first_block + j) % world)
    numel = sum(s.numel for s in spans)
    if not offs:
        return BlockTable(torch.zeros(0, 3, dtype=torch.int64), world, 0, block, numel)
    off, ln, addr, owner = (torch.cat(x) for x in (offs, lens, addrs, owners))
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=world)
    slots = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    sorted_owner = owner[order]
    slot = torch.arange(order.numel(), dtype=torch.int64) - starts[sorted_owner]
    table = torch.zeros(world * slots, 3, dtype=torch.int64)
    dest = sorted_owner * slots + slot
    table[dest, 0] = off[order]
    table[dest, 1] = ln[order]
    table[dest, 2] = addr[order]
    return BlockTable(table, world, slots, block, numel)


def contiguous_spans(numels: list[int], block: int, residual_addrs: list[int] | None = None) -> list[Span]:
    """Spans of parameters packed one after another in a bucket, numbered from block 0
    (what a model whose only bucket holds exactly these parameters would get)."""
    spans, offset, first = [], 0, 0
    for i, n in enumerate(numels):
        addr = residual_addrs[i] if residual_addrs else 0
        spans.append(Span(offset, n, first, addr))
        offset += n
        first += num_blocks(n, block)
    return spans
