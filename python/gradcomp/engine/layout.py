"""A bucket's parameters → block-aligned spans and the block table of its payload.

docs/design.md, "Per-parameter decisions": every decision is per parameter. A block never straddles two parameters
(each parameter's span is padded to whole blocks), and the rank that reduces a block is a
function of the block's place in the model — block j of a parameter whose first block has
model-wide index g goes to rank (g + j) mod W — never of its place in a bucket. A DDP
re-layout therefore changes which bucket a block travels in, not one number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..codecs import pairs_for

ROW_WORDS = ops.ROW_WORDS  # codec.h's kRowWords, from the compiled core
NOISE_OFFSET_BITS = ops.CONSTANTS["noise_offset_bits"]  # codec.h's kNoiseOffsetBits


@dataclass(frozen=True)
class Span:
    """A compressed parameter's gradient inside a bucket."""

    offset: int  # element offset in the bucket
    numel: int
    first_block: int  # model-wide index of the parameter's first block (decides owners)
    residual_addr: int = 0  # address of its residual (float32 or bfloat16), 0 without error feedback
    ordinal: int = 0  # model-wide parameter ordinal: keys its stochastic-rounding draws


@dataclass
class BlockTable:
    """The payload layout of one bucket: which block goes to which rank and slot."""

    table: torch.Tensor  # [W * S, 4] int64 (CPU): offset, valid length, residual address, noise word
    world: int
    slots: int  # S: block slots per shard (the most any rank owns in this bucket)
    block: int
    numel: int  # compressed elements (without padding)

    def rows_of(self, rank: int) -> torch.Tensor:
        """The ``[S, 4]`` rows of the slots ``rank`` owns (a contiguous view)."""
        return self.table[rank * self.slots : (rank + 1) * self.slots]

    def shard_bytes(self, bits: int = 8) -> int:
        return ops.shard_bytes(self.slots, self.block, bits)


def num_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def build_table(spans: list[Span], block: int, world: int, residual_itemsize: int = 4) -> BlockTable:
    """Lays the spans' blocks out in W shards of S slots each.

    Within a shard, blocks keep the order of the spans and of the blocks in them, so the
    layout is the same on every rank that sees the same bucket. Slots past a rank's count
    are padding rows (length 0) that encode to zero. ``residual_itemsize``: bytes of one
    residual element (4 for float32, 2 for bfloat16). A row's noise word is the parameter's
    ordinal << 40 | the block's element offset in the parameter (codec.h's noise_word).
    """
    if world < 1:
        raise ValueError(f"gradcomp: world size must be >= 1, got {world}")
    if residual_itemsize not in (2, 4):
        raise ValueError(f"gradcomp: residual_itemsize must be 2 or 4, got {residual_itemsize}")
    blocks = blocks_of_spans(spans, block, world, residual_itemsize)
    numel = sum(s.numel for s in spans)
    if blocks is None:
        return BlockTable(torch.zeros(0, ROW_WORDS, dtype=torch.int64), world, 0, block, numel)
    return table_of_blocks(*blocks, world, block, numel)


def blocks_of_spans(spans: list[Span], block: int, world: int, residual_itemsize: int = 4):
    """The spans' blocks, in span order: (offset in the bucket, valid length, residual address,
    owner rank, noise word), each [n] int64; None when there are none."""
    offs, lens, addrs, owners, words = [], [], [], [], []
    for s in spans:
        nb = num_blocks(s.numel, block)
        if nb == 0:
            continue
        j = torch.arange(nb, dtype=torch.int64)
        offs.append(s.offset + j * block)
        lens.append(torch.clamp(s.numel - j * block, max=block))
        addrs.append(s.residual_addr + j * (block * residual_itemsize) if s.residual_addr
                     else torch.zeros(nb, dtype=torch.int64))
        owners.append((s.first_block + j) % world)
        words.append(noise_words(s.ordinal, s.numel, j * block))
    if not offs:
        return None
    return tuple(torch.cat(x) for x in (offs, lens, addrs, owners, words))


