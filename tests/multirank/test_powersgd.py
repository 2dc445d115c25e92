"""PowerSGD ("powersgd:R"): the spec and its checks, then real Gloo processes (world sizes
1-4) held bit for bit to the pure-torch reference of the same algorithm (tests/support/reference.py,
``powersgd_allreduce``): gradcomp.all_reduce on odd shapes and 16-bit tensors and factors, the
DDP hook with several buckets and its re-layout after the first iteration, error feedback,
exact resume from per-rank checkpoints, non-finite propagation, configuration agreement."""

from pathlib import Path

import gradcomp
import pytest
import reference as ref
import torch
from ddp_worker import make_model
from dist_utils import describe, run_ranks
from gradcomp import codecs
from harness import assert_bits_equal

# [33, 40] and [7, 3, 129] are compressed at rank 2; [300] is a vector, [2049, 2] a matrix whose
# factors would not be 2x smaller, [16, 16] below min_numel: those three are averaged exactly
SHAPES = [[33, 40], [300], [7, 3, 129], [2049, 2], [16, 16], [96, 64]]
COMPRESSED = [0, 2, 5]
MIN_NUMEL = 512
# the scenarios run here, each by its worker: all_reduce's, and DDP training's
WORKERS = {"allreduce": Path(__file__).with_name("allreduce_worker.py"),
           "train": Path(__file__).with_name("ddp_worker.py")}


