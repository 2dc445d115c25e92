"""Pure-torch reference of gradcomp's block codecs and compressed all-reduce: the oracle the
tests hold the compiled backends to. Written from the math (docs/design.md, codec.h's
comments), not from the kernels: element-wise torch ops, each one IEEE-rounded float32
operation, so the compiled backends must match it bit for bit.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

QMAX = 127.0


def qmax_of(bits: int) -> float:
    return float((1 << (bits - 1)) - 1)


def sign_mean_abs(blocks: torch.Tensor, absmax: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The scaled-sign codec's scale: each block's mean |a| over its valid values, the sum
    taken exactly in 64-bit fixed point relative to the block's absmax (each |a| truncated to
    a multiple of 2^(E-177), E the absmax's biased exponent, subnormals counted as exponent 1),
    then min(fl(fl(fl(fl(sum) / len) · 2^-50) · 2^(E-127)), absmax). Blocks with absmax 0, a
    zero mean or non-finite values are handled by the caller."""
    bits = blocks.abs().view(torch.int32).to(torch.int64)
    e = bits >> 23
    m = torch.where(e == 0, bits & 0x7FFFFF, (bits & 0x7FFFFF) | 0x800000)
    big_e = (absmax.view(torch.int32).to(torch.int64) >> 23).clamp(min=1)
    shift = e.clamp(min=1) + 27 - big_e[:, None]
    fixed = torch.where(shift >= 0, m << shift.clamp(min=0), m >> (-shift).clamp(max=63))
    total = fixed.sum(dim=1)  # exact: every term < 2^51, at most 4096 terms
    p1 = torch.pow(torch.tensor(2.0, dtype=torch.float64), (big_e - 127).double()).float()
    p2 = torch.tensor(2.0**-50, dtype=torch.float32)
    mean = total.float() / lengths.float() * p2 * p1
    return torch.minimum(mean, absmax)


