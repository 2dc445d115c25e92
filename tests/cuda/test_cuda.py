"""GPU tests (marked ``cuda``; skipped without a device): the CUDA backend produces the
CPU backend's bytes, and the hook runs on NCCL at world size 1 with compression forced."""

import os

import gradcomp
import pytest
import torch
from gradcomp import ops
from gradcomp.engine import layout
from harness import (
    SparseBucket,
    assert_bits_equal,
    assert_same_runs,
    check_sparse_hook_at_world_one,
    corrupter,
    exchange,
    exchange_results,
    extreme_inputs,
    gen,
    make_residuals,
    model_and_twin,
    randomk_run,
    tied_buckets,
    topk_exchange,
    wide_inputs,
)
from reference import compressed_mean

pytestmark = pytest.mark.cuda

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def _run(xs, numels, block, world, device, *, ef=True, seed=0, residual_dtype=torch.float32, res_offset=0, **kw):
    """harness.exchange of W simulated ranks on ``device`` (rank w encodes and reduces as rank
    w), with error feedback from residuals drawn from ``seed`` (``res_offset`` elements into
    their allocations: misaligned, no vector access); ``kw``: bits, rounding, ordinals.
    Returns harness.exchange_results, on the CPU."""
    itemsize = torch.empty(0, dtype=residual_dtype).element_size()
    res = make_residuals(numels, world, gen("residuals", seed), dtype=residual_dtype, device=device,
                         misalign=res_offset * itemsize) if ef else None
    return exchange_results(exchange([x.to(device) for x in xs], numels, block, world, res, **kw))


def _compare(xs, numels, block, world, what="", **kw):
    """The same exchange on the CPU and the GPU: payloads, slices, outputs (NaN where NaN) and
    residuals, bit for bit (-0.0 is not +0.0). Returns the GPU's results."""
    cpu = _run(xs, numels, block, world, CPU, **kw)
    gpu = _run(xs, numels, block, world, GPU, **kw)
    assert_same_runs(cpu, gpu, what)
    return gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [32, 256, 512, 1024, 4096])
@pytest.mark.parametrize("world", [1, 3, 4])
def test_cuda_payloads_match_cpu_bit_for_bit(dtype, block, world):
    numels = [1, 1000, block, 3 * block + 7, 50_000]
    xs = wide_inputs(numels, world, dtype, gen("payloads", str(dtype), block, world))
    _compare(xs, numels, block, world, (str(dtype), block, world))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cuda_nonfinite_matches_cpu(bad):
    numels = [5000, 700]
    g = gen("nonfinite", bad)
    xs = [torch.randn(sum(numels), generator=g) for _ in range(3)]
    xs[1][4321] = bad
    gpu = _compare(xs, numels, 256, 3, bad)
    assert all(torch.isnan(o).all() for o in gpu["outs"])
    for rr in gpu["res_red"]:
        assert all(torch.isfinite(r).all() for r in rr)


def test_cuda_ef_off_matches_cpu():
    numels = [3000, 20_000]
    g = gen("ef-off")
    xs = [torch.randn(sum(numels), generator=g) for _ in range(2)]
    _compare(xs, numels, 128, 2, "ef off", ef=False)