@pytest.fixture(autouse=True)
def one_thread():
    """The reference runs on one thread, as the workers do (OMP_NUM_THREADS=1): BLAS products
    and LAPACK's QR may round differently with another thread count (so do PowerSGD's own:
    replicas agree bit for bit when every rank runs the same torch with the same threads)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _run(world, tmp_path, scenario="allreduce", timeout=180, **args):
    res = run_ranks(scenario, world, tmp_path, worker=WORKERS[scenario], timeout=timeout, **args)
    assert res.ok, describe(res)
    return res.outputs


# ---------------------------------------------------------------- the codec


def test_spec_grammar_and_config():
    c = codecs.parse("powersgd:4")
    assert isinstance(c, gradcomp.PowerSGD) and c.rank == 4 and c.error_feedback and c.warm_start
    assert c.factor_dtype == torch.float32 and c.warmup == 0
    c = codecs.parse("powersgd:16:bf16:ef=0:warm=0:warmup=100")
    assert (c.rank, c.factor_dtype, c.error_feedback, c.warm_start, c.warmup) == (16, torch.bfloat16, False, False,
                                                                                  100)
    assert c.config() == {"codec": "powersgd", "rank": 16, "error_feedback": False, "warm_start": False,
                          "factor_dtype": "bf16", "warmup": 100}
    assert codecs.parse("powersgd:4") == gradcomp.PowerSGD(4)
    assert codecs.parse("powersgd:4") != gradcomp.PowerSGD(4, factor_dtype=torch.float16)
    assert "PowerSGD(rank=4" in repr(c.__class__(4))
    for bad, why in [("powersgd", "needs a rank"), ("powersgd:x", "needs a rank"), ("powersgd:0", "rank must be"),
                     ("powersgd:257", "rank must be"), ("powersgd:4:fp8", "unknown option"),
                     ("powersgd:4:ef=2", "ef='2' is not 0 or 1"), ("powersgd:4:warm=x", "warm='x' is not 0 or 1"),
                     ("powersgd:4:warmup=-1", "warmup='-1' is not a number"), ("powersgd:²", "needs a rank"),
                     ("powersgd:4:fp16:bf16", "sets factor_dtype a second time"), ("powersgd:4:foo=1", "unknown")]:
        with pytest.raises(ValueError, match=why):
            codecs.parse(bad)
    with pytest.raises(ValueError, match="factor_dtype"):
        gradcomp.PowerSGD(4, factor_dtype=torch.int8)


def test_which_parameters_are_matrices():
    c = gradcomp.PowerSGD(4)
    assert c.matrix((64, 64)) == (64, 64)
    assert c.matrix((32, 3, 5, 5)) == (32, 75)  # a convolution: out channels by the rest
    assert c.matrix((8, 3, 5, 5)) is None  # 4 * 83 * 2 = 664 > 600
    assert c.matrix((64,)) is None and c.matrix(()) is None and c.matrix(None) is None
    assert c.matrix((16, 16)) == (16, 16)  # 4 * 32 * 2 = 256 <= 256
    assert c.matrix((15, 16)) is None  # 4 * 31 * 2 = 248 > 240
    assert c.matrix((0, 16)) is None


def test_hierarchy_and_fsdp_are_refused_clearly():
    with pytest.raises(ValueError, match="powersgd does not run hierarchically"):
        gradcomp.State("powersgd:4", ranks_per_node=2)
    gradcomp.State("powersgd:4", ranks_per_node=1)  # the flat exchange
    pytest.importorskip("torch.distributed.fsdp")
    with pytest.raises(ValueError, match="powersgd needs each parameter's whole gradient matrix"):
        gradcomp.fsdp.register(torch.nn.Linear(4, 4), "powersgd:2")


# ---------------------------------------------------------------- all_reduce against the reference


def _check_allreduce(outs, world, rank, steps, seed, **kw):
    """Every rank's outputs, residuals and Q against the reference, step by step."""
    state = {}
    for step in range(steps):
        inputs = [outs[r]["inputs"][step] for r in range(world)]
        expect = ref.powersgd_allreduce(inputs, state, rank, MIN_NUMEL, seed, step, **kw)
        for i, e in enumerate(expect):
            got = [outs[r]["outputs"][step][i] for r in range(world)]
            for r in range(1, world):
                assert_bits_equal(got[r], got[0], f"step {step} tensor {i}: rank {r} differs from rank 0")
            if e is None:
                mean = sum(x[i].float() for x in inputs) / world
                torch.testing.assert_close(got[0].float(), mean, rtol=1e-2, atol=1e-2, equal_nan=True)
            else:
                assert_bits_equal(got[0].reshape(-1), e, f"step {step} tensor {i} differs from the reference")
    for r in range(world):
        if kw.get("error_feedback", True):
            assert sorted(outs[r]["residuals"]) == COMPRESSED
            for i in COMPRESSED:
                assert_bits_equal(outs[r]["residuals"][i], state["e"][(r, i)].reshape(-1), f"rank {r} {i}")
        else:
            assert not outs[r]["residuals"]
        if kw.get("warm_start", True):
            assert sorted(outs[r]["factors"]) == COMPRESSED
            for i in COMPRESSED:
                assert_bits_equal(outs[r]["factors"][i], state["q"][i].reshape(-1))
    return state


