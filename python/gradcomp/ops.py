"""Torch-facing wrappers of the compiled core: validate, allocate outputs, dispatch through
the torch operators ``torch.ops.gradcomp.*`` (library.py registers them).

The core (``gradcomp._C``) takes raw pointers and sizes. Every function here checks dtype,
device, contiguity and sizes first, allocates every output with torch (so the caching
allocator owns the memory), reads the current CUDA stream at each call, and passes
``torch.get_num_threads()`` to the CPU backend so it shares torch's core budget.

Shapes (W world size, S block slots per shard, B block size, SB shard bytes):
    bucket    [n]          float32 / float16 / bfloat16
    table     [W * S, 4]   int64 rows: element offset, valid length, residual address
                           (the address of the block's first residual element, of
                           ``residual_dtype``, on the bucket's device, or 0 for no error
                           feedback), noise word (parameter ordinal << 40 | the block's
                           offset in its parameter: keys stochastic rounding)
    payload   [W * SB]     uint8 (send, recv, gathered)
    slice     [SB]         uint8

Payload tensors must start on a 16-byte boundary (torch's allocations always do, a view at
an odd offset may not). The kernels then rely on every shard starting 4-byte aligned, which
the format guarantees: a shard's size is a multiple of 4 (of 16 unless narrow codes of small
blocks leave an odd number of words). On CPU the table's offsets
and lengths are checked against the bucket before a pass (``check_bounds=False`` skips that
for a table ``gradcomp.engine.layout.build_table`` made, as the hook does every step); a CUDA table
is not (that would cost a host sync). Residual addresses are
trusted on both backends.

Rounding: to nearest even by default; ``stochastic=True`` rounds each code up or down at
random with the probabilities that make it unbiased, drawing from a counter-based hash of
(``seed``, ``rank``, pass, ``step``, the row's noise word, the value's index): pass the
seed every rank agreed on, the step, and the encoding rank's own number.
"""

from __future__ import annotations

import torch

from . import _C, codecs
from .library import as_i64

# The format's constants come from the compiled core (codec.h), never copied here.
CONSTANTS = dict(_C.constants)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MIN_BLOCK, MAX_BLOCK = CONSTANTS["min_block"], CONSTANTS["max_block"]
# The spec grammar (codecs.py) loads no kernels, so it holds the block range; the core must agree.
BLOCK_SIZES = codecs.BLOCK_SIZES  # 32 .. 4096, powers of two
if (BLOCK_SIZES[0], BLOCK_SIZES[-1]) != (MIN_BLOCK, MAX_BLOCK):
    raise ImportError(f"gradcomp: the compiled core takes blocks {MIN_BLOCK}..{MAX_BLOCK}, gradcomp.codecs "
                      f"{BLOCK_SIZES[0]}..{BLOCK_SIZES[-1]}: the package and its compiled core are from different "
                      "builds")
CODE_BITS = (8, 4, 2, 1)  # 1: scaled sign
RESIDUAL_DTYPES = (torch.float32, torch.bfloat16)
ROW_WORDS = CONSTANTS["row_words"]
PAYLOAD_ALIGN = CONSTANTS["payload_align"]
_op = torch.ops.gradcomp
# torch.compiler.is_compiling is torch >= 2.3's name; older ones only have dynamo's
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling


# Sizes are pure functions of their int arguments: under torch.compile they are computed
# once at trace time (the core is not traceable), as constants of the graph.
_constant = getattr(getattr(torch, "compiler", None), "assume_constant_result", lambda fn: fn)


@_constant
def shard_bytes(slots: int, block: int, bits: int = 8) -> int:
    """Bytes of one shard holding ``slots`` blocks of ``block`` values at ``bits`` bits."""
    return int(_C.shard_bytes(int(slots), int(block), int(bits)))


def _check_block(block: int, bits: int) -> None:
    if block not in BLOCK_SIZES:
        raise ValueError(f"gradcomp: block size must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {block}")
    if bits not in CODE_BITS:
        raise ValueError(f"gradcomp: codes are 8, 4, 2 or 1 (scaled sign) bits, got bits={bits}")