@pytest.fixture
def nccl_world1():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29731")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def _hook_that_never_syncs(st, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """gradcomp's hook, where any host sync raises once the first bucket has checked the
    configuration (a one-time sync): building a layout's tables (step 0, and step 1 after
    DDP's rebuild) included."""
    torch.cuda.set_sync_debug_mode("error" if st.runtime.checked else "default")
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
    model, twin = model_and_twin(dev, 512, 512, 64)
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
                assert_bits_equal(p.grad.reshape(-1).cpu(), local, f"param {i} step {step}: exact lane at W=1")
                continue
            r = residuals.get(i, torch.zeros_like(local))
            expect, (new_r,) = compressed_mean([local], [r], 256, torch.zeros(-(-local.numel() // 256),
                                                                                 dtype=torch.int64))
            residuals[i] = new_r
            assert_bits_equal(p.grad.reshape(-1).cpu(), expect, f"param {i} step {step}")
        twin.load_state_dict(model.state_dict())
    assert state.stats["buckets_compressed"] > 0


def test_cuda_extreme_magnitudes_match_cpu():
    """FLT_MAX (scale steps one ulp down), subnormals (scale underflows: codes 0, residual
    keeps the value), an all-zero block, and 16-bit buckets at their own extremes."""
    numels, xs = extreme_inputs(gen("extreme"))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = [v.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype) for v in xs]
        gpu = _compare(xd, numels, 256, 2, dtype)
        for rr in gpu["res_red"]:
            assert all(torch.isfinite(r).all() for r in rr), dtype


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
        xs = wide_inputs(numels, world, dtype, gen("bits", bits, block, world, str(dtype)))
        _compare(xs, numels, block, world, (bits, dtype), bits=bits)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("world", [1, 3])
def test_cuda_stochastic_rounding_matches_cpu(bits, block, world):
    """The draws are keyed by (seed, step, rank, pass, ordinal, offset): both backends draw
    the same, and a new step draws anew."""
    numels = [1, 1000, block, 3 * block + 7, 20_000]
    ordinals = [0, 3, 7, 1 << 20, 5]  # the high offset bits and the ordinal go into the key
    xs = wide_inputs(numels, world, torch.float32, gen("stochastic", bits, block, world))
    runs = {}
    for step in (0, 1):
        runs[step] = _compare(xs, numels, block, world, (bits, step), bits=bits,
                              rounding={"seed": 1234, "step": step}, ordinals=ordinals)
    nearest = _run(xs, numels, block, world, GPU, bits=bits, ordinals=ordinals)
    assert not all(torch.equal(a, b) for a, b in zip(runs[0]["sends"], nearest["sends"]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0]["sends"], runs[1]["sends"]))


@pytest.mark.parametrize("bits,stochastic", [(8, False), (8, True), (4, False), (4, True), (2, True), (1, False)])
@pytest.mark.parametrize("block", [32, 256, 2048])
@pytest.mark.parametrize("res_offset", [0, 1])
def test_cuda_bf16_residuals_match_cpu(bits, stochastic, block, res_offset):
    """bfloat16 residuals (rounded to nearest even on every store), with and without vector
    access (res_offset 1 misaligns every residual row)."""
    numels = [1, 1000, block, 3 * block + 7, 20_000]
    world = 3
    for dtype in (torch.float32, torch.float16):
        xs = wide_inputs(numels, world, dtype, gen("bf16-residuals", bits, block, res_offset, str(dtype)))
        _compare(xs, numels, block, world, (bits, dtype), bits=bits, residual_dtype=torch.bfloat16,
                 rounding={"seed": 7, "step": 3} if stochastic else None, res_offset=res_offset)


@pytest.mark.parametrize("bits", [4, 2, 1])
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cuda_nonfinite_narrow_codes_match_cpu(bits, residual_dtype, bad):
    numels = [5000, 700]
    g = gen("nonfinite-narrow", bits, str(residual_dtype), bad)
    xs = [torch.randn(sum(numels), generator=g) for _ in range(3)]
    xs[1][4321] = bad
    gpu = _compare(xs, numels, 64, 3, bits, bits=bits, residual_dtype=residual_dtype)
    assert all(torch.isnan(o).all() for o in gpu["outs"])


@pytest.mark.parametrize("bits", [4, 2, 1])
def test_cuda_extreme_magnitudes_narrow_codes_match_cpu(bits):
    """As test_cuda_extreme_magnitudes_match_cpu, for the narrow codes and both residual
    types; stochastic rounding where the codec has it."""
    numels, xs = extreme_inputs(gen("extreme", bits))
    for residual_dtype in (torch.float32, torch.bfloat16):
        for stochastic in (False, True) if bits != 1 else (False,):
            gpu = _compare(xs, numels, 256, 2, (residual_dtype, stochastic), bits=bits, residual_dtype=residual_dtype,
                           rounding={"seed": 99, "step": 0} if stochastic else None)
            for rr in gpu["res_red"]:
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
SPARSE_NUMELS = [1, 100, 4096, 4097, 70_000, 300_001]