@pytest.mark.parametrize("world", [1, 2, pytest.param(3, marks=pytest.mark.slow), 4])
def test_all_reduce_matches_the_reference_bit_for_bit(tmp_path, world):
    steps, seed = 3, 11
    outs = _run(world, tmp_path, shapes=SHAPES, steps=steps, codec="powersgd:2", seed=world,
                state={"min_numel": MIN_NUMEL, "seed": seed, "force_compression": world == 1})
    _check_allreduce(outs, world, 2, steps, seed)
    st = outs[0]["stats"]
    assert st["params_compressed"] == 3 * steps and st["params_fallback"] == 3 * steps
    if world > 1:
        # each step three exact averages (all-to-all + all-gather, 2 (W - 1) chunks of
        # ceil(n / W) floats): the exact tensors (300 + 4098 + 256), P (2 (33 + 7 + 96) + the
        # non-finite flag) and Q (2 (40 + 387 + 64)); a plain all-reduce sends 2 (W - 1) / W of 14827
        sent = sum(2 * (world - 1) * -(-n // world) * 4 for n in (300 + 4098 + 256, 2 * 136 + 1, 2 * 491))
        assert st["bytes_sent"] == steps * sent
        assert st["bytes_uncompressed"] == pytest.approx(steps * 2 * (world - 1) / world * 14827 * 4)


@pytest.mark.parametrize(("codec", "kw"), [("powersgd:3:bf16", {"wire": torch.bfloat16}),
                                           ("powersgd:2:fp16:warm=0", {"wire": torch.float16, "warm_start": False}),
                                           ("powersgd:2:ef=0", {"error_feedback": False})])
def test_options_match_the_reference(tmp_path, codec, kw):
    steps, seed, world = 3, 5, 3
    rank = gradcomp.codecs.parse(codec).rank
    outs = _run(world, tmp_path, shapes=SHAPES, steps=steps, codec=codec,
                state={"min_numel": MIN_NUMEL, "seed": seed})
    _check_allreduce(outs, world, rank, steps, seed, **kw)
    if "warm_start" in kw:
        assert all(not o["factors"] for o in outs)


def test_16bit_tensors_match_the_reference(tmp_path):
    """bfloat16 tensors: the matrices are float32 (tensor + float32 residual), the output is
    rounded once to bfloat16, and the residual keeps what that rounding dropped too."""
    steps, seed, world = 3, 2, 2
    outs = _run(world, tmp_path, shapes=SHAPES, steps=steps, codec="powersgd:2", dtypes=["bfloat16"] * len(SHAPES),
                state={"min_numel": MIN_NUMEL, "seed": seed})
    _check_allreduce(outs, world, 2, steps, seed)
    assert all(o["outputs"][0][0].dtype == torch.bfloat16 for o in outs)


def test_warmup_reduces_exactly_first(tmp_path):
    """warmup=2: steps 0 and 1 are exact averages (no residual, no Q yet), step 2 is the
    reference's first compressed step."""
    outs = _run(2, tmp_path, shapes=SHAPES, steps=3, codec="powersgd:2:warmup=2",
                state={"min_numel": MIN_NUMEL, "seed": 4})
    for step in (0, 1):
        for i in range(len(SHAPES)):
            mean = sum(outs[r]["inputs"][step][i] for r in range(2)) / 2
            torch.testing.assert_close(outs[0]["outputs"][step][i], mean, rtol=1e-6, atol=1e-6)
    state = {}
    expect = ref.powersgd_allreduce([outs[r]["inputs"][2] for r in range(2)], state, 2, MIN_NUMEL, 4, 2)
    for i in COMPRESSED:
        assert_bits_equal(outs[0]["outputs"][2][i].reshape(-1), expect[i])
    assert outs[0]["stats"]["buckets_fallback"] == 2 and outs[0]["stats"]["buckets_compressed"] == 1


def test_error_feedback_running_mean_tracks_the_true_mean(tmp_path):
    """Rank 2 of a 32 x 32 matrix sends 1/8 of each step's average, but with error feedback
    the running sum of the outputs follows the running sum of the true means (its relative
    error falls as the steps go), where without it the error stays."""
    steps, shapes = 40, [[32, 32]]
    errs = {}
    for codec in ("powersgd:2", "powersgd:2:ef=0"):
        outs = _run(3, tmp_path / codec.replace(":", "_"), shapes=shapes, steps=steps, codec=codec, drift=1.0,
                    state={"min_numel": 16})
        for upto in (steps // 4, steps):
            true = sum(sum(outs[r]["inputs"][s][0] for r in range(3)) / 3 for s in range(upto))
            sent = sum(outs[0]["outputs"][s][0] for s in range(upto))
            errs[codec, upto] = float((sent - true).norm() / true.norm())
    assert errs["powersgd:2", steps] < 0.5 * errs["powersgd:2", steps // 4]
    assert errs["powersgd:2:ef=0", steps] > 3 * errs["powersgd:2", steps]
    assert errs["powersgd:2:ef=0", steps] > 0.8 * errs["powersgd:2:ef=0", steps // 4]


@pytest.mark.parametrize(("world", "dcp"), [(2, False), (3, True)])
def test_checkpoint_resumes_bit_for_bit(tmp_path, world, dcp):
    """Saved after 2 of 5 steps and loaded into a fresh State: residuals and Q come back as
    saved, and steps 2-4 are the straight run's, bit for bit."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    common = {"shapes": SHAPES, "steps": 5, "codec": "powersgd:2", "state": {"min_numel": MIN_NUMEL, "seed": 7}}
    straight = _run(world, tmp_path / "straight", **common)
    resumed = _run(world, tmp_path / "resumed", save_at=2, ckpt=str(ckpt), dcp=dcp, **common)
    for r in range(world):
        saved, loaded = resumed[r]["saved"], resumed[r]["loaded"]
        for what in ("residuals", "factors"):
            assert sorted(saved[what]) == COMPRESSED and saved[what].keys() == loaded[what].keys()
            for k, t in saved[what].items():
                assert_bits_equal(loaded[what][k], t, nan_bytes=True)
        for s in range(5):
            for a, b in zip(straight[r]["outputs"][s], resumed[r]["outputs"][s]):
                assert_bits_equal(a, b, f"rank {r} step {s} differs after the resume", nan_bytes=True)


@pytest.mark.parametrize(("value", "index"), [("inf", 2), ("nan", 5), ("-inf", 1)])
def test_non_finite_makes_the_step_nan_everywhere_and_keeps_the_state(tmp_path, value, index):
    """A non-finite value on rank 1 at step 1. In a compressed tensor: every compressed
    tensor is NaN on every rank at that step (a GradScaler skips it), the exact lane stays
    finite, residuals and Q stay as step 0 left them, and step 2 is finite again. In an
    exact tensor: only that tensor's element is non-finite. Bit for bit the reference's."""
    seed, world = 3, 3
    outs = _run(world, tmp_path, shapes=SHAPES, steps=3, codec="powersgd:2", poison=[[1, 1, index, value]],
                state={"min_numel": MIN_NUMEL, "seed": seed})
    for r in range(world):
        for i in COMPRESSED:
            assert torch.isnan(outs[r]["outputs"][1][i]).all() == (index in COMPRESSED)
            assert torch.isfinite(outs[r]["outputs"][1][i]).all() == (index not in COMPRESSED)
            assert torch.isfinite(outs[r]["outputs"][2][i]).all()
        for i in set(range(len(SHAPES))) - set(COMPRESSED):
            finite = torch.isfinite(outs[r]["outputs"][1][i])
            assert finite.all() if i != index else finite.sum() == finite.numel() - 1
        assert all(torch.isfinite(t).all() for t in outs[r]["residuals"].values())
        assert all(torch.isfinite(t).all() for t in outs[r]["factors"].values())
    _check_allreduce(outs, world, 2, 3, seed)


def test_16bit_factors_do_not_overflow_under_warm_start(tmp_path):
    """Gradients of a few hundred with float16 factors and warm start: P = M Q stays at M's
    scale because Q is kept with unit columns (unnormalized, the second step's P would be
    at M's square and overflow float16), so every step is finite, and the reference's."""
    steps, seed, world = 4, 6, 3
    outs = _run(world, tmp_path, shapes=SHAPES, steps=steps, codec="powersgd:2:fp16", scale=200.0,
                state={"min_numel": MIN_NUMEL, "seed": seed})
    for s in range(steps):
        for i in COMPRESSED:
            assert torch.isfinite(outs[0]["outputs"][s][i]).all(), f"step {s} tensor {i}"
    _check_allreduce(outs, world, 2, steps, seed, wire=torch.float16)


def test_ranks_must_compute_alike(tmp_path):
    """PowerSGD's replicas are identical only if every rank's QR and products round alike:
    ranks with different thread counts are refused at the first call, with the reason."""
    res = run_ranks("allreduce", 2, tmp_path, worker=WORKERS["allreduce"], shapes=[[64, 64]], steps=1,
                    codec="powersgd:2", expect_error=True, threads_per_rank={"0": 1, "1": 2}, state={"min_numel": 16})
    assert res.ok, describe(res)
    for o in res.outputs:
        assert "powersgd needs every rank to orthogonalize" in o["error"] and "threads" in o["error"]


def test_low_rank_gradients_come_through_exactly(one_rank_group):
    """Independent of the reference: a gradient of rank <= R is recovered (to rounding) at
    the first step, the residual is then ~0, and a key must keep its shape."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(48, 3, generator=g), torch.randn(3, 36, generator=g)
    x = u @ v  # rank 3
    for rank, ok in ((3, True), (4, True), (2, False)):
        state = gradcomp.State(f"powersgd:{rank}", min_numel=16, force_compression=True)
        y = [x.clone(), torch.randn(5, generator=g)]
        gradcomp.all_reduce(y, state)
        err = float((y[0] - x).norm() / x.norm())
        assert (err < 1e-5) == ok, (rank, err)
        assert (float(state.residuals[0].norm() / x.norm()) < 1e-5) == ok
    with pytest.raises(ValueError, match=r"had shape \[48, 36\] when first reduced, now \[36, 48\]"):
        state.engine.ordinals([(0, x.numel(), x.dtype, (36, 48))])


# ---------------------------------------------------------------- the DDP hook


def test_ddp_several_buckets_match_the_reference(tmp_path):
    """3 ranks, DDP buckets of about two layers (laid out again after the first iteration):
    every rank's averaged gradient is the reference's (keyed by the parameters' ordinals),
    bit for bit on the compressed weights, replicas identical."""
    world, steps, width, layers, seed = 3, 4, 64, 6, 21
    outs = _run(world, tmp_path, scenario="train", steps=steps, codec="powersgd:2", width=width, layers=layers,
                bucket_cap_mb=0.04, state={"seed": seed})
    model = make_model(layers, width)
    shapes = [tuple(p.shape) for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    ordinals = outs[0]["ordinals"]
    by_ordinal = sorted(range(len(shapes)), key=lambda j: ordinals[j])  # parameter index of each ordinal
    state = {}
    for s in range(steps):
        inputs = []
        for r in range(world):
            pieces = outs[r]["local"][s].split(sizes)
            inputs.append([pieces[j].reshape(shapes[j]) for j in by_ordinal])
        expect = ref.powersgd_allreduce(inputs, state, 2, gradcomp.state.DEFAULT_MIN_NUMEL, seed, s)
        got = outs[0]["grads"][s].split(sizes)
        for r in range(1, world):
            assert_bits_equal(outs[r]["grads"][s], outs[0]["grads"][s])
        for o, j in enumerate(by_ordinal):
            if expect[o] is None:
                torch.testing.assert_close(got[j], outs[0]["exact"][s].split(sizes)[j], rtol=1e-5, atol=1e-6)
            else:
                assert_bits_equal(got[j].reshape(-1), expect[o], f"step {s} parameter {j}")
    st = outs[0]["stats"]
    assert st["buckets_compressed"] > steps  # several buckets a step (one of them only biases, at first)
    assert st["params_compressed"] == layers * steps
    for r in range(world):  # the engine's own residuals and Q, keyed by ordinal
        assert sorted(outs[r]["residuals"]) == sorted(o for (rr, o) in state["e"] if rr == r)
        for (rr, o), e in state["e"].items():
            if rr == r:
                assert_bits_equal(outs[r]["residuals"][o], e.reshape(-1), f"rank {r} parameter {o}")


def test_ranks_must_agree_on_the_rank(tmp_path):
    res = run_ranks("train", 2, tmp_path, worker=WORKERS["train"], timeout=60, steps=2, codec="powersgd:2",
                    codec_per_rank={"1": "powersgd:4"})
    assert not res.ok
    assert any("ranks disagree on the State configuration" in log for log in res.logs)