def chunked_tables(spans: list[Span], block: int, world: int, residual_itemsize: int, chunk_numel: int) -> list:
    """The spans' blocks cut into chunks of about ``chunk_numel`` elements (whole blocks, in span
    order), a BlockTable each: a block's row is the same whichever chunk it lies in, so no
    number changes (docs/design.md, "The pipeline")."""
    blocks = blocks_of_spans(spans, block, world, residual_itemsize)
    if blocks is None:
        return []
    per_chunk = max(1, chunk_numel // block)
    n = blocks[0].numel()
    out = []
    for lo in range(0, n, per_chunk):
        part = tuple(x[lo : lo + per_chunk] for x in blocks)
        out.append(table_of_blocks(*part, world, block, int(part[1].sum())))
    return out


def noise_words(ordinal: int, numel: int, offsets: torch.Tensor) -> torch.Tensor:
    """codec.h's noise_word of blocks of one parameter: ordinal << 40 | element offset."""
    if numel >= 1 << NOISE_OFFSET_BITS or not 0 <= ordinal < 1 << (63 - NOISE_OFFSET_BITS):
        raise ValueError(f"gradcomp: parameter {ordinal} ({numel} elements) is out of the noise word's range")
    return (ordinal << NOISE_OFFSET_BITS) + offsets


def table_of_blocks(off: torch.Tensor, ln: torch.Tensor, addr: torch.Tensor, owner: torch.Tensor,
                    word: torch.Tensor, world: int, block: int, numel: int) -> BlockTable:
    """Lays blocks out in W shards of S slots: block i (offset ``off[i]`` in the buffer, ``ln[i]``
    valid elements, residual address ``addr[i]``, noise word ``word[i]``; all [n] int64) goes to
    rank ``owner[i]``, in the order given within each shard."""
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=world)
    slots = int(counts.max()) if owner.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    sorted_owner = owner[order]
    slot = torch.arange(order.numel(), dtype=torch.int64) - starts[sorted_owner]
    table = torch.zeros(world * slots, ROW_WORDS, dtype=torch.int64)
    dest = sorted_owner * slots + slot
    table[dest, 0] = off[order]
    table[dest, 1] = ln[order]
    table[dest, 2] = addr[order]
    table[dest, 3] = word[order]
    return BlockTable(table, world, slots, block, numel)


def contiguous_spans(numels: list[int], block: int, residual_addrs: list[int] | None = None,
                     ordinals: list[int] | None = None) -> list[Span]:
    """Spans of parameters packed one after another in a bucket, numbered from block 0 and
    (unless ``ordinals`` says otherwise) from ordinal 0 (what a model whose only bucket holds
    exactly these parameters would get)."""
    spans, offset, first = [], 0, 0
    for i, n in enumerate(numels):
        addr = residual_addrs[i] if residual_addrs else 0
        spans.append(Span(offset, n, first, addr, ordinals[i] if ordinals is not None else i))
        offset += n
        first += num_blocks(n, block)
    return spans


# ---------------------------------------------------------------- sparse codecs
SPARSE_ROW_WORDS = ops.SPARSE_ROW_WORDS  # codec.h's kSparseRowWords
SPARSE_TILE = ops.SPARSE_TILE  # codec.h's kSparseTile
MAX_SPARSE_NUMEL = (1 << 31) - 1  # indices travel as int32


@dataclass
class SparseTable:
    """The payload layout of one bucket for top-k / random-k: a row per compressed parameter."""

    table: torch.Tensor  # [P, 8] int64 (CPU): offset, numel, residual address, k, first pair, ordinal, first tile, 0
    pairs: int  # K: pairs in a payload (sum of k)
    tiles: int  # units of parallel work (sum of ceil(numel / 4096))
    numel: int  # compressed elements

    @property
    def rows(self) -> int:
        return self.table.shape[0]


def build_sparse_table(spans: list[Span], ratio) -> SparseTable:
    """One row per span (parameter), in span order; k of each from ``pairs_for``."""
    rows, pairs, tiles, numel = [], 0, 0, 0
    for s in spans:
        if s.numel == 0:
            continue
        if s.numel > MAX_SPARSE_NUMEL:
            raise ValueError(f"gradcomp: parameter {s.ordinal} has {s.numel} elements; top-k and random-k take "
                             f"at most 2**31 - 1 (int32 indices)")
        k = pairs_for(s.numel, ratio)
        rows.append([s.offset, s.numel, s.residual_addr, k, pairs, s.ordinal, tiles, 0])
        pairs += k
        tiles += -(-s.numel // SPARSE_TILE)
        numel += s.numel
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, SPARSE_ROW_WORDS)
    return SparseTable(table, pairs, tiles, numel)
