"""GPU tests (marked ``cuda``; skipped without a device): the CUDA backend produces the
CPU backend's bytes, and the hook runs on NCCL at world size 1 with compression forced."""

import os

import gradcomp
import pytest
import torch
from gradcomp import layout, ops
from reference import compressed_mean

pytestmark = pytest.mark.cuda


def _exchange(xs, numels, block, world, device, ef=True, seed=0, *, bits=8, residual_dtype=torch.float32,
              stochastic=False, noise_seed=0, step=0, ordinals=None, res_offset=0):
    """Runs the three passes for W simulated ranks on ``device`` (rank w encodes and reduces
    as rank w); returns every buffer and residual on the CPU for comparison. ``res_offset``
    starts each residual that many elements into its allocation (misaligned: no vector
    loads)."""
    g = torch.Generator().manual_seed(seed)
    res = [[(torch.randn(res_offset + n, generator=g) * 0.01).to(residual_dtype).to(device)[res_offset:]
            if ef else None for n in numels] for _ in range(world)]
    itemsize = torch.empty(0, dtype=residual_dtype).element_size()
    tables = []
    for w in range(world):
        addrs = [r.data_ptr() for r in res[w]] if ef else None
        t = layout.build_table(layout.contiguous_spans(numels, block, addrs, ordinals), block, world,
                               residual_itemsize=itemsize)
        tables.append((t, t.table.to(device)))
    slots, sb = tables[0][0].slots, tables[0][0].shard_bytes(bits)
    kw = dict(bits=bits, residual_dtype=residual_dtype, stochastic=stochastic, seed=noise_seed, step=step)
    xs = [x.to(device) for x in xs]
    sends = [ops.quant_encode(xs[w], tables[w][1], world, slots, block, rank=w, **kw) for w in range(world)]
    res_after_encode = [[r.cpu().clone() for r in rr] if ef else [] for rr in res]
    recvs = [torch.cat([sends[s][w * sb:(w + 1) * sb] for s in range(world)]) for w in range(world)]
    slices = [ops.quant_reduce(recvs[w], tables[w][1][w * slots:(w + 1) * slots], world, slots, block, rank=w, **kw)
              for w in range(world)]
    gathered = torch.cat(slices)
    outs = [ops.quant_decode(gathered, tables[w][1], world, slots, block, xs[w].clone(), bits=bits)
            for w in range(world)]
    torch.cuda.synchronize() if device.type == "cuda" else None
    return {
        "send": [s.cpu() for s in sends],
        "res_encode": res_after_encode,
        "slices": [s.cpu() for s in slices],
        "res_final": [[r.cpu() for r in rr] if ef else [] for rr in res],
        "out": [o.cpu() for o in outs],
    }


def _same(a, b):
    if a.dtype.is_floating_point:
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
            torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))
    return torch.equal(a, b)


def _assert_same(cpu, gpu, what=""):
    """Payloads, slices and outputs equal (NaN where NaN), residuals equal bit for bit."""
    for key in ("send", "slices", "out"):
        for a, b in zip(cpu[key], gpu[key]):
            assert _same(a, b), (key, what)
    for key in ("res_encode", "res_final"):
        for ra, rb in zip(cpu[key], gpu[key]):
            for a, b in zip(ra, rb):
                assert torch.equal(_bits_of(a), _bits_of(b)), (key, what)


def _bits_of(r):
    """A residual's bit patterns (torch.equal alone takes -0 for +0)."""
    return r.view(torch.int16 if r.element_size() == 2 else torch.int32)


def _inputs(numels, world, dtype, seed):
    """Per-rank buckets spanning magnitudes 1e-30 .. 1e4."""
    g = torch.Generator().manual_seed(seed)
    n = sum(numels)
    return [(torch.randn(n, generator=g) * torch.logspace(-30, 30, n).clamp(max=1e4)).to(dtype) for _ in range(world)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [32, 256, 512, 1024, 4096])
