"""Codec classes and the spec grammar: NAME[:OPTION...], e.g. "int8", "int4:block=512",
"sign:block=1024", "int2:ef=0", "int4:stochastic", "int8:residual=bf16", "powersgd:4", "powersgd:16:bf16:warmup=100"."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

__all__ = ["Codec", "BlockQuantizer", "Cast", "Int8", "Int4", "Int2", "Sign", "Fp16", "Bf16", "Sparsifier", "TopK",
           "RandomK", "PowerSGD", "parse", "VALID_SPECS"]

VALID_SPECS = ("int8", "int4", "int2", "sign", "<int8|int4|int2|sign>:block=<32..4096, power of two>",
               "<int8|int4|int2|sign>:ef=<0|1>", "<int8|int4|int2|sign>:residual=<fp32|bf16>",
               "<int8|int4|int2>:stochastic", "fp16", "bf16", "topk:<ratio>", "topk:<ratio>:approx",
               "topk:<ratio>:<fp32|fp16|bf16>", "<topk|randomk>:<ratio>:ef=<0|1>", "randomk:<ratio>",
               "powersgd:<rank 1..256>", "powersgd:<rank>:<fp32|fp16|bf16>", "powersgd:<rank>:ef=<0|1>",
               "powersgd:<rank>:warm=<0|1>", "powersgd:<rank>:warmup=<steps>")

_RESIDUAL_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}

# The block sizes the compiled core takes (codec.h's kMinBlock .. kMaxBlock, powers of two).
# The grammar needs no kernels, so the range is written here; ops checks it against the
# core's constants when it loads, so the two cannot drift apart.
BLOCK_SIZES = tuple(1 << k for k in range(5, 13))  # 32 .. 4096


class Codec:
    """Base class: a codec says which dtypes it takes and describes itself for config checks."""

    name = "codec"
    bits = 0
    dtypes: tuple = ()

    def config(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "codec")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Codec) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config().items())))


class BlockQuantizer(Codec):
    """Block-wise quantization with an fp32 scale per block (the base of Int8, Int4, Int2, Sign).

    Args:
        block_size: values per block, a power of two from 32 to 4096. Smaller blocks track
            local magnitudes better; each block costs 4 bytes of scale (32 bits per block:
            0.125 bits per value at 256).
        error_feedback: keep what quantization dropped (per parameter, on each rank) and add
            it to the next step's gradient, so the running sum of transmitted gradients
            tracks the true one.
        stochastic: round each code up or down at random, with the probabilities that make
            it unbiased (E[code] = value / scale), instead of to nearest. The draws come from
            a counter-based hash of (seed, rank, pass, step, parameter, offset): reproducible,
            independent across ranks, the same on CPU and CUDA. Not for Sign.
        residual_dtype: ``torch.float32`` (default) or ``torch.bfloat16``, the error-feedback
            buffer's element type. bfloat16 halves its memory and rounds what it carries to
            8 significant bits.

    Memory on each rank, per element of a compressed parameter: 4 bytes of residual with
    error feedback in float32, 2 in bfloat16, none without error feedback (plus the payload
    buffers of the bucket in flight: about 3 · (bits/8 + 4/block_size) bytes per value).

    On the wire: ``bits + 32 / block_size`` bits per value, plus 16 bytes per shard.
    """

    bits = 0
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, block_size: int = 256, error_feedback: bool = True, stochastic: bool = False,
                 residual_dtype: torch.dtype = torch.float32):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
            raise ValueError(f"gradcomp: block_size must be a power of two in [32, 4096], got {block_size!r}")
        if isinstance(residual_dtype, str):  # "fp32" / "bf16", as config() and the spec name them
            residual_dtype = {v: k for k, v in _RESIDUAL_NAMES.items()}.get(residual_dtype, residual_dtype)
        if residual_dtype not in _RESIDUAL_NAMES:
            raise ValueError(f"gradcomp: residual_dtype must be torch.float32 or torch.bfloat16, "
                             f"got {residual_dtype!r}")
        if stochastic and self.bits == 1:
            raise ValueError("gradcomp: Sign has no stochastic rounding (its codes are signs; "
                             "use error feedback)")
        self.block_size = block_size
        self.error_feedback = bool(error_feedback)
        self.stochastic = bool(stochastic)
        self.residual_dtype = residual_dtype

    def config(self) -> dict:
        return {"codec": self.name, "block_size": self.block_size, "error_feedback": self.error_feedback,
                "stochastic": self.stochastic, "residual_dtype": _RESIDUAL_NAMES[self.residual_dtype]}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(block_size={self.block_size}, error_feedback={self.error_feedback}, "
                f"stochastic={self.stochastic}, residual_dtype={self.residual_dtype})")

    def __setstate__(self, d):  # objects pickled before stochastic / residual_dtype existed
        self.__dict__.update({"stochastic": False, "residual_dtype": torch.float32, **d})


class Int8(BlockQuantizer):
    """Symmetric absmax quantization to int8 codes in [-127, 127]: scale = absmax / 127."""

    name = "int8"
    bits = 8


class Int4(BlockQuantizer):
    """Symmetric absmax quantization to 4-bit codes in [-7, 7], two per byte."""

    name = "int4"
    bits = 4


class Int2(BlockQuantizer):
    """Symmetric absmax quantization to 2-bit codes in {-1, 0, 1} (scale = absmax), four per byte."""

    name = "int2"
    bits = 2


class Sign(BlockQuantizer):
    """Scaled sign (EF-signSGD, 1-bit Adam): one bit per value, -scale for a < 0 and +scale
    otherwise, scale = the block's mean ``|a|`` (summed exactly, so every backend agrees). Use it
    with error feedback: alone, the sign is a biased estimate."""

    name = "sign"
    bits = 1


class Cast(Codec):
    """Cast, all-reduce, cast back (PyTorch's fp16/bf16 hooks, also on Gloo). A float32
    bucket is divided by the world size in float32 before the cast (in one pass), all-reduced
    in ``wire_dtype`` and cast back; buckets of any other dtype are reduced as they are. Every
    parameter of a float32 bucket is cast: ``min_numel`` does not apply. No error feedback:
    the cast error is not carried."""

    wire_dtype = torch.float16
    dtypes = (torch.float32,)
    error_feedback = False

    def config(self) -> dict:
        return {"codec": self.name}


class Fp16(Cast):
    """Gradients travel as float16 (2 bytes a value; 2x fewer than float32). The wire carries
    x / W, whose partial sums never exceed the largest ``|x|`` of any rank: nothing overflows
    while every rank's gradient is within 65504; beyond that a value may become Inf (and
    GradScaler skips the step)."""

    name = "fp16"
    wire_dtype = torch.float16


class Bf16(Cast):
    """Gradients travel as bfloat16 (float32's range, 8 bits of precision, 2x fewer bytes)."""

    name = "bf16"
    wire_dtype = torch.bfloat16


class Exact(Cast):
    """No compression: every tensor takes the engine's exact lane (each rank's values divided
    by W, summed in rank order in float32, or in the tensor's dtype if wider). Not a spec name:
    what ``gradcomp.DiLoCo(codec=None)`` runs on."""

    name = "exact"
    dtypes = ()  # a Cast codec casts the dtypes it takes: none


class Sparsifier(Codec):
    """Base of TopK and RandomK: each rank sends, for every compressed parameter of n values,
    exactly k = ceil(ratio · n) of them (at least 1), so payload sizes depend only on the
    parameter sizes. Error feedback keeps everything not sent, per parameter, in float32."""

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    residual_dtype = torch.float32
    value_dtype = torch.float32

    def __init__(self, ratio: float, error_feedback: bool = True):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"gradcomp: ratio must be a number in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)
        self.error_feedback = bool(error_feedback)

    def pairs(self, numel: int) -> int:
        """k for a parameter of ``numel`` values."""
        return pairs_for(numel, self.ratio)


class TopK(Sparsifier):
    """Top-k sparsification with error feedback (DGC, per parameter): each rank sends the k
    values of largest ``|gradient + residual|`` of every compressed parameter as (int32 index,
    value) pairs; the payloads are all-gathered and summed rank by rank. Ties go to the
    lowest index; a NaN or Inf counts as larger than every finite value, and the bucket is
    then non-finite on every rank.

    Args:
        ratio: the fraction of each parameter's values sent, in (0, 1].
        approx: take the threshold from a 1% sample (as DGC does) and select among the values
            above it: on CPU one pass over the gradient fewer (the CUDA kernels still run every
            radix pass, so it saves nothing there yet). Still exactly k pairs, and the exact
            top-k whenever at least k values clear the sampled threshold (set 1.5x lower than
            the sample suggests, so that nearly always); otherwise those and then the
            lowest-indexed others (recall >= their count / k).
        value_dtype: the values' type on the wire: torch.float32, float16 or bfloat16 (finite
            values saturate to its range; the residual keeps what the cast dropped).
        error_feedback: keep what was not sent and add it to the next step's gradient.

    On the wire per rank and parameter: k · (4 + value bytes) bytes (W - 1 payloads sent per
    rank by a ring all-gather), so it pays while W · k · (4 + value bytes) stays below the
    dense int8 exchange (about 2 bytes a value): ``State.stats`` counts the buckets where it
    does not. Memory: 4 bytes of residual per compressed value with error feedback.
    """

    name = "topk"

    def __init__(self, ratio: float, approx: bool = False, value_dtype: torch.dtype = torch.float32,
                 error_feedback: bool = True):
        super().__init__(ratio, error_feedback)
        if isinstance(value_dtype, str):
            value_dtype = {v: k for k, v in _VALUE_NAMES.items()}.get(value_dtype, value_dtype)
        if value_dtype not in _VALUE_NAMES:
            raise ValueError(f"gradcomp: value_dtype must be torch.float32, float16 or bfloat16, got {value_dtype!r}")
        self.approx = bool(approx)
        self.value_dtype = value_dtype

    def config(self) -> dict:
        return {"codec": self.name, "ratio": self.ratio, "approx": self.approx,
                "value_dtype": _VALUE_NAMES[self.value_dtype], "error_feedback": self.error_feedback}

    def __repr__(self) -> str:
        return (f"TopK(ratio={self.ratio!r}, approx={self.approx}, value_dtype={self.value_dtype}, "
                f"error_feedback={self.error_feedback})")


class RandomK(Sparsifier):
    """Random-k sparsification with error feedback: every rank draws the same k indices of
    each compressed parameter (one uniformly from each of k equal strata, from the State's
    seed, the step and the parameter), so only the values travel, all-reduced: bytes
    independent of the world size. float32 values.

    Args:
        ratio: the fraction of each parameter's values sent, in (0, 1].
        error_feedback: keep what was not sent and add it to the next step's gradient.
    """

    name = "randomk"

    def config(self) -> dict:
        return {"codec": self.name, "ratio": self.ratio, "error_feedback": self.error_feedback}

    def __repr__(self) -> str:
        return f"RandomK(ratio={self.ratio!r}, error_feedback={self.error_feedback})"


_VALUE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class PowerSGD(Codec):
    """Low-rank compression (PowerSGD, Vogels et al. 2019): each compressed parameter's
    gradient, seen as an n × m matrix M (its first dimension by the rest), is sent as two
    thin factors, P = M Q (n × R) and Q = Mᵀ P (m × R), with one power iteration a step.

    Per parameter and rank, every step: M = gradient + residual; P = M Q with Q warm-started
    from the previous step (the same on every rank); the P of every rank are averaged (in rank
    order, exactly: docs/design.md, "Low rank"); P is orthogonalized (Householder QR, the same
    bits on every rank since every rank holds the same P); Q = Mᵀ P, averaged; the parameter's
    average is P Qᵀ on every rank, and the residual keeps M − P Qᵀ. The two averages of a
    buffer are issued in a fixed order by the State's worker (Gloo) or side stream (NCCL), so
    any number of DDP buckets works, replicas stay bit-identical, and per-rank checkpoints
    (residuals and Q) resume bit for bit.

    A parameter is compressed when it has two dimensions or more, at least ``min_numel``
    elements, and R (n + m) ≤ n m / 2 (at least 2x fewer values); vectors (biases, norms) and
    other small parameters are averaged exactly.

    Args:
        rank: R, the factors' columns, 1 to 256. Bytes per compressed parameter and rank: a
            ring all-reduce of R (n + m) values, against n m uncompressed.
        error_feedback: keep M − P Qᵀ and add it to the next step's gradient (PowerSGD needs
            it: without it, the low-rank estimate is biased).
        warm_start: start each step's power iteration from the previous step's Q (default); off,
            Q is drawn anew every step from (seed, step, parameter).
        factor_dtype: the factors' type on the wire: torch.float32 (default), float16 or
            bfloat16 (half the bytes; the matrix products stay in float32).
        warmup: steps of exact all-reduce before the first compressed one (torch's
            ``start_powerSGD_iter``), carried by the spec; the State compresses from step
            max(start_step, warmup).

    Memory on each rank, per compressed n × m parameter: 4 n m bytes of residual (error
    feedback) and 4 m R of Q, plus the factors of the buffer in flight.
    """

    name = "powersgd"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    residual_dtype = torch.float32
    min_rate = 2  # compress a matrix only if its factors are at least this many times smaller

    def __init__(self, rank: int = 4, error_feedback: bool = True, warm_start: bool = True,
                 factor_dtype: torch.dtype = torch.float32, warmup: int = 0):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 256:
            raise ValueError(f"gradcomp: rank must be an int in [1, 256], got {rank!r}")
        if isinstance(factor_dtype, str):
            factor_dtype = {v: k for k, v in _VALUE_NAMES.items()}.get(factor_dtype, factor_dtype)
        if factor_dtype not in _VALUE_NAMES:
            raise ValueError(f"gradcomp: factor_dtype must be torch.float32, float16 or bfloat16, got {factor_dtype!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"gradcomp: warmup must be a non-negative int, got {warmup!r}")
        self.rank = rank
        self.error_feedback = bool(error_feedback)
        self.warm_start = bool(warm_start)
        self.factor_dtype = factor_dtype
        self.warmup = warmup

    def matrix(self, shape) -> tuple[int, int] | None:
        """(n, m), the matrix a parameter of ``shape`` is compressed as, or None when it is
        not (fewer than two dimensions, or factors not ``min_rate`` times smaller)."""
        if shape is None or len(shape) < 2:
            return None
        n = int(shape[0])
        m = 1
        for d in shape[1:]:
            m *= int(d)
        if n == 0 or m == 0 or self.rank * (n + m) * self.min_rate > n * m:
            return None
        return n, m

    def config(self) -> dict:
        return {"codec": self.name, "rank": self.rank, "error_feedback": self.error_feedback,
                "warm_start": self.warm_start, "factor_dtype": _VALUE_NAMES[self.factor_dtype], "warmup": self.warmup}

    def __repr__(self) -> str:
        return (f"PowerSGD(rank={self.rank}, error_feedback={self.error_feedback}, warm_start={self.warm_start}, "
                f"factor_dtype={self.factor_dtype}, warmup={self.warmup})")


_CODECS = {c.name: c for c in (Int8, Int4, Int2, Sign, Fp16, Bf16, TopK, RandomK, PowerSGD)}


def _parse_powersgd(spec, opts: list[str]) -> Codec:
    if not opts or not (opts[0].isascii() and opts[0].isdigit()):
        raise _bad_spec(spec, "powersgd needs a rank, e.g. powersgd:4")
    kwargs = {"rank": int(opts[0])}
    for opt in opts[1:]:
        key, eq, value = opt.partition("=")
        if not eq and opt in ("fp32", "fp16", "bf16"):
            name = "factor_dtype"
        elif key in ("ef", "warm"):
            if value not in ("0", "1"):
                raise _bad_spec(spec, f"{key}={value!r} is not 0 or 1")
            name = "error_feedback" if key == "ef" else "warm_start"
        elif key == "warmup":
            if not (value.isascii() and value.isdigit()):
                raise _bad_spec(spec, f"warmup={value!r} is not a number of steps")
            name = "warmup"
        else:
            raise _bad_spec(spec, f"unknown option {opt!r} for powersgd")
        if name in kwargs:
            raise _bad_spec(spec, f"{opt!r} sets {name} a second time")
        kwargs[name] = opt if name == "factor_dtype" else int(value) if name == "warmup" else value == "1"
    try:
        return PowerSGD(**kwargs)
    except ValueError as e:
        raise _bad_spec(spec, str(e)) from None


def _parse_sparse(spec, name: str, opts: list[str]) -> Codec:
    if not opts:
        raise _bad_spec(spec, f"{name} needs a ratio, e.g. {name}:0.01")
    try:
        ratio = float(opts[0])
    except ValueError:
        raise _bad_spec(spec, f"ratio {opts[0]!r} is not a number") from None
    kwargs = {}
    for opt in opts[1:]:
        if name == "topk" and opt == "approx":
            kwargs["approx"] = True
        elif name == "topk" and opt in ("fp32", "fp16", "bf16"):
            kwargs["value_dtype"] = {v: k for k, v in _VALUE_NAMES.items()}[opt]
        elif opt in ("ef=0", "ef=1"):
            kwargs["error_feedback"] = opt == "ef=1"
        else:
            raise _bad_spec(spec, f"unknown option {opt!r} for {name}")
    try:
        return _CODECS[name](ratio, **kwargs)
    except ValueError as e:
        raise _bad_spec(spec, str(e)) from None


def _bad_spec(spec, why: str) -> ValueError:
    return ValueError(f"gradcomp: bad codec spec {spec!r} ({why}); valid specs: {', '.join(VALID_SPECS)}")


def parse(spec) -> Codec:
    """A Codec from a Codec (returned as is) or a spec string such as "int8:block=512"."""
    if isinstance(spec, Codec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"gradcomp: codec must be a spec string or a gradcomp Codec, got {type(spec).__name__}")
    name, *opts = spec.strip().lower().split(":")
    if name not in _CODECS:
        raise _bad_spec(spec, f"unknown codec {name!r}")
    if issubclass(_CODECS[name], Sparsifier):
        return _parse_sparse(spec, name, opts)
    if name == "powersgd":
        return _parse_powersgd(spec, opts)
    if opts and issubclass(_CODECS[name], Cast):
        raise _bad_spec(spec, f"{name} takes no options")
    kwargs = {}
    for opt in opts:
        if opt == "stochastic":
            kwargs["stochastic"] = True
            continue
        key, eq, value = opt.partition("=")
        if not eq:
            raise _bad_spec(spec, f"option {opt!r} is not key=value or 'stochastic'")
        if key == "block":
            if not value.isdigit():
                raise _bad_spec(spec, f"block={value!r} is not an integer")
            kwargs["block_size"] = int(value)
        elif key == "ef":
            if value not in ("0", "1"):
                raise _bad_spec(spec, f"ef={value!r} is not 0 or 1")
            kwargs["error_feedback"] = value == "1"
        elif key == "residual":
            dtypes = {v: k for k, v in _RESIDUAL_NAMES.items()}
            if value not in dtypes:
                raise _bad_spec(spec, f"residual={value!r} is not fp32 or bf16")
            kwargs["residual_dtype"] = dtypes[value]
        else:
            raise _bad_spec(spec, f"unknown option {key!r}")
    try:
        return _CODECS[name](**kwargs)
    except ValueError as e:
        raise _bad_spec(spec, str(e)) from None


def pairs_for(numel: int, ratio) -> int:
    """k = ceil(ratio · numel), at least 1 and at most numel, with ``ratio`` read as the
    decimal it was written as (0.01 · 300 is 3, not 4 as float arithmetic would round up)."""
    if numel <= 0:
        return 0
    k = math.ceil(Fraction(repr(float(ratio))) * numel)
    return min(max(k, 1), numel)