def _topk_run(dtype, wire, approx, ef, world, device, corrupt=None, nan_at=None):
    """harness.topk_exchange of W simulated ranks' tied buckets on ``device``, from the same
    inputs each time: ({payloads, outs, residuals} on the CPU, rejected counts)."""
    buckets = tied_buckets(SPARSE_NUMELS, dtype, world, lambda w: gen("topk", w), ef=ef, nan_at=nan_at, device=device)
    return topk_exchange(buckets, wire, approx, corrupt=corrupt)


@pytest.mark.parametrize("approx", [False, True], ids=["exact", "approx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wire", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world", [1, 3])
def test_cuda_topk_matches_cpu_bit_for_bit(approx, dtype, wire, world):
    cpu, _ = _topk_run(dtype, wire, approx, True, world, CPU)
    gpu, _ = _topk_run(dtype, wire, approx, True, world, GPU)
    assert_same_runs(cpu, gpu, (approx, dtype, wire, world))


@pytest.mark.parametrize("approx", [False, True], ids=["exact", "approx"])
def test_cuda_topk_non_finite_and_no_error_feedback_match_cpu(approx):
    for ef in (True, False):
        cpu, _ = _topk_run(torch.float32, torch.float32, approx, ef, 2, CPU, nan_at=1234)
        gpu, _ = _topk_run(torch.float32, torch.float32, approx, ef, 2, GPU, nan_at=1234)
        assert_same_runs(cpu, gpu, (approx, ef))
        assert all(torch.isfinite(r).all() for rr in gpu["residuals"] for r in rr)


@pytest.mark.parametrize("corruption", ["out_of_range", "negative", "duplicate", "random_bytes"])
def test_cuda_topk_rejects_corrupted_payloads_like_cpu(corruption):
    cpu, cpu_rejected = _topk_run(torch.float32, torch.float32, False, True, 2, CPU,
                                  corrupt=corrupter(corruption, gen("bytes")))
    gpu, gpu_rejected = _topk_run(torch.float32, torch.float32, False, True, 2, GPU,
                                  corrupt=corrupter(corruption, gen("bytes")))
    assert cpu_rejected[0] >= 1 and gpu_rejected == cpu_rejected
    assert_same_runs({"outs": cpu["outs"]}, {"outs": gpu["outs"]}, corruption)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_randomk_matches_cpu(dtype):
    results = []
    for device in (CPU, GPU):
        b = SparseBucket([1, 1000, 300_001], dtype, gen("randomk", str(dtype)), ratio=0.01, ordinals=[2, 5, 9])
        b.param(1)[17] = float("inf")
        results.append(randomk_run(b.to(device)))
    assert_same_runs(results[0], results[1], dtype)


@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
@pytest.mark.parametrize("codec", ["topk:0.01", "topk:0.01:approx:fp16", "randomk:0.01"])
def test_nccl_sparse_hook_world_size_one_forced_never_syncs(nccl_world1, codec):
    """The sparse hooks on NCCL: no host sync after the first call, and every compressed
    gradient, step by step, is bit for bit the reference's: exactly k values per parameter at
    the reference's indices, zeros elsewhere (W = 1: the average is the sent values; the check
    is harness.check_sparse_hook_at_world_one, which tests/unit/test_sparse.py runs on Gloo)."""
    check_sparse_hook_at_world_one(codec, GPU, _hook_that_never_syncs)
    torch.cuda.synchronize()


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
            assert_bits_equal(got, host[i].reshape(-1) if e is None else e, f"tensor {i} step {step}")


@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
@pytest.mark.parametrize(("codec", "F", "delay"), [("int8:block=64", 2, 1), ("int4:block=64", 1, 0)])
def test_nccl_diloco_world_size_one_forced(nccl_world1, codec, F, delay):
    """gradcomp.DiLoCo on CUDA (inner steps on the GPU, the sync on the State's side stream):
    bit for bit the reference DiLoCo run on the same GPU with the reference exchange, and a
    step that sends without landing makes no host sync (a landing makes one: its finiteness
    check)."""
    import diloco_worker as dw
    import reference as ref

    a = {"H": 4, "codec": codec, "fragments": F, "delay": delay, "init_seed": 0, "seed": 2, "force": True}
    steps = 13
    model, opt, d = dw.build(a, 0, device=GPU)
    sends = [d.sync_steps(p, steps) for p in range(F)]
    landings = {s + delay for sched in sends for s in sched}
    # a fragment's first sync builds its tables (the first of all also agrees on the configuration)
    send_only = {s for sched in sends for s in sched[1:]} - landings
    assert send_only or delay == 0
    for s in range(1, steps + 1):
        dw.inner_step(model, opt, a["seed"], 0, s - 1)
        torch.cuda.synchronize()
        checked = s in send_only
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            d.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    twin = dw.make_model(0).to(GPU)
    twin_opt = dw.make_inner(twin)
    want = ref.diloco([twin], lambda r, s: dw.inner_step(twin, twin_opt, a["seed"], 0, s), steps, 4,
                      ref.diloco_fragments([p.numel() for p in twin.parameters()], F), delay, 0.7, 0.9, True,
                      codec=(64, 8 if codec.startswith("int8") else 4), min_numel=dw.MIN_NUMEL)
    for i, (t, w) in enumerate(zip(d.anchor.values(), want["anchors"][-1])):
        assert_bits_equal(t.cpu(), w.cpu(), f"anchor {i}")
    for i, (p, w) in enumerate(zip(model.parameters(), want["params"][0])):
        assert_bits_equal(p.detach().cpu(), w.cpu(), f"parameter {i}")
    assert d.state.stats["buckets_compressed"] > 0 and d.stats["syncs"] > 2


@pytest.mark.parametrize("codec", ["int8", "int4:stochastic", "sign"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fsdp_reduce_scatter_on_cuda_is_the_cpu_result(codec, dtype):
    """The engine's reduce-scatter (what gradcomp.fsdp's comm runs) for 3 simulated ranks as
    threads on one GPU, on its default stream: the same bytes as on the CPU, step after step
    (residuals carried), a non-finite value included. One GPU never makes FSDP call the comm,
    so the ranks' all-to-all is a loopback; NCCL's all-to-all and FSDP's streams await a
    machine with several GPUs."""
    from reduce_scatter_loopback import engine_reduce_scatter, random_layout, same

    world = 3
    g = torch.Generator().manual_seed(11)
    pieces, shard = random_layout(world, g)
    inputs = [[torch.randn(world * shard, generator=g).to(dtype) for _ in range(world)] for _ in range(3)]
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
    model, twin = model_and_twin(dev, 256, 512, 128)
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
        ordinals = [state.front.ordinal_of[id(p)] for p in model.parameters()]
        local = [None] * len(shapes)
        for j, q in enumerate(twin.parameters()):
            local[ordinals[j]] = q.grad.detach().cpu().reshape(shapes[j])
        expect = ref.powersgd_allreduce([local], ref_state, 4, 1024, 5, step)
        for j, p in enumerate(model.parameters()):
            e = expect[ordinals[j]]
            got = p.grad.detach().cpu().reshape(-1)
            if e is None:
                assert_bits_equal(got, local[ordinals[j]].reshape(-1), f"param {j} step {step}: exact lane")
            else:
                torch.testing.assert_close(got, e, rtol=1e-4, atol=1e-5)
        twin.load_state_dict(model.state_dict())
    assert state.stats["params_compressed"] == 2 * 3