@pytest.mark.parametrize("world", [1, 3, 4])
def test_cuda_payloads_match_cpu_bit_for_bit(dtype, block, world):
    g = torch.Generator().manual_seed(block * 10 + world)
    numels = [1, 1000, block, 3 * block + 7, 50_000]
    xs = []
    for _ in range(world):
        x = torch.randn(sum(numels), generator=g) * torch.logspace(-30, 30, sum(numels)).clamp(max=1e4)
        xs.append(x.to(dtype))
    cpu = _exchange(xs, numels, block, world, torch.device("cpu"))
    gpu = _exchange(xs, numels, block, world, torch.device("cuda"))
    for key in ("send", "slices", "out"):
        for a, b in zip(cpu[key], gpu[key]):
            assert _same(a, b), key
    for key in ("res_encode", "res_final"):
        for ra, rb in zip(cpu[key], gpu[key]):
            for a, b in zip(ra, rb):
                assert torch.equal(a, b), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cuda_nonfinite_matches_cpu(bad):
    numels = [5000, 700]
    xs = [torch.randn(sum(numels)) for _ in range(3)]
    xs[1][4321] = bad
    cpu = _exchange(xs, numels, 256, 3, torch.device("cpu"))
    gpu = _exchange(xs, numels, 256, 3, torch.device("cuda"))
    for key in ("send", "slices", "out"):
        for a, b in zip(cpu[key], gpu[key]):
            assert _same(a, b), key
    assert all(torch.isnan(o).all() for o in gpu["out"])
    for rr in gpu["res_final"]:
        assert all(torch.isfinite(r).all() for r in rr)


def test_cuda_ef_off_matches_cpu():
    numels = [3000, 20_000]
    xs = [torch.randn(sum(numels)) for _ in range(2)]
    cpu = _exchange(xs, numels, 128, 2, torch.device("cpu"), ef=False)
    gpu = _exchange(xs, numels, 128, 2, torch.device("cuda"), ef=False)
    for key in ("send", "slices", "out"):
        for a, b in zip(cpu[key], gpu[key]):
            assert _same(a, b), key


@pytest.fixture
def nccl_world1():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29731")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def _extreme_inputs():
    """(numels, two ranks' buckets): subnormals, an all-zero block, normal values, FLT_MAX."""
    fmax = torch.finfo(torch.float32).max
    numels = [256, 256, 256, 300]
    x = torch.cat([torch.randn(256) * 1e-40, torch.zeros(256), torch.randn(256), torch.randn(300)])
    x[600] = fmax
    x[601] = -fmax / 3
    return numels, [x, -x.flip(0)]


def _model_and_twin(dev, d_in: int, hidden: int, d_out: int):
    """A two-layer MLP on ``dev`` and a twin with the same weights (its local gradients are the
    reference's input)."""
    model, twin = (torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, d_out)).to(dev) for _ in range(2))
    twin.load_state_dict(model.state_dict())
    return model, twin