def _check_tensor(t, name: str, *, dtypes=None, device=None, numel=None, shape=None, aligned=False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"gradcomp: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"gradcomp: {name} must have dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"gradcomp: {name} is on {t.device}, expected {device}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"gradcomp: {name} is on {t.device}; only cpu and cuda tensors are supported")
    if not t.is_contiguous():
        raise ValueError(f"gradcomp: {name} must be contiguous")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"gradcomp: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"gradcomp: {name} must have {numel} elements, got {t.numel()}")
    # under torch.compile tensors are fakes without addresses: the check waits for the real call
    if aligned and not _is_compiling() and t.data_ptr() % PAYLOAD_ALIGN:
        raise ValueError(f"gradcomp: {name} must start on a {PAYLOAD_ALIGN}-byte boundary "
                         f"(address {t.data_ptr():#x}); pass a fresh tensor, not a view at an odd offset")


def _check_bucket(bucket) -> None:
    _check_tensor(bucket, "bucket", dtypes=tuple(DTYPE_CODES))
    if bucket.dim() != 1:
        raise ValueError("gradcomp: bucket must be one-dimensional")


def _check_table(table, name: str, rows: int, block: int, device, numel: int | None = None,
                 check_bounds: bool = True) -> None:
    """Shape and dtype always; on CPU also that each row's [offset, offset + length) lies in
    the bucket and its length in [0, block], so a bad table raises instead of corrupting memory."""
    _check_tensor(table, name, dtypes=(torch.int64,), device=device, shape=(rows, ROW_WORDS))
    if not check_bounds or table.device.type != "cpu" or rows == 0:
        return
    off, length = table[:, 0], table[:, 1]
    bad = (length < 0) | (length > block)
    if numel is not None:
        bad |= (off < 0) | (off + length > numel)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"gradcomp: {name} row {row} = {table[row].tolist()} does not fit a block of {block} "
                         f"in a bucket of {numel} elements")


def _check_counters(**values) -> None:
    """Each name=(value, bits): an int (not a bool) in [0, 2**bits)."""
    for name, (v, bits) in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << bits:
            raise ValueError(f"gradcomp: {name} must be an int in [0, 2**{bits}), got {v!r}")


def _rounding(bits: int, residual_dtype, stochastic: bool, seed: int, step: int, rank: int) -> tuple:
    """(residual dtype code, seed, step, rank, stochastic) for the core, checked."""
    if residual_dtype not in RESIDUAL_DTYPES:
        raise TypeError(f"gradcomp: residual_dtype must be torch.float32 or torch.bfloat16, got {residual_dtype}")
    if stochastic and bits == 1:
        raise ValueError("gradcomp: the scaled sign (bits=1) has no stochastic rounding")
    _check_counters(seed=(seed, 64), step=(step, 64), rank=(rank, 32))
    return DTYPE_CODES[residual_dtype], seed, step, rank, bool(stochastic)


def quant_encode(bucket: torch.Tensor, table: torch.Tensor, world: int, slots: int, block: int, *,
                 bits: int = 8, out: torch.Tensor | None = None, check_bounds: bool = True,
                 residual_dtype: torch.dtype = torch.float32, stochastic: bool = False, seed: int = 0,
                 step: int = 0, rank: int = 0) -> torch.Tensor:
    """Pass 1: ``a = bucket + residual``, block-wise codes into each owner's shard, residual
    updated in place (through the table's addresses). Returns the ``[W * SB]`` payload."""
    _check_block(block, bits)
    res_code, seed, step, rank, stochastic = _rounding(bits, residual_dtype, stochastic, seed, step, rank)
    _check_bucket(bucket)
    _check_table(table, "table", world * slots, block, bucket.device, bucket.numel(), check_bounds)
    sb = shard_bytes(slots, block, bits)
    if out is None:
        out = torch.empty(world * sb, dtype=torch.uint8, device=bucket.device)
    _check_tensor(out, "out", dtypes=(torch.uint8,), device=bucket.device, numel=world * sb, aligned=True)
    _op.quant_encode(bucket, table, out, world, slots, block, bits, DTYPE_CODES[bucket.dtype], res_code,
                     as_i64(seed), as_i64(step), rank, stochastic)
    return out


