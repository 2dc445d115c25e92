"""layout.build_table / contiguous_spans: every block once, owners by model-wide block index,
slot-contiguous shards, zero padding rows, residual addresses, re-layout invariance."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from gradcomp import codecs
from gradcomp.engine import Engine, Topology, layout

BLOCKS = [32, 256, 4096]
WORLDS = [1, 2, 3, 4, 7]


def rng(*key) -> random.Random:
    return random.Random(zlib.crc32(repr(key).encode()))


def random_numels(r: random.Random, block: int, count: int) -> list[int]:
    """Parameter sizes with the awkward cases mixed in: 0, 1, exact blocks, block +- 1."""
    special = [0, 1, block, block - 1, block + 1, 3 * block]
    return [r.choice(special) if r.random() < 0.4 else r.randint(1, 5 * block) for _ in range(count)]


def blocks_of(spans, block):
    """(span index, block index j) → (offset, valid length, span residual address)."""
    out = {}
    for i, s in enumerate(spans):
        for j in range(layout.num_blocks(s.numel, block)):
            out[(i, j)] = (s.offset + j * block, min(block, s.numel - j * block), s.residual_addr)
    return out


def check_table(bt, spans, block, world, itemsize=4):
    table = bt.table
    assert table.dtype == torch.int64 and table.is_contiguous()
    assert bt.world == world and bt.block == block
    assert bt.numel == sum(s.numel for s in spans)
    want = blocks_of(spans, block)
    counts = [0] * world
    for (i, j), _ in want.items():
        counts[(spans[i].first_block + j) % world] += 1
    S = max(counts) if want else 0
    assert bt.slots == S
    assert tuple(table.shape) == (world * S, 4)
    by_offset = {off: key for key, (off, _, _) in want.items()}
    assert len(by_offset) == len(want)
    seen = set()
    for row, (off, ln, addr, word) in enumerate(table.tolist()):
        owner, slot = divmod(row, S)
        if slot >= counts[owner]:  # padding rows are all zero and come after the real ones
            assert (off, ln, addr, word) == (0, 0, 0, 0), f"padding row {row} = {(off, ln, addr, word)}"
            continue
        assert ln > 0, f"row {row}: real rows are slot-contiguous from slot 0"
        key = by_offset[off]
        assert key not in seen, f"block {key} appears twice"
        seen.add(key)
        i, j = key
        assert owner == (spans[i].first_block + j) % world, f"block {key} owned by {owner}"
        _, want_len, base = want[key]
        assert ln == want_len
        assert addr == (base + j * block * itemsize if base else 0), f"block {key}: residual address {addr}"
        # the noise word: parameter ordinal, then the block's offset in its parameter
        assert word >> 40 == spans[i].ordinal and word & ((1 << 40) - 1) == j * block, f"block {key}: word {word}"
    assert seen == set(want), f"missing blocks: {sorted(set(want) - seen)[:5]}"
    assert int(table[:, 1].sum()) == bt.numel
    for r in range(world):
        rows = bt.rows_of(r)
        assert rows.is_contiguous() and tuple(rows.shape) == (S, 4)
        assert torch.equal(rows, table[r * S : (r + 1) * S])
        # within a shard the blocks keep the bucket's order
        offs = [o for o, ln, _, _ in rows.tolist() if ln > 0]
        assert offs == sorted(offs)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("ef", [True, False], ids=["ef", "no_ef"])
def test_build_table_contiguous(world, block, ef):
    r = rng("contiguous", world, block, ef)
    numels = random_numels(r, block, 12)
    addrs = [r.randrange(1, 1 << 40) * 64 for _ in numels] if ef else None
    spans = layout.contiguous_spans(numels, block, addrs)
    # contiguous_spans: packed offsets, first blocks numbered from 0
    off = first = 0
    for i, (s, n) in enumerate(zip(spans, numels)):
        assert (s.offset, s.numel, s.first_block, s.ordinal) == (off, n, first, i)
        assert s.residual_addr == (addrs[i] if ef else 0)
        off += n
        first += layout.num_blocks(n, block)
    check_table(layout.build_table(spans, block, world), spans, block, world)
    if ef:  # bfloat16 residuals: blocks step through them 2 bytes an element
        check_table(layout.build_table(spans, block, world, residual_itemsize=2), spans, block, world, itemsize=2)


@pytest.mark.parametrize("world", WORLDS)
def test_build_table_with_gaps_and_arbitrary_first_blocks(world):
    # spans need not tile the bucket (uncompressed parameters sit between them) and their
    # model-wide block numbers need not start at 0
    block = 32
    r = rng("gaps", world)
    spans, off, first = [], r.randint(0, 50), r.randint(0, 1000)
    for _ in range(15):
        n = r.choice([1, 31, 32, 33, r.randint(1, 400)])
        spans.append(layout.Span(off, n, first, r.randrange(1, 1 << 30) * 8 if r.random() < 0.5 else 0,
                                 r.randrange(0, 1 << 20)))
        off += n + r.randint(0, 40)
        first += layout.num_blocks(n, block) + r.randint(0, 5)
    check_table(layout.build_table(spans, block, world), spans, block, world)


@pytest.mark.parametrize("world", WORLDS)
def test_empty_and_zero_size_spans(world):
    for spans in ([], [layout.Span(0, 0, 0)], [layout.Span(0, 0, 0, 4096), layout.Span(0, 0, 0)]):
        bt = layout.build_table(spans, 256, world)
        assert bt.slots == 0 and tuple(bt.table.shape) == (0, 4) and bt.numel == 0
        for r in range(world):
            assert tuple(bt.rows_of(r).shape) == (0, 4)
    bt = layout.build_table([layout.Span(0, 0, 0), layout.Span(0, 1, 0, 64)], 256, world)
    check_table(bt, [layout.Span(0, 0, 0), layout.Span(0, 1, 0, 64)], 256, world)
    assert bt.slots == 1 and bt.table[0].tolist() == [0, 1, 64, 0]


def test_slots_is_max_owner_count():
    # 10 blocks over 4 ranks: owners 0..3,0..3,0,1 → counts 3,3,2,2 → 3 slots, ranks 2, 3 pad one
    bt = layout.build_table(layout.contiguous_spans([10 * 32], 32), 32, 4)
    assert bt.slots == 3
    assert bt.table[:, 1].view(4, 3).tolist() == [[32] * 3, [32] * 3, [32, 32, 0], [32, 32, 0]]
    assert bt.table[:, 0].view(4, 3).tolist() == [[0, 128, 256], [32, 160, 288], [64, 192, 0], [96, 224, 0]]


def test_residual_addresses_advance_by_block_bytes():
    bt = layout.build_table([layout.Span(0, 100, 0, 1 << 20)], 32, 1)
    assert bt.table[:, 2].tolist() == [(1 << 20) + 128 * j for j in range(4)]
    assert bt.table[:, 1].tolist() == [32, 32, 32, 4]


def test_bad_world_size():
    with pytest.raises(ValueError, match="gradcomp"):
        layout.build_table(layout.contiguous_spans([100], 32), 32, 0)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("block", [32, 256])
def test_relayout_keeps_owners(world, block):
    """docs/design.md, "Per-parameter decisions": keys are numbered in the order first seen and
    take model-wide block numbers in that order; block j of a key whose first block is g goes
    to rank (g + j) mod W, and its noise word is the key's ordinal << 40 | j · block, whatever
    buffer the key lies in and wherever in it. The engine (what the DDP hook and all_reduce
    run) first sees a model's parameters in a shuffled order, as one buffer, then plans them
    again in reverse order and in three buffers of another order: every layout's tables must
    give each block the owner and noise word computed here from the sizes and the
    first-seen order alone."""
    r = rng("relayout", world, block)
    numels = random_numels(r, block, 14)
    seen = list(range(len(numels)))
    r.shuffle(seen)
    want, g = {}, 0  # (parameter, block j) -> (owner, noise word), from the rules
    for ordinal, p in enumerate(seen):
        nb = layout.num_blocks(numels[p], block)
        for j in range(nb):
            want[(p, j)] = ((g + j) % world, (ordinal << 40) + j * block)
        g += nb
    engine = Engine(codecs.parse(f"int8:block={block}"), min_numel=1, seed=0)

    def owners(buckets) -> dict:
        """(parameter, block j) -> (owner, noise word), read back from the engine's tables of
        ``buckets`` (lists of parameters, in buffer order)."""
        out = {}
        for i, bucket in enumerate(buckets):
            ordinals = engine.ordinals([(f"param{p}", numels[p], torch.float32) for p in bucket])
            at, off = {}, 0
            for p in bucket:
                for j in range(layout.num_blocks(numels[p], block)):
                    at[off + j * block] = (p, j)
                off += numels[p]
            plan = engine.plan(ordinals, torch.zeros(off), Topology.of(world, 0, None), f"bucket {i}")
            bt = plan.detail.table if plan.detail is not None else None  # the quantizer family's block table
            if bt is None:  # nothing to compress in it
                assert not any(numels[p] for p in bucket)
                continue
            for row, (o, ln, _, word) in enumerate(bt.table.tolist()):
                if ln:
                    assert (p_j := at[o]) not in out, f"block {p_j} laid out twice"
                    out[p_j] = (row // bt.slots, word)
        return out

    assert owners([seen]) == want  # the first layout: keys numbered here
    assert engine.ordinals([(f"param{p}", numels[p], torch.float32) for p in range(len(numels))]) == tuple(
        seen.index(p) for p in range(len(numels)))
    assert owners([seen[::-1]]) == want
    order = list(range(len(numels)))
    r.shuffle(order)
    assert owners([order[:5], order[5:9], order[9:]]) == want
    assert set(want) == {(p, j) for p, n in enumerate(numels) for j in range(layout.num_blocks(n, block))}