def _hook_that_never_syncs(st, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """gradcomp's hook, where any host sync raises once the first bucket has checked the
    configuration (a one-time sync): building a layout's tables (step 0, and step 1 after
    DDP's rebuild) included."""
    torch.cuda.set_sync_debug_mode("error" if st._checked else "default")
    try:
        return gradcomp.comm_hook(st, bucket)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
def test_nccl_hook_world_size_one_forced(nccl_world1):
    """The whole hook on NCCL: the gradient equals the reference's compressed mean of the
    local gradient at W=1 (quantize, average over one rank, re-quantize), bit for bit, and
    after the first bucket's configuration check the hook never synchronizes the host with
    the device."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    model, twin = _model_and_twin(dev, 512, 512, 64)
    ddp = DDP(model, device_ids=[0], bucket_cap_mb=0.5)
    state = gradcomp.State("int8", force_compression=True, min_numel=1000)

    ddp.register_comm_hook(state, _hook_that_never_syncs)
    residuals = {}
    for step in range(4):
        x = torch.randn(32, 512, device=dev)
        ddp.zero_grad()
        ddp(x).square().mean().backward()
        twin.zero_grad()
        twin(x).square().mean().backward()
        for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
            local = q.grad.reshape(-1).cpu()
            if p.numel() < 1000:
                assert torch.equal(p.grad.reshape(-1).cpu(), local)  # exact lane at W=1
                continue
            r = residuals.get(i, torch.zeros_like(local))
            expect, (new_r,) = compressed_mean([local], [r], 256, torch.zeros(-(-local.numel() // 256),
                                                                                 dtype=torch.int64))
            residuals[i] = new_r
            assert torch.equal(p.grad.reshape(-1).cpu(), expect), f"param {i} step {step}"
        twin.load_state_dict(model.state_dict())
    assert state.stats["buckets_compressed"] > 0


def test_cuda_extreme_magnitudes_match_cpu():
    """FLT_MAX (scale steps one ulp down), subnormals (scale underflows: codes 0, residual
    keeps the value), an all-zero block, and 16-bit buckets at their own extremes."""
    numels, xs = _extreme_inputs()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = [v.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype) for v in xs]
        cpu = _exchange(xd, numels, 256, 2, torch.device("cpu"))
        gpu = _exchange(xd, numels, 256, 2, torch.device("cuda"))
        for key in ("send", "slices", "out"):
            for a, b in zip(cpu[key], gpu[key]):
                assert _same(a, b), (key, dtype)
        for ra, rb in zip(cpu["res_final"], gpu["res_final"]):
            for a, b in zip(ra, rb):
                assert torch.equal(a, b) and torch.isfinite(b).all(), dtype


def test_cuda_rejects_misaligned_payloads_and_keeps_the_current_device():
    dev = torch.device("cuda", 0)
    block, world = 32, 2
    table = layout.build_table(layout.contiguous_spans([100], block), block, world)
    tdev = table.table.to(dev)
    bucket = torch.randn(100, device=dev)
    sb = table.shard_bytes()
    odd = torch.zeros(world * sb + 1, dtype=torch.uint8, device=dev)[1:]
    with pytest.raises(ValueError, match="16-byte"):
        ops.quant_encode(bucket, tdev, world, table.slots, block, out=odd)
    with pytest.raises(ValueError, match="16-byte"):
        ops.quant_decode(odd, tdev, world, table.slots, block, bucket)
    before = torch.cuda.current_device()
    ops.quant_encode(bucket, tdev, world, table.slots, block)
    assert torch.cuda.current_device() == before


# ---- codes of 8, 4, 2 and 1 bits, stochastic rounding, bfloat16 residuals
# Blocks 32 and 64 give lanes fields narrower than a byte (shared words), 512 keeps values in
# registers, 1024 and 4096 read them again. With bits 2 or 1, block 32 or 64 and an odd slot
# count (world 3 here), shard bytes are no multiple of 16: shards after the first start only
# 4- or 8-byte aligned.
BLOCKS = [32, 64, 128, 512, 1024, 4096]


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("world", [1, 3])
def test_cuda_every_bit_width_matches_cpu(bits, block, world):
    numels = [1, 1000, block, 3 * block + 7, 20_000]
    for dtype in (torch.float32, torch.bfloat16):
        xs = _inputs(numels, world, dtype, bits * 1000 + block + world)
        cpu = _exchange(xs, numels, block, world, torch.device("cpu"), bits=bits)
        gpu = _exchange(xs, numels, block, world, torch.device("cuda"), bits=bits)
        _assert_same(cpu, gpu, (bits, dtype))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("world", [1, 3])
def test_cuda_stochastic_rounding_matches_cpu(bits, block, world):
    """The draws are keyed by (seed, step, rank, pass, ordinal, offset): both backends draw
    the same, and a new step draws anew."""
    numels = [1, 1000, block, 3 * block + 7, 20_000]
    ordinals = [0, 3, 7, 1 << 20, 5]  # the high offset bits and the ordinal go into the key
    xs = _inputs(numels, world, torch.float32, bits * 1000 + block + world + 1)
    runs = {}
    for step in (0, 1):
        kw = dict(bits=bits, stochastic=True, noise_seed=1234, step=step, ordinals=ordinals)
        cpu = _exchange(xs, numels, block, world, torch.device("cpu"), **kw)
        gpu = _exchange(xs, numels, block, world, torch.device("cuda"), **kw)
        _assert_same(cpu, gpu, (bits, step))
        runs[step] = gpu
    nearest = _exchange(xs, numels, block, world, torch.device("cuda"), bits=bits, ordinals=ordinals)
    assert not all(torch.equal(a, b) for a, b in zip(runs[0]["send"], nearest["send"]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0]["send"], runs[1]["send"]))


@pytest.mark.parametrize("bits,stochastic", [(8, False), (8, True), (4, False), (4, True), (2, True), (1, False)])
@pytest.mark.parametrize("block", [32, 256, 2048])
@pytest.mark.parametrize("res_offset", [0, 1])
def test_cuda_bf16_residuals_match_cpu(bits, stochastic, block, res_offset):
    """bfloat16 residuals (rounded to nearest even on every store), with and without vector
    access (res_offset 1 misaligns every residual row)."""
    numels = [1, 1000, block, 3 * block + 7, 20_000]
    world = 3
    for dtype in (torch.float32, torch.float16):
        xs = _inputs(numels, world, dtype, bits * 100 + block + res_offset)
        kw = dict(bits=bits, residual_dtype=torch.bfloat16, stochastic=stochastic, noise_seed=7, step=3,
                  res_offset=res_offset)
        cpu = _exchange(xs, numels, block, world, torch.device("cpu"), **kw)
        gpu = _exchange(xs, numels, block, world, torch.device("cuda"), **kw)
        _assert_same(cpu, gpu, (bits, dtype))


@pytest.mark.parametrize("bits", [4, 2, 1])
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cuda_nonfinite_narrow_codes_match_cpu(bits, residual_dtype, bad):
    numels = [5000, 700]
    xs = [torch.randn(sum(numels)) for _ in range(3)]
    xs[1][4321] = bad
    kw = dict(bits=bits, residual_dtype=residual_dtype)
    cpu = _exchange(xs, numels, 64, 3, torch.device("cpu"), **kw)
    gpu = _exchange(xs, numels, 64, 3, torch.device("cuda"), **kw)
    _assert_same(cpu, gpu, bits)
    assert all(torch.isnan(o).all() for o in gpu["out"])


@pytest.mark.parametrize("bits", [4, 2, 1])
def test_cuda_extreme_magnitudes_narrow_codes_match_cpu(bits):
    """As test_cuda_extreme_magnitudes_match_cpu, for the narrow codes and both residual
    types; stochastic rounding where the codec has it."""
    numels, xs = _extreme_inputs()
    for residual_dtype in (torch.float32, torch.bfloat16):
        for stochastic in (False, True) if bits != 1 else (False,):
            kw = dict(bits=bits, residual_dtype=residual_dtype, stochastic=stochastic, noise_seed=99)
            cpu = _exchange(xs, numels, 256, 2, torch.device("cpu"), **kw)
            gpu = _exchange(xs, numels, 256, 2, torch.device("cuda"), **kw)
            _assert_same(cpu, gpu, (residual_dtype, stochastic))
            for rr in gpu["res_final"]:
                assert all(torch.isfinite(r.float()).all() for r in rr)


def test_cuda_core_rejects_what_it_cannot_do():
    """The CUDA entry points check their own arguments (not only ops.py): no stochastic
    scaled sign, residuals only float32 or bfloat16, codes of 8, 4, 2 or 1 bits."""
    from gradcomp import _C

    dev = torch.device("cuda", 0)
    block, world = 32, 1
    table = layout.build_table(layout.contiguous_spans([100], block), block, world)
    tdev = table.table.to(dev)
    bucket = torch.randn(100, device=dev)
    send = torch.zeros(world * table.shard_bytes(8), dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream

    def encode(bits, residual_code, stochastic):
        _C.quant_encode_cuda(bits, block, 0, residual_code, bucket.data_ptr(), tdev.data_ptr(), world, table.slots,
                             send.data_ptr(), 0, 0, 0, stochastic, 0, stream)

    def reduce(bits, residual_code, stochastic):
        _C.quant_reduce_cuda(bits, block, residual_code, send.data_ptr(), tdev.data_ptr(), world, table.slots,
                             send.data_ptr(), 0, 0, 0, stochastic, 0, stream)

    for fn in (encode, reduce):
        with pytest.raises(ValueError, match="scaled sign"):
            fn(1, 0, True)
        with pytest.raises(ValueError, match="float32 or bfloat16"):
            fn(8, 1, False)
        with pytest.raises(ValueError, match="8, 4, 2 or 1 bits"):
            fn(3, 0, False)
    encode(4, 2, True)  # accepted
    torch.cuda.synchronize()



# ---------------------------------------------------------------- top-k and random-k
def _sparse_run(dtype, wire, approx, ef, world, device, corrupt=None, nan_at=None):
    """W simulated ranks' top-k exchange on ``device``, from the same inputs each time;
    returns payloads, residuals, decoded buckets and rejection counts on the CPU."""
    from test_sparse import Bucket

    buckets = []
    for w in range(world):
        g = torch.Generator().manual_seed(100 + w)
        b = Bucket([1, 100, 4096, 4097, 70_000, 300_001], dtype, g, ef=ef, ratio=0.01, scale=10.0)
        b.param(3)[:] = 1.5  # every value tied, across two tiles
        if nan_at is not None and w == world - 1:
            b.param(4)[nan_at] = float("nan")
        b.x = b.x.to(device)
        b.residuals = [r.to(device) if r is not None else None for r in b.residuals]
        b.refresh()
        buckets.append(b)
    tables = [b.table.table.to(device) for b in buckets]
    pairs, tiles = buckets[0].table.pairs, buckets[0].table.tiles
    payloads = [ops.topk_encode(b.x, t, pairs, approx=approx, value_dtype=wire, tiles=tiles)
                for b, t in zip(buckets, tables)]
    gathered = torch.cat(payloads)
    if corrupt is not None:
        corrupt(gathered, buckets[0].table)
    outs, rejected = [], []
    for b, t in zip(buckets, tables):
        out = b.x.clone()
        rej = ops.topk_decode(gathered, t, pairs, world, out, value_dtype=wire)
        outs.append(out.cpu())
        rejected.append(int(rej) if isinstance(rej, int) else int(rej.cpu()[0]))
    return {"payloads": [p.cpu() for p in payloads], "outs": outs, "rejected": rejected,
            "residuals": [[r.cpu() for r in b.residuals] if ef else [] for b in buckets]}


@pytest.mark.parametrize("approx", [False, True], ids=["exact", "approx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wire", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world", [1, 3])
def test_cuda_topk_matches_cpu_bit_for_bit(approx, dtype, wire, world):
    dev = torch.device("cuda", 0)
    cpu = _sparse_run(dtype, wire, approx, True, world, torch.device("cpu"))
    gpu = _sparse_run(dtype, wire, approx, True, world, dev)
    for key in ("payloads", "outs"):
        for w in range(world):
            assert _same(cpu[key][w], gpu[key][w]), f"{key} of rank {w}"
    for w in range(world):
        for a, b in zip(cpu["residuals"][w], gpu["residuals"][w]):
            assert _same(a, b), f"residuals of rank {w}"


@pytest.mark.parametrize("approx", [False, True], ids=["exact", "approx"])
def test_cuda_topk_non_finite_and_no_error_feedback_match_cpu(approx):
    dev = torch.device("cuda", 0)
    for ef in (True, False):
        cpu = _sparse_run(torch.float32, torch.float32, approx, ef, 2, torch.device("cpu"), nan_at=1234)
        gpu = _sparse_run(torch.float32, torch.float32, approx, ef, 2, dev, nan_at=1234)
        for w in range(2):
            assert _same(cpu["payloads"][w], gpu["payloads"][w]) and _same(cpu["outs"][w], gpu["outs"][w])
            for a, b in zip(cpu["residuals"][w], gpu["residuals"][w]):
                assert _same(a, b) and torch.isfinite(b).all()


@pytest.mark.parametrize("corruption", ["out_of_range", "negative", "duplicate", "random_bytes"])
def test_cuda_topk_rejects_corrupted_payloads_like_cpu(corruption):
    def corrupt(gathered, table):
        g = torch.Generator().manual_seed(7)
        nbytes = gathered.numel() // 2
        idx = gathered[nbytes + 16 : nbytes + 16 + 4 * table.pairs].view(torch.int32)
        first = int(table.table[4, 4])
        if corruption == "out_of_range":
            idx[first] = 70_000
        elif corruption == "negative":
            idx[first + 1] = -5
        elif corruption == "duplicate":
            idx[first + 2] = idx[first + 1]
        else:
            gathered[nbytes:] = torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8).to(gathered.device)

    dev = torch.device("cuda", 0)
    cpu = _sparse_run(torch.float32, torch.float32, False, True, 2, torch.device("cpu"), corrupt=corrupt)
    gpu = _sparse_run(torch.float32, torch.float32, False, True, 2, dev, corrupt=corrupt)
    assert cpu["rejected"][0] >= 1 and gpu["rejected"] == cpu["rejected"]
    for w in range(2):
        assert _same(cpu["outs"][w], gpu["outs"][w])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_randomk_matches_cpu(dtype):
    from test_sparse import Bucket

    results = []
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        b = Bucket([1, 1000, 300_001], dtype, torch.Generator().manual_seed(3), ratio=0.01, ordinals=[2, 5, 9])
        b.param(1)[17] = float("inf")
        b.x = b.x.to(device)
        b.residuals = [r.to(device) for r in b.residuals]
        b.refresh()
        t = b.table.table.to(device)
        payload = ops.randomk_encode(b.x, t, b.table.pairs, seed=11, step=4)
        res = [r.cpu() for r in b.residuals]
        out = b.x.clone()
        ops.randomk_decode(payload.clone().mul_(2), t, 2, out, seed=11, step=4)
        payload[0] = 0  # decode the finite path as well
        out2 = b.x.clone()
        ops.randomk_decode(payload, t, 2, out2, seed=11, step=4)
        results.append((payload.cpu(), res, out.cpu(), out2.cpu()))
    (pc, rc, oc, o2c), (pg, rg, og, o2g) = results
    assert _same(pc, pg) and _same(oc, og) and _same(o2c, o2g)
    for a, b in zip(rc, rg):
        assert _same(a, b)


@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
@pytest.mark.parametrize("codec", ["topk:0.01", "topk:0.01:approx:fp16", "randomk:0.01"])
def test_nccl_sparse_hook_world_size_one_forced_never_syncs(nccl_world1, codec):
    """The sparse hooks on NCCL: no host sync after the first call, and every compressed
    gradient keeps exactly k nonzeros per parameter (W = 1: the average is the sent values)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Tanh(), torch.nn.Linear(512, 64)).to(dev)
    ddp = DDP(model, device_ids=[0], bucket_cap_mb=0.5)
    state = gradcomp.State(codec, force_compression=True, min_numel=1000)

    ddp.register_comm_hook(state, _hook_that_never_syncs)
    for _ in range(4):
        ddp.zero_grad()
        ddp(torch.randn(32, 512, device=dev)).square().mean().backward()
        for p in model.parameters():
            if p.numel() >= 1000:
                assert int((p.grad != 0).sum()) <= layout.pairs_for(p.numel(), 0.01)
    torch.cuda.synchronize()
    assert state.stats["buckets_compressed"] > 0 and state.stats["payloads_rejected"] == 0