def quant_reduce(recv: torch.Tensor, my_rows: torch.Tensor, world: int, slots: int, block: int, *,
                 bits: int = 8, out: torch.Tensor | None = None, check_bounds: bool = True,
                 residual_dtype: torch.dtype = torch.float32, stochastic: bool = False, seed: int = 0,
                 step: int = 0, rank: int = 0) -> torch.Tensor:
    """Pass 2: decode the W shards received for my slots, sum in rank order, multiply by 1/W,
    re-encode into my ``[SB]`` slice; the re-encoding error times W goes into my residual."""
    _check_block(block, bits)
    res_code, seed, step, rank, stochastic = _rounding(bits, residual_dtype, stochastic, seed, step, rank)
    sb = shard_bytes(slots, block, bits)
    _check_tensor(recv, "recv", dtypes=(torch.uint8,), numel=world * sb, aligned=True)
    _check_table(my_rows, "my_rows", slots, block, recv.device, check_bounds=check_bounds)
    if out is None:
        out = torch.empty(sb, dtype=torch.uint8, device=recv.device)
    _check_tensor(out, "out", dtypes=(torch.uint8,), device=recv.device, numel=sb, aligned=True)
    _op.quant_reduce(recv, my_rows, out, world, slots, block, bits, res_code, as_i64(seed), as_i64(step), rank,
                     stochastic)
    return out


def quant_decode(gathered: torch.Tensor, table: torch.Tensor, world: int, slots: int, block: int,
                 bucket: torch.Tensor, *, bits: int = 8, check_bounds: bool = True) -> torch.Tensor:
    """Pass 3: decode every rank's reduced shard into ``bucket`` (in place, only the
    elements the table names). A flagged payload writes NaN there. Returns ``bucket``."""
    _check_block(block, bits)
    sb = shard_bytes(slots, block, bits)
    _check_bucket(bucket)
    _check_tensor(gathered, "gathered", dtypes=(torch.uint8,), device=bucket.device, numel=world * sb,
                  aligned=True)
    _check_table(table, "table", world * slots, block, bucket.device, bucket.numel(), check_bounds)
    _op.quant_decode(gathered, table, bucket, world, slots, block, bits, DTYPE_CODES[bucket.dtype])
    return bucket


# ---------------------------------------------------------------- top-k and random-k
# Shapes (P rows, K pairs):
#   table     [P, 8] int64 sparse rows (layout.build_sparse_table): element offset, numel,
#             residual address (float32, 0 without error feedback), k, first pair, parameter
#             ordinal, first tile, 0
#   top-k payload     [topk_payload_bytes(K, value_dtype)] uint8, gathered [W * that]
#   random-k payload  [4 + K] float32 (summed by all_reduce)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPARSE_ROW_WORDS = CONSTANTS["sparse_row_words"]
SPARSE_TILE = CONSTANTS["sparse_tile"]
RANDOMK_HEADER = CONSTANTS["randomk_header"]


@_constant
def topk_payload_bytes(pairs: int, value_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one rank's top-k payload of ``pairs`` (index, value) pairs."""
    if value_dtype not in VALUE_DTYPES:
        raise TypeError(f"gradcomp: value_dtype must be float32, float16 or bfloat16, got {value_dtype}")
    return int(_C.topk_payload_bytes(int(pairs), value_dtype.itemsize))


def _check_sparse_table(table, device, pairs: int, numel: int | None, check_bounds: bool) -> None:
    """Shape and dtype always; on CPU also that the rows describe parameters inside the
    bucket, 1 <= k <= n < 2**31, and pairs laid out one row after another."""
    _check_tensor(table, "table", dtypes=(torch.int64,), device=device)
    if table.dim() != 2 or table.shape[1] != SPARSE_ROW_WORDS:
        raise ValueError(f"gradcomp: a sparse table is [P, {SPARSE_ROW_WORDS}] int64, got {tuple(table.shape)}")
    if not check_bounds or table.device.type != "cpu":
        return
    off, n, k, first = table[:, 0], table[:, 1], table[:, 3], table[:, 4]
    bad = (n < 1) | (n > (1 << 31) - 1) | (k < 1) | (k > n) | (off < 0)
    if numel is not None:
        bad |= off + n > numel
    expected_first = torch.cumsum(k, 0) - k
    bad |= first != expected_first
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"gradcomp: sparse table row {row} = {table[row].tolist()} is not a parameter of the "
                         f"bucket ({numel} elements) with 1 <= k <= numel and pairs laid out in order")
    total = int(k.sum()) if table.shape[0] else 0
    if total != pairs:
        raise ValueError(f"gradcomp: the table's rows hold {total} pairs, not {pairs}")


