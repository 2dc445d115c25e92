"""gradcomp's kernels as torch operators (python/gradcomp/library.py): the schemas say what
each writes, torch.library.opcheck passes on fresh random inputs of every codec, the ops.*
wrappers trace under torch.compile with no graph break and give the eager bits, and the
format's constants Python uses are the compiled core's."""

import pytest
import torch
from gradcomp import _C, library, ops
from gradcomp.engine import layout
from torch.library import opcheck

# What each operator writes, stated here independently of library.SCHEMAS.
WRITES = {
    "quant_encode": {"out"}, "quant_reduce": {"out"}, "quant_decode": {"bucket"},
    "topk_encode": {"out"}, "topk_decode": {"bucket", "status"},
    "randomk_encode": {"out"}, "randomk_decode": {"bucket"},
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_kernel_is_an_operator_with_the_writes_it_makes():
    assert set(library.SCHEMAS) == set(WRITES)
    for name, writes in WRITES.items():
        schema = getattr(torch.ops.gradcomp, name).default._schema
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert written == writes, name
        assert not schema.returns, name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradcomp::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradcomp::{name}", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradcomp::{name}", "Meta")


def test_the_wrappers_dispatch_through_the_operators(monkeypatch):
    """ops.* reach the kernels through torch.ops.gradcomp, not by name in _C: a call shows up
    in torch's dispatcher (a TorchDispatchMode sees it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "gradcomp":
                seen.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    bucket = torch.randn(300, generator=_gen(0))
    table = layout.build_table(layout.contiguous_spans([300], 64), 64, 1)
    sparse = layout.build_sparse_table(layout.contiguous_spans([300], 64), 0.1)
    with Record():
        send = ops.quant_encode(bucket, table.table, 1, table.slots, 64, check_bounds=False)
        red = ops.quant_reduce(send, table.rows_of(0), 1, table.slots, 64, check_bounds=False)
        ops.quant_decode(red, table.table, 1, table.slots, 64, bucket.clone(), check_bounds=False)
        pay = ops.topk_encode(bucket, sparse.table, sparse.pairs)
        ops.topk_decode(pay, sparse.table, sparse.pairs, 1, bucket.clone())
        rk = ops.randomk_encode(bucket, sparse.table, sparse.pairs, seed=1, step=2)
        ops.randomk_decode(rk, sparse.table, 1, bucket.clone(), seed=1, step=2)
    assert seen == ["quant_encode", "quant_reduce", "quant_decode", "topk_encode", "topk_decode", "randomk_encode",
                    "randomk_decode"]


def _quant_inputs(bits, dtype, world, seed):
    g = _gen(seed)
    numels = [int(n) for n in torch.randint(1, 700, (3,), generator=g)]
    block = 64
    bucket = (torch.randn(sum(numels), generator=g) * 3).to(dtype)
    table = layout.build_table(layout.contiguous_spans(numels, block), block, world)  # no error feedback: pure
    return bucket, table, block


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_quantization(bits, dtype):
    world = 3
    bucket, t, block = _quant_inputs(bits, dtype, world, seed=bits * 7 + dtype.itemsize)
    sb = ops.shard_bytes(t.slots, block, bits)
    code = ops.DTYPE_CODES[dtype]
    stochastic = bits != 1
    rounding = (0, library.as_i64(2**64 - 5), 9, 1, stochastic)  # residual fp32, a seed past 2**63, step, rank
    send = torch.empty(world * sb, dtype=torch.uint8)
    opcheck(torch.ops.gradcomp.quant_encode.default,
            (bucket, t.table, send, world, t.slots, block, bits, code, *rounding))
    torch.ops.gradcomp.quant_encode(bucket, t.table, send, world, t.slots, block, bits, code, *rounding)
    out = torch.empty(sb, dtype=torch.uint8)
    opcheck(torch.ops.gradcomp.quant_reduce.default,
            (send, t.rows_of(1), out, world, t.slots, block, bits, *rounding))
    gathered = send.clone()  # W shards of one format: a valid gathered payload
    opcheck(torch.ops.gradcomp.quant_decode.default,
            (gathered, t.table, bucket.clone(), world, t.slots, block, bits, code))


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approx", [False, True])
def test_opcheck_sparse(value_dtype, approx):
    g = _gen(int(approx) + 2 * value_dtype.itemsize)
    numels = [int(n) for n in torch.randint(1, 5000, (3,), generator=g)]
    bucket = torch.randn(sum(numels), generator=g)
    st = layout.build_sparse_table(layout.contiguous_spans(numels, 64), 0.05)
    code, wire = ops.DTYPE_CODES[bucket.dtype], ops.DTYPE_CODES[value_dtype]
    payload = torch.empty(ops.topk_payload_bytes(st.pairs, value_dtype), dtype=torch.uint8)
    opcheck(torch.ops.gradcomp.topk_encode.default, (bucket, st.table, payload, st.pairs, approx, code, wire, 0))
    torch.ops.gradcomp.topk_encode(bucket, st.table, payload, st.pairs, approx, code, wire, 0)
    status = torch.empty(2, dtype=torch.int32)
    opcheck(torch.ops.gradcomp.topk_decode.default,
            (payload.repeat(2), st.table, bucket.clone(), status, st.pairs, 2, code, wire))
    seed, step = library.as_i64(2**63 + 11), 3
    rk = torch.empty(ops.RANDOMK_HEADER + st.pairs)
    opcheck(torch.ops.gradcomp.randomk_encode.default, (bucket, st.table, rk, st.pairs, code, seed, step))
    torch.ops.gradcomp.randomk_encode(bucket, st.table, rk, st.pairs, code, seed, step)
    opcheck(torch.ops.gradcomp.randomk_decode.default, (rk * 2, st.table, bucket.clone(), 2, code, seed, step))


def test_unsigned_counters_travel_as_int64():
    for v in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        s = library.as_i64(v)
        assert -(2**63) <= s < 2**63 and s % 2**64 == v


def _local_exchange(bucket, residual, table, slots, block, bits, seed, step):
    """One rank's quantized all-reduce at W = 1 through the ops.* wrappers, error feedback on."""
    send = ops.quant_encode(bucket, table, 1, slots, block, bits=bits, check_bounds=False, stochastic=bits != 1,
                            seed=seed, step=step)
    reduced = ops.quant_reduce(send, table, 1, slots, block, bits=bits, check_bounds=False, stochastic=bits != 1,
                               seed=seed, step=step)
    out = torch.empty_like(bucket)
    ops.quant_decode(reduced, table, 1, slots, block, out, bits=bits, check_bounds=False)
    return out, send