M32, M64 = (1 << 32) - 1, (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finalizer on a Python int (exact 64-bit arithmetic)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x · c mod 2^32 for int64 tensors holding 32-bit values, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" hash, element-wise on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def noise(seed: int, step: int, rank: int, stage: int, ordinal: int, nb: int, block: int) -> torch.Tensor:
    """Stochastic rounding's draws for one parameter's nb blocks: [nb, block] float32 in
    [0, 1). Block j's key hashes (seed, step, rank, stage) and its noise word's high half
    (word = ordinal << 40 | j·block); value i's draw hashes the low half plus i with the key,
    keeps 24 bits and scales them by 2^-24. Stage 1: the first encoding, 2: the re-encoding."""
    out = torch.empty(nb, block, dtype=torch.float32)
    i = torch.arange(block, dtype=torch.int64)
    for j in range(nb):
        word = (ordinal << 40) + j * block
        k = mix64(seed ^ 0x9E3779B97F4A7C15)
        k = mix64(k ^ step)
        k = mix64(k ^ ((rank << 8) | stage))
        k = mix64(k ^ (word >> 32))
        counter = ((word & M32) + i) & M32
        h = mix32(mix32(counter ^ (k & M32)) ^ (k >> 32))
        out[j] = (h >> 8).float() * 2.0**-24
    return out


def block_quantize(a: torch.Tensor, block: int, bits: int = 8, draws: torch.Tensor | None = None):
    """a: [n] float32 (one parameter's values). Returns (scales [nb], codes [nb, block]
    int8, dequantized [n], nonfinite [nb] bool), blocks padded with zeros. bits 8, 4, 2:
    absmax quantization to [-qmax, qmax]; bits 1: scaled sign (code -1 for a < 0, else +1;
    scale = the block's mean |a|). ``draws`` [nb, block] in [0, 1): stochastic rounding,
    v = a · qmax/absmax goes up to floor(v) + 1 where draw < v - floor(v), else to floor(v)."""
    n = a.numel()
    nb = -(-n // block)
    padded = torch.zeros(nb * block, dtype=torch.float32)
    padded[:n] = a
    blocks = padded.view(nb, block)
    absval = blocks.abs()
    nonfinite = ~torch.isfinite(blocks).all(dim=1)
    absmax = absval.amax(dim=1)
    if bits == 1:
        lengths = (n - torch.arange(nb) * block).clamp(max=block)
        mean = sign_mean_abs(blocks, absmax, lengths)
        usable = ~nonfinite & (absmax > 0) & (mean > 0)
        scales = torch.where(nonfinite, torch.full_like(absmax, float("nan")),
                             torch.where(usable, mean, torch.zeros_like(mean)))
        q = torch.where(blocks < 0, -1.0, 1.0)
        q = torch.where(usable[:, None], q, torch.zeros_like(q))
        deq = (q * scales[:, None]).reshape(-1)[:n]
        deq = torch.where(usable.repeat_interleave(block)[:n], deq, torch.zeros_like(deq))
        return scales, q.to(torch.int8), deq, nonfinite
    QMAX = qmax_of(bits)
    inv = torch.tensor(QMAX) / absmax  # quantize by multiplying with qmax / absmax
    usable = ~nonfinite & torch.isfinite(inv)  # absmax 0, or so tiny qmax / absmax overflows: codes 0
    scales = torch.where(nonfinite, torch.full_like(absmax, float("nan")),
                         torch.where(usable, absmax / torch.tensor(QMAX), torch.zeros_like(absmax)))
    # near FLT_MAX, qmax * scale can overflow: the scale steps one ulp down
    overflow = ~torch.isfinite(scales * torch.tensor(QMAX)) & usable
    scales = torch.where(overflow, torch.nextafter(scales, torch.zeros_like(scales)), scales)
    safe_inv = torch.where(usable, inv, torch.zeros_like(inv))
    v = blocks * safe_inv[:, None]
    if draws is None:
        q = torch.round(v).clamp(-QMAX, QMAX)  # torch.round: half to even
    else:
        f = torch.floor(v)
        q = torch.where(draws < v - f, f + 1, f).clamp(-QMAX, QMAX)
    q = torch.where(usable[:, None], q, torch.zeros_like(q))
    deq = (q * scales[:, None]).reshape(-1)[:n]
    deq = torch.where(usable.repeat_interleave(block)[:n], deq, torch.zeros_like(deq))
    return scales, q.to(torch.int8), deq, nonfinite


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [nb, B] int8 → the wire's [nb, B·bits/8] uint8: value i in byte i·bits/8 at bit
    (i·bits) mod 8, least significant first; a field is the code's two's complement in `bits`
    bits, and for the sign codec (bits 1) 1 means -1, 0 means +1 (or a zero block)."""
    c = codes.to(torch.int64)
    field = (c < 0).to(torch.int64) if bits == 1 else c & ((1 << bits) - 1)
    per = 8 // bits
    field = field.view(codes.shape[0], -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return (field << shifts).sum(dim=2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack_codes for the field values: [nb, B·bits/8] uint8 → [nb, B] int8
    (a sign field decodes to -1 or +1)."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    field = (packed.to(torch.int64)[:, :, None] >> shifts) & ((1 << bits) - 1)
    field = field.reshape(packed.shape[0], -1)
    if bits == 1:
        return torch.where(field == 1, -1, 1).to(torch.int8)
    return torch.where(field >= (1 << (bits - 1)), field - (1 << bits), field).to(torch.int8)


def encode_ef(x: torch.Tensor, residual: torch.Tensor | None, block: int, bits: int = 8,
              draws: torch.Tensor | None = None):
    """Pass 1 for one parameter. x: [n] any float dtype; residual: [n] float32 or bfloat16
    (kept in its dtype: the new residual is rounded to it), or None; draws: block_quantize's.
    Returns (scales, codes, new_residual or None, nonfinite)."""
    a = x.float()
    if residual is not None:
        a = a + residual.float()
    scales, codes, deq, nonfinite = block_quantize(a, block, bits, draws)
    new_res = None
    if residual is not None:
        new_res = (a - deq).to(residual.dtype)
        bad_block = nonfinite.repeat_interleave(block)[: a.numel()]
        # a non-finite block keeps the old residual where a is finite and clears it where not
        new_res = torch.where(bad_block, torch.where(torch.isfinite(a), residual, torch.zeros_like(residual)),
                              new_res)
    return scales, codes, new_res, nonfinite


def compressed_allreduce(xs: list[torch.Tensor], residuals: list[torch.Tensor | None], block: int,
                         owners: torch.Tensor, bits: int = 8, rounding: dict | None = None) -> SimpleNamespace:
    """The whole compressed all-reduce of one parameter over W ranks, piece by piece.

    xs[r]: rank r's gradient [n]; residuals[r]: its residual [n] or None; owners: [nb]
    owner rank of each block. Returns stage1 (per rank: scales, codes, residual, nonfinite),
    mean (the rank-order sum times fl(1/W)), its stage-2 scales2 / codes2 / nonfinite2, out
    (what every rank decodes: NaN everywhere if any block is non-finite) and res_after (the
    second encoding's error, times W, added to the owner's residual for finite blocks).

    ``rounding``: None for rounding to nearest, or {"seed", "step", "ordinal"} for stochastic
    rounding: rank r draws noise(seed, step, r, 1, ordinal) to encode, and block j's owner
    draws its row of noise(seed, step, owner, 2, ordinal) to re-encode."""
    world = len(xs)
    n = xs[0].numel()
    nb = owners.numel()
    assert nb == -(-n // block)
    draws1 = [None] * world
    draws2 = None
    if rounding is not None:
        key = (rounding["seed"], rounding["step"])
        draws1 = [noise(*key, r, 1, rounding["ordinal"], nb, block) for r in range(world)]
        by_rank = [noise(*key, r, 2, rounding["ordinal"], nb, block) for r in range(world)]
        draws2 = torch.stack([by_rank[int(owners[j])][j] for j in range(nb)]) if nb else None
    stage1 = [encode_ef(x, r, block, bits, d) for x, r, d in zip(xs, residuals, draws1)]
    total = torch.zeros(n, dtype=torch.float32)
    for scales, codes, _, _ in stage1:  # rank order
        total = total + (codes.float() * scales[:, None]).reshape(-1)[:n]
    mean = total * (torch.tensor(1.0) / torch.tensor(float(world)))  # x * fl(1/W)
    scales2, codes2, _, nonfinite2 = block_quantize(mean, block, bits, draws2)
    sent = (codes2.float() * scales2[:, None]).reshape(-1)[:n]  # integer codes, scale >= 0: no -0.0
    out = torch.full_like(sent, float("nan")) if nonfinite2.any() else sent
    res_after = [s[2] for s in stage1]
    if residuals[0] is not None:
        err = mean - sent  # masked to finite blocks below
        elem_owner = owners.repeat_interleave(block)[:n]
        finite = (~nonfinite2).repeat_interleave(block)[:n]
        res_after = [torch.where((elem_owner == r) & finite,
                                 (res_after[r].float() + torch.tensor(float(world)) * err).to(res_after[r].dtype),
                                 res_after[r]) for r in range(world)]
    return SimpleNamespace(stage1=stage1, mean=mean, scales2=scales2, codes2=codes2, nonfinite2=nonfinite2,
                           out=out, res_after=res_after)


def compressed_mean(xs: list[torch.Tensor], residuals: list[torch.Tensor | None], block: int,
                    owners: torch.Tensor, bits: int = 8, rounding: dict | None = None):
    """(what every rank decodes [n] float32, the new residuals) of compressed_allreduce."""
    r = compressed_allreduce(xs, residuals, block, owners, bits, rounding)
    return r.out, r.res_after


# ---------------------------------------------------------------- top-k and random-k
def sparse_keys(a: torch.Tensor) -> torch.Tensor:
    """The selection key of each value: the bits of |a| (NaN above Inf above every finite)."""
    return (a.view(torch.int32).to(torch.int64) & 0x7FFFFFFF)


def topk_exact(a: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k largest keys, ties to the lowest index: a stable sort."""
    order = torch.sort(-sparse_keys(a), stable=True).indices
    return torch.sort(order[:k]).values


def topk_approx(a: torch.Tensor, k: int) -> torch.Tensor:
    """The approximate selection as codec.h defines it: T0 = the kappa-th largest key of a
    strided sample; with c >= k keys >= T0 the exact top-k, else those c and the lowest
    indices below T0."""
    n = a.numel()
    s = min(n, max(4096, n // 100))
    key = sparse_keys(a)
    sample = key[torch.arange(s, dtype=torch.int64) * n // s]
    share = -(-k * s // n)
    kappa = min(s, share + share // 2 + 1)
    t0 = int(torch.sort(sample, descending=True).values[kappa - 1])
    above = (key >= t0).nonzero().flatten()
    if above.numel() >= k:
        return topk_exact(a, k)
    fill = (key < t0).nonzero().flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, fill])).values


def wire_round(v: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    """Values as they travel: finite ones saturate to the wire type's largest finite value."""
    if wire == torch.float32:
        return v.clone()
    lim = torch.finfo(wire).max
    finite = torch.isfinite(v)
    return torch.where(finite, v.clamp(-lim, lim), v).to(wire).float()


def topk_encode(x: torch.Tensor, residual: torch.Tensor | None, k: int, approx: bool = False,
                wire: torch.dtype = torch.float32):
    """One parameter: (indices int32, values float32 as decoded, new residual or None,
    non-finite flag)."""
    a = x.float() + residual if residual is not None else x.float()
    idx = (topk_approx if approx else topk_exact)(a, k)
    values = wire_round(a[idx], wire)
    new_res = None
    if residual is not None:
        new_res = a.clone()
        new_res[idx] = a[idx] - values
        new_res[~torch.isfinite(new_res)] = 0.0
    return idx.to(torch.int32), values, new_res, bool((~torch.isfinite(a)).any())


def sparse_decode(pairs_per_rank: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    """One parameter's average: rank by rank, value times 1/W added at its index."""
    world = len(pairs_per_rank)
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(world), dtype=torch.float32)
    out = torch.zeros(n, dtype=torch.float32)
    for idx, values in pairs_per_rank:
        out[idx.long()] += values * inv
    return out


def randomk_indices(seed: int, step: int, ordinal: int, n: int, k: int) -> torch.Tensor:
    """One index from each of k equal strata of [0, n), hashed from (seed, step, ordinal)
    with no rank in it: every rank draws the same."""
    key = mix64(seed ^ 0x9E3779B97F4A7C15)
    key = mix64(key ^ step)
    key = mix64(key ^ ((0 << 8) | 3))
    key = mix64(key ^ ((ordinal << 40) >> 32))
    j = torch.arange(k, dtype=torch.int64)
    lo = j * n // k
    size = (j + 1) * n // k - lo
    h = mix32(mix32(j ^ (key & M32)) ^ (key >> 32))
    return lo + ((h * size) >> 32)


# ---------------------------------------------------------------- the engine's all-reduce of keyed tensors
def engine_allreduce(inputs: list[list[torch.Tensor]], residuals: dict, block: int, bits: int, min_numel: int,
                     per_node: int = 1, first_blocks: list | None = None, keys: list | None = None) -> list:
    """gradcomp.all_reduce of a list of float32 tensors over W ranks with a block quantizer
    (error feedback, rounding to nearest), flat (per_node 1) or hierarchical, piece by piece.

    inputs[r][i]: rank r's tensor i. residuals: (rank, i) -> residual, updated in place. A
    tensor below min_numel is reduced exactly (None in the result: compare it with a
    tolerance, its sum order is Gloo's). Tensors take model-wide block numbers in list
    order; block j of tensor i with first block g0 has global index g = g0 + j.

    Flat: block g goes to rank g mod W (compressed_allreduce). Hierarchical, N = W / L nodes
    of L contiguous ranks: inside node m, block g belongs to local rank g mod L, which sums
    x / L of the node's ranks in local-rank order (float32); across nodes, the ranks of local
    index l run compressed_allreduce over the blocks they own (in j order, one after another,
    residuals of that length), block g going to node (g // L) mod N; every rank of the node
    then reads every local rank's result.

    first_blocks: the first block of each tensor where they are part of a longer model-wide
    list (the default numbers them from 0 in list order); keys: the residuals' key of each
    tensor (default its position)."""
    world = len(inputs)
    L, N = per_node, world // per_node
    first, outs = 0, []
    for i in range(len(inputs[0])):
        n = inputs[0][i].numel()
        if n < min_numel:
            outs.append(None)
            continue
        nb = -(-n // block)
        g = (first if first_blocks is None else first_blocks[i]) + torch.arange(nb)
        first += nb
        key = i if keys is None else keys[i]
        xs = [inputs[r][i].reshape(-1).float() for r in range(world)]
        if L == 1:
            res = [residuals.get((r, key), torch.zeros(n)) for r in range(world)]
            out, after = compressed_mean(xs, res, block, g % world, bits)
            for r in range(world):
                residuals[(r, key)] = after[r]
            outs.append(out)
            continue
        out = torch.empty(n)
        for local in range(L):
            owned = (g % L == local).nonzero().reshape(-1)
            if owned.numel() == 0:
                continue
            idx = torch.cat([torch.arange(j * block, min(n, (j + 1) * block)) for j in owned.tolist()])
            ys = []
            for m in range(N):
                acc = xs[m * L][idx] / L
                for k in range(1, L):
                    acc = acc + xs[m * L + k][idx] / L
                ys.append(acc)
            ranks = [m * L + local for m in range(N)]
            res = [residuals.get((r, key), torch.zeros(idx.numel())) for r in ranks]
            o, after = compressed_mean(ys, res, block, (g[owned] // L) % N, bits)
            out[idx] = o
            for r, a in zip(ranks, after):
                residuals[(r, key)] = a
        outs.append(out)
    return outs


# ---------------------------------------------------------------- FSDP2's compressed reduce-scatter
def fsdp_reduce_scatter(inputs: list[torch.Tensor], pieces: list, residuals: dict, block: int, bits: int,
                        min_numel: int, compress: bool = True, rounding: dict | None = None,
                        error_feedback: bool = True, residual_dtype: torch.dtype | None = torch.float32,
                        wire: torch.dtype | None = None) -> list:
    """The engine's reduce-scatter of one FSDP unit over W ranks (rounding to nearest).

    inputs[r]: rank r's [W · S] input (row j: rank j's chunks); pieces: the unit's
    engine.reduce_scatter.Chunked layout; residuals: (rank, key, row) -> residual [real],
    updated in place. A piece of at least min_numel elements (its whole parameter) of a
    dtype the codec takes is compressed: every rank r encodes the valid part of its chunk for
    each row j != r with error feedback; rank j decodes what it received, takes its own row
    as it is, sums the W rows in rank order in float32 and divides by W. If any sender's
    payload for row j flagged a non-finite block, all of row j's compressed values are NaN.
    Exact pieces sum the rows as they are. ``rounding``: None (to nearest) or {"seed", "step"}:
    rank i draws noise(seed, step, i, 1, index · W + j) for row j. Returns each rank's [S]
    float32 output. ``wire``: a cast codec's dtype, which the other ranks' rows of exact pieces
    travel in (None: the input's)."""
    world = len(inputs)
    shard = sum(p.chunk for p in pieces)
    rows = [x.view(world, shard).float() for x in inputs]
    outs = []
    for me in range(world):
        got = [rows[i][me].clone() if wire is None or i == me else
               inputs[i].view(world, shard)[me].to(wire).float() for i in range(world)]
        flagged = False
        quant_cols = []
        for p in pieces:
            if not (compress and p.numel >= min_numel) or wire is not None:
                continue
            n = p.real[me]
            quant_cols.append(torch.arange(p.offset, p.offset + n))
            for i in range(world):
                if i == me or n == 0:
                    continue
                x = inputs[i].view(world, shard)[me, p.offset : p.offset + n]
                key = (i, p.key, me)
                res = residuals.get(key, torch.zeros(n, dtype=residual_dtype)) if error_feedback else None
                draws = None
                if rounding is not None:
                    draws = noise(rounding["seed"], rounding["step"], i, 1, p.index * world + me, -(-n // block), block)
                scales, codes, new_res, nonfinite = encode_ef(x, res, block, bits, draws)
                if error_feedback:
                    residuals[key] = new_res
                flagged |= bool(nonfinite.any())
                got[i][p.offset : p.offset + n] = (codes.float() * scales[:, None]).reshape(-1)[:n]
        if flagged:
            cols = torch.cat(quant_cols)
            for i in range(world):
                if i != me:
                    got[i][cols] = float("nan")
        acc = got[0].clone()
        for i in range(1, world):
            acc = acc + got[i]
        outs.append(acc / world)
    return outs


def fsdp_all_gather(inputs: list[torch.Tensor], pieces: list, block: int, bits: int, min_numel: int,
                    wire: torch.dtype | None = None) -> torch.Tensor:
    """The engine's compressed parameter all-gather of one FSDP unit over W ranks (rounded to
    nearest, no error feedback), as every rank receives it.

    inputs[r]: rank r's row [S] (its chunk of every parameter, the gather's dtype); pieces: the
    unit's Chunked layout over all its parameters. A piece of at least min_numel elements (its
    whole parameter) is compressed: the valid part of row j's chunk, block by block, quantized
    and dequantized in float32, then rounded to the gather's dtype; the chunk's padding is 0.
    If any row holds a non-finite value in a compressed piece, every compressed value of every
    row is NaN. Other pieces are gathered as they are. ``wire``: a cast codec's dtype, which
    every row (its owner's too) goes through. Returns the [W · S] output."""
    world, dtype = len(inputs), inputs[0].dtype
    shard = sum(p.chunk for p in pieces)
    out = torch.cat([x.to(wire).to(dtype) if wire is not None else x.clone() for x in inputs])
    if wire is not None:
        return out
    rows = out.view(world, shard)
    flagged, cols = False, []
    for p in pieces:
        if p.numel < min_numel:
            continue
        for j in range(world):
            n = p.real[j]
            rows[j, p.offset + n : p.offset + p.chunk] = 0
            if n == 0:
                continue
            scales, codes, _, nonfinite = block_quantize(inputs[j][p.offset : p.offset + n].float(), block, bits)
            rows[j, p.offset : p.offset + n] = (codes.float() * scales[:, None]).reshape(-1)[:n].to(dtype)
            flagged |= bool(nonfinite.any())
            cols.append((j, p.offset, n))
    if flagged:
        for j, offset, n in cols:
            rows[j, offset : offset + n] = float("nan")
    return out


# ---------------------------------------------------------------- PowerSGD
def powersgd_q0(seed: int, ordinal: int, step: int | None, m: int, rank: int) -> torch.Tensor:
    """A key's first Q (or every step's, without warm start): N(0, 1) draws from a CPU
    generator seeded with 63 bits of SHA-256("seed:ordinal:" + step or ""), each column
    scaled to length 1."""
    import hashlib

    words = f"{seed}:{ordinal}:{'' if step is None else step}".encode()
    seed63 = int.from_bytes(hashlib.sha256(words).digest()[:8], "little") >> 1
    q = torch.randn(m, rank, generator=torch.Generator().manual_seed(seed63))
    return q / q.norm(dim=0, keepdim=True)


def _mean_in_rank_order(parts: list[torch.Tensor], wire: torch.dtype) -> torch.Tensor:
    """What every rank holds after gradcomp's exact average of ``parts`` (one a rank): each
    rank's part in the wire dtype divided by W there, summed in rank order in float32,
    rounded back to the wire dtype."""
    world = len(parts)
    acc = torch.div(parts[0].to(wire), world).float()
    for p in parts[1:]:
        acc = acc + torch.div(p.to(wire), world).float()
    return acc.to(wire)


def powersgd_allreduce(inputs: list[list[torch.Tensor]], state: dict, rank: int, min_numel: int, seed: int,
                       step: int, error_feedback: bool = True, warm_start: bool = True,
                       wire: torch.dtype = torch.float32) -> list:
    """PowerSGD over W ranks of one all_reduce call's tensors (keyed by position, one dtype),
    one power iteration: for each tensor i seen as an n × m matrix (n its first dimension)
    that has 2+ dimensions, min_numel elements and R(n + m) * 2 <= n m:

        M_r = x_r + e_r;  P = mean_r(M_r Q);  P = QR(P).Q;  Q' = mean_r(M_rᵀ P);
        out = P Q'ᵀ;  e_r = M_r - out;  Q = Q' with unit columns (warm start; a zero column
        keeps the old one)

    with means in rank order (``_mean_in_rank_order``). A non-finite value in any rank's
    compressed tensors, or in an averaged factor, makes every compressed output NaN and keeps
    the residuals and Q. A float16 output beyond its range leaves a zero residual there.
    ``state``: {"e": {(r, i): residual n × m}, "q": {i: Q}}, updated in place. Returns each
    tensor's output (None where exact)."""
    world = len(inputs)
    e, qs = state.setdefault("e", {}), state.setdefault("q", {})
    plans = []
    for i, x in enumerate(inputs[0]):
        n = x.shape[0] if x.dim() >= 2 else 0
        m = x.numel() // n if n else 0
        ok = x.dim() >= 2 and x.numel() >= min_numel and n and m and rank * (n + m) * 2 <= n * m
        plans.append((i, n, m) if ok else None)
    work = []
    for plan in plans:
        if plan is None:
            continue
        i, n, m = plan
        q = powersgd_q0(seed, i, None if warm_start else step, m, rank) if (not warm_start or i not in qs) else qs[i]
        ms = []
        for r in range(world):
            x = inputs[r][i].reshape(n, m)
            ms.append(x.float() + e.get((r, i), torch.zeros(n, m)) if error_feedback else x.float())
        work.append((i, n, m, q, ms))
    bad = any(not torch.isfinite(mm).all() for *_, ms in work for mm in ms)
    outs = [None] * len(plans)
    ps = [_mean_in_rank_order([mm @ q for mm in ms], wire).float() for i, n, m, q, ms in work]
    bad = bad or any(not torch.isfinite(p).all() for p in ps)
    ps = [torch.linalg.qr(p).Q for p in ps]
    qas = [_mean_in_rank_order([mm.t() @ p for mm in ms], wire).float() for (*_, ms), p in zip(work, ps)]
    bad = bad or any(not torch.isfinite(qa).all() for qa in qas)
    for (i, n, m, q, ms), p, qa in zip(work, ps, qas):
        out = p @ qa.t()
        dtype = inputs[0][i].dtype
        if bad:
            out = torch.full_like(out, float("nan"))
        outs[i] = out.to(dtype).reshape(-1)
        applied = out.to(dtype).float()
        if not bad:
            if error_feedback:
                for r in range(world):
                    e[(r, i)] = torch.where(applied.isinf(), 0.0, ms[r] - applied)
            if warm_start:
                zero = (qa == 0).all(0, keepdim=True)
                qs[i] = torch.where(zero, q, qa / qa.norm(dim=0, keepdim=True))
        elif warm_start and i not in qs:
            qs[i] = q
        if error_feedback:  # the engine keeps a residual from the first call on, bad or not
            for r in range(world):
                e.setdefault((r, i), torch.zeros(n, m))
    return outs


# ---------------------------------------------------------------- DiLoCo's outer loop
def exact_mean(xs: list[torch.Tensor]) -> torch.Tensor:
    """The engine's exact average: each rank's values divided by W, summed in rank order in float32."""
    world = len(xs)
    acc = (xs[0] / world).float()
    for x in xs[1:]:
        acc = acc + x / world
    return acc.to(xs[0].dtype)


def diloco_fragments(numels: list[int], F: int) -> list[list[int]]:
    """DiLoCo's split of the parameters into F contiguous fragments (docs/guides/diloco.md):
    parameter i, starting at element e_i of T, goes to floor(F e_i / T), kept within one of
    the previous parameter's fragment and high enough that every later fragment gets one."""
    n, total = len(numels), sum(numels)
    frag, start = [], 0
    for i, k in enumerate(numels):
        want = F * start // total
        f = 0 if i == 0 else min(max(want, frag[-1]), frag[-1] + 1)
        frag.append(max(f, F - (n - i)))
        start += k
    return [[i for i in range(n) if frag[i] == p] for p in range(F)]


def diloco(models: list, inner_step, steps: int, H: int, fragments: list[list[int]], delay: int,
           outer_lr: float, outer_momentum: float, nesterov: bool, *, codec: tuple | None, min_numel: int,
           per_node: int = 1) -> dict:
    """DiLoCo over W replicas in one process, written from the paper's description with
    torch.optim.SGD as the outer optimizer.

    models[r]: rank r's model, already holding the initial weights (rank 0's); inner_step(r,
    s): runs rank r's inner optimizer step s (0-based) on its model. Fragment p is sent after
    inner step s (1-based) with s % H == (p + 1) H // F % H, and lands ``delay`` steps later
    (landings of a step first, then sends; with delay 0 at once): a finite average steps
    the outer SGD on the anchor, and each model's fragment becomes anchor + (its weights now −
    its weights when sent); a non-finite one leaves the anchor and resets the fragment to it.
    codec: None (exact average) or (block, bits): the engine's block quantizer with error
    feedback through engine_allreduce, blocks numbered model-wide.

    Returns {"anchors": [per step: list of anchor tensors], "params": [rank -> list],
    "residuals": {(rank, i): tensor}, "skipped": [(step, fragment)]}."""
    world = len(models)
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    anchor = [p.detach().clone() for p in params[0]]
    F = len(fragments)
    outer = [torch.optim.SGD([anchor[i] for i in frag], lr=outer_lr, momentum=outer_momentum, nesterov=nesterov,
                             foreach=False) for frag in fragments]
    offsets = [((p + 1) * H // F) % H for p in range(F)]
    numels = [p.numel() for p in params[0]]
    firsts, g = [], 0
    for k in numels:
        firsts.append(g)
        if k >= min_numel and codec is not None:
            g += -(-k // codec[0])
    residuals: dict = {}
    pending: dict = {}
    out = {"anchors": [], "skipped": []}

    def average(frag):  # the exchange on the CPU (the engine's bits on both backends), the result on the models' device
        device = anchor[0].device
        xs = [[(anchor[i] - params[r][i].detach()).cpu() for i in frag] for r in range(world)]
        if codec is None:
            return [exact_mean([xs[r][k] for r in range(world)]).to(device) for k in range(len(frag))]
        got = engine_allreduce(xs, residuals, codec[0], codec[1], min_numel, per_node,
                               first_blocks=[firsts[i] for i in frag], keys=list(frag))
        return [(exact_mean([xs[r][k] for r in range(world)]) if e is None else e.view_as(xs[0][k])).to(device)
                for k, e in enumerate(got)]

    def land(p, s):
        _, avg, sent = pending.pop(p)
        frag = fragments[p]
        finite = all(bool(torch.isfinite(a).all()) for a in avg)
        with torch.no_grad():
            if finite:
                for i, a in zip(frag, avg):
                    anchor[i].grad = a
                outer[p].step()
                for i in frag:
                    anchor[i].grad = None
            else:
                out["skipped"].append((s, p))
            for r in range(world):
                for k, i in enumerate(frag):
                    q = params[r][i]
                    q.copy_(anchor[i] + (q - sent[r][k]) if finite and delay > 0 else anchor[i])

    for s in range(1, steps + 1):
        for r in range(world):
            inner_step(r, s - 1)
        if delay > 0:
            for p in sorted(pending):
                if pending[p][0] == s:
                    land(p, s)
        for p in range(F):
            if s % H == offsets[p]:
                sent = [[params[r][i].detach().clone() for i in fragments[p]] for r in range(world)]
                pending[p] = (s + delay, average(fragments[p]), sent)
        if delay == 0:
            for p in sorted(pending):
                land(p, s)
        out["anchors"].append([a.detach().clone() for a in anchor])
    out["params"] = [[p.detach().clone() for p in ps] for ps in params]
    out["residuals"] = residuals
    return out