def _tiles(table: torch.Tensor) -> int:
    return int(((table[:, 1] + SPARSE_TILE - 1) // SPARSE_TILE).sum()) if table.shape[0] else 0


def topk_encode(bucket: torch.Tensor, table: torch.Tensor, pairs: int, *, approx: bool = False,
                value_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                check_bounds: bool = True, tiles: int | None = None) -> torch.Tensor:
    """Per row: ``a = bucket + residual``; exactly k (index, value) pairs of the largest |a|
    (ties to the lowest index; approximate: a sampled threshold, codec.h), ascending
    indices; the residual keeps ``a`` minus what was sent. Returns the payload. On CUDA the
    table is not checked (that would sync) and ``tiles`` (the table's sum of ceil(n / 4096),
    ``SparseTable.tiles``) is trusted when given: pass a table build_sparse_table made."""
    _check_bucket(bucket)
    _check_sparse_table(table, bucket.device, pairs, bucket.numel(), check_bounds)
    nbytes = topk_payload_bytes(pairs, value_dtype)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=bucket.device)
    _check_tensor(out, "out", dtypes=(torch.uint8,), device=bucket.device, numel=nbytes, aligned=True)
    if bucket.device.type == "cpu":
        tiles = 0  # the CPU kernel splits its work itself
    elif tiles is None:
        tiles = _tiles(table.cpu())
    _op.topk_encode(bucket, table, out, pairs, bool(approx), DTYPE_CODES[bucket.dtype], DTYPE_CODES[value_dtype],
                    int(tiles))
    return out


def topk_decode(gathered: torch.Tensor, table: torch.Tensor, pairs: int, world: int, bucket: torch.Tensor, *,
                value_dtype: torch.dtype = torch.float32, check_bounds: bool = True):
    """Writes each row's average of the W payloads into ``bucket`` (rank by rank, in place).
    A payload flagged non-finite, or holding a row whose indices are not strictly increasing
    within the parameter, makes every row NaN. Returns the number of (rank, row) index lists
    rejected: an int on CPU; on CUDA a 1-element int32 device tensor (reading it would sync)."""
    _check_bucket(bucket)
    nbytes = topk_payload_bytes(pairs, value_dtype)
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"gradcomp: world must be a positive int, got {world!r}")
    _check_tensor(gathered, "gathered", dtypes=(torch.uint8,), device=bucket.device, numel=world * nbytes,
                  aligned=True)
    _check_sparse_table(table, bucket.device, pairs, bucket.numel(), check_bounds)
    status = torch.empty(2, dtype=torch.int32, device=bucket.device)  # [rejected, wrote NaN (CUDA)]
    _op.topk_decode(gathered, table, bucket, status, pairs, world, DTYPE_CODES[bucket.dtype],
                    DTYPE_CODES[value_dtype])
    return int(status[0]) if bucket.device.type == "cpu" else status[:1]


def randomk_encode(bucket: torch.Tensor, table: torch.Tensor, pairs: int, *, seed: int, step: int,
                   out: torch.Tensor | None = None, check_bounds: bool = True) -> torch.Tensor:
    """Per row: ``a = bucket + residual``; the values at k indices drawn alike on every rank
    from (``seed``, ``step``, the row's ordinal), one per stratum; the residual keeps ``a``
    with those zeroed. Returns the ``[4 + K]`` float32 payload (flag, 0, 0, 0, values)."""
    _check_bucket(bucket)
    _check_counters(seed=(seed, 64), step=(step, 64))
    _check_sparse_table(table, bucket.device, pairs, bucket.numel(), check_bounds)
    if out is None:
        out = torch.empty(RANDOMK_HEADER + pairs, dtype=torch.float32, device=bucket.device)
    _check_tensor(out, "out", dtypes=(torch.float32,), device=bucket.device, numel=RANDOMK_HEADER + pairs)
    _op.randomk_encode(bucket, table, out, pairs, DTYPE_CODES[bucket.dtype], as_i64(seed), as_i64(step))
    return out


def randomk_decode(reduced: torch.Tensor, table: torch.Tensor, world: int, bucket: torch.Tensor, *, seed: int,
                   step: int, check_bounds: bool = True) -> torch.Tensor:
    """The summed payload into ``bucket``: each drawn index gets its value / W, the rest of
    the row 0; NaN everywhere if any rank flagged a non-finite value. Returns ``bucket``."""
    _check_bucket(bucket)
    _check_counters(seed=(seed, 64), step=(step, 64))
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"gradcomp: world must be a positive int, got {world!r}")
    pairs = reduced.numel() - RANDOMK_HEADER
    _check_tensor(reduced, "reduced", dtypes=(torch.float32,), device=bucket.device)
    _check_sparse_table(table, bucket.device, pairs, bucket.numel(), check_bounds)
    _op.randomk_decode(reduced, table, bucket, world, DTYPE_CODES[bucket.dtype], as_i64(seed), as_i64(step))
    return bucket