@pytest.mark.parametrize(("bits", "backend"), [(8, "aot_eager"), (2, "aot_eager"), (4, "inductor")])
def test_wrappers_compile_without_graph_breaks_and_match_eager(bits, backend):
    """torch.compile(fullgraph=True) over encode, reduce and decode with error feedback, with
    aot_eager (AOTAutograd and functionalization) and inductor: the same output, payload and
    residual bits as eager, step after step (the residual's update is the kernels' side effect)."""
    torch._dynamo.reset()
    block, n = 64, 1000
    compiled = torch.compile(_local_exchange, fullgraph=True, backend=backend)
    results = {}
    for mode, fn in (("eager", _local_exchange), ("compiled", compiled)):
        residual = torch.zeros(n)
        table = layout.build_table(layout.contiguous_spans([n], block, [residual.data_ptr()]), block, 1)
        outs = []
        for step in range(3):
            bucket = torch.randn(n, generator=_gen(100 + step))
            out, send = fn(bucket, residual, table.table, table.slots, block, bits, 2**64 - 1, step)
            outs.append((out.clone(), send.clone(), residual.clone()))
        results[mode] = outs
    for (o1, s1, r1), (o2, s2, r2) in zip(results["eager"], results["compiled"]):
        assert torch.equal(o1.view(torch.int32), o2.view(torch.int32))
        assert torch.equal(s1, s2)
        assert torch.equal(r1.view(torch.int32), r2.view(torch.int32))
    assert results["eager"][-1][2].abs().sum() > 0  # error feedback really ran


def test_python_uses_the_compiled_constants():
    """The format's constants come from _C.constants (codec.h), and the tables and payloads
    Python builds have the shapes those constants give."""
    c = _C.constants
    assert ops.ROW_WORDS == layout.ROW_WORDS == c["row_words"]
    assert ops.SPARSE_ROW_WORDS == layout.SPARSE_ROW_WORDS == c["sparse_row_words"]
    assert ops.SPARSE_TILE == layout.SPARSE_TILE == c["sparse_tile"]
    assert layout.NOISE_OFFSET_BITS == c["noise_offset_bits"]
    assert ops.RANDOMK_HEADER == c["randomk_header"]
    assert ops.PAYLOAD_ALIGN == c["payload_align"]
    assert ops.BLOCK_SIZES[0] == c["min_block"] and ops.BLOCK_SIZES[-1] == c["max_block"]
    assert all(b * 2 == nb for b, nb in zip(ops.BLOCK_SIZES, ops.BLOCK_SIZES[1:]))
    t = layout.build_table(layout.contiguous_spans([5000], 256, ordinals=[3]), 256, 2)
    assert t.table.shape[1] == c["row_words"]
    assert int(t.table[1, 3]) >> c["noise_offset_bits"] == 3  # the ordinal sits above the offset bits
    st = layout.build_sparse_table(layout.contiguous_spans([c["sparse_tile"] + 1], 64), 0.1)
    assert st.table.shape[1] == c["sparse_row_words"] and st.tiles == 2
    # a shard: the header, the scales padded to 16 bytes, the codes
    assert ops.shard_bytes(3, 64, 8) == c["shard_header_bytes"] + 16 + 3 * 64
    assert ops.randomk_encode(torch.randn(100), st.table[:0], 0, seed=0, step=0).numel() == c["randomk_header"]
    for bad in (c["min_block"] // 2, c["max_block"] * 2):
        with pytest.raises(ValueError, match=f"\\[{c['min_block']}, {c['max_block']}\\]"):
            ops.quant_encode(torch.randn(64), t.table[:0], 1, 0, bad)