@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
def test_nccl_all_reduce_world_size_one_forced(nccl_world1):
    """gradcomp.all_reduce on CUDA (the side stream), sync and async: bit for bit the
    reference's engine_allreduce at W=1, and no host sync after the first call."""
    from reference import engine_allreduce

    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(3)
    state = gradcomp.State("int8", force_compression=True, min_numel=1000)
    residuals = {}
    for step in range(3):
        host = [torch.randn(3000, generator=g), torch.randn(40, 60, generator=g), torch.randn(100, generator=g)]
        xs = [h.to(dev) for h in host]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            if step == 1:
                gradcomp.all_reduce(xs, state, async_op=True).wait()
            else:
                gradcomp.all_reduce(xs, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        expect = engine_allreduce([host], residuals, 256, 8, 1000, 1)
        for i, (x, e) in enumerate(zip(xs, expect)):
            got = x.cpu().reshape(-1)
            assert torch.equal(got, host[i].reshape(-1) if e is None else e), f"tensor {i} step {step}"


@pytest.mark.parametrize("codec", ["int8", "int4:stochastic", "sign"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fsdp_reduce_scatter_on_cuda_is_the_cpu_result(codec, dtype):
    """The engine's reduce-scatter (what gradcomp.fsdp's comm runs) for 3 simulated ranks as
    threads on one GPU, on its default stream: the same bytes as on the CPU, step after step
    (residuals carried), a non-finite value included. One GPU never makes FSDP call the comm,
    so the ranks' all-to-all is a loopback; NCCL's all-to-all and FSDP's streams await a
    machine with several GPUs."""
    from test_fsdp import engine_reduce_scatter, random_layout, same

    world = 3
    gen = torch.Generator().manual_seed(11)
    pieces, shard = random_layout(world, gen)
    inputs = [[torch.randn(world * shard, generator=gen).to(dtype) for _ in range(world)] for _ in range(3)]
    inputs[1][2][7] = float("nan")
    cpu = engine_reduce_scatter(inputs, pieces, codec, [0, 1, 2])
    gpu = engine_reduce_scatter(inputs, pieces, codec, [0, 1, 2], device="cuda")
    for step in range(3):
        for r in range(world):
            assert same(gpu[step][r], cpu[step][r]), f"step {step} rank {r}"


@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
def test_nccl_powersgd_hook_matches_the_reference_without_host_sync(nccl_world1):
    """PowerSGD through the DDP hook on NCCL at W=1 (forced), two buckets: every compressed
    weight's gradient is the pure-torch reference's P Qᵀ (computed on the CPU: cuBLAS and
    cuSOLVER round differently, so to 1e-4), the residual keeps the rest, and after the first
    bucket's configuration check the hook never synchronizes the host with the device."""
    import reference as ref
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    model, twin = _model_and_twin(dev, 256, 512, 128)
    ddp = DDP(model, device_ids=[0], bucket_cap_mb=0.3)
    state = gradcomp.State("powersgd:4", force_compression=True, seed=5)
    ddp.register_comm_hook(state, _hook_that_never_syncs)
    shapes = [tuple(p.shape) for p in model.parameters()]
    ref_state = {}
    for step in range(3):
        x = torch.randn(32, 256, device=dev)
        ddp.zero_grad()
        ddp(x).square().mean().backward()
        twin.zero_grad()
        twin(x).square().mean().backward()
        ordinals = [state._ddp_ordinal_of[id(p)] for p in model.parameters()]
        local = [None] * len(shapes)
        for j, q in enumerate(twin.parameters()):
            local[ordinals[j]] = q.grad.detach().cpu().reshape(shapes[j])
        expect = ref.powersgd_allreduce([local], ref_state, 4, 1024, 5, step)
        for j, p in enumerate(model.parameters()):
            e = expect[ordinals[j]]
            got = p.grad.detach().cpu().reshape(-1)
            if e is None:
                assert torch.equal(got, local[ordinals[j]].reshape(-1))
            else:
                torch.testing.assert_close(got, e, rtol=1e-4, atol=1e-5)
        twin.load_state_dict(model.state_dict())
    assert state.stats["params_compressed"] == 2 * 3
