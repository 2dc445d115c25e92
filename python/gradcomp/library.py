"""gradcomp's kernels as torch operators: ``torch.ops.gradcomp.*``.

Each pass of the compiled core is registered with ``torch.library`` under the ``gradcomp``
namespace: a schema that says which tensors it writes, a fake (meta) implementation so
FakeTensor, ``torch.compile`` and ``torch.library.opcheck`` can reason about it without
running it, and one kernel per backend (CPU, CUDA) that calls the torch-free core with raw
pointers. No libtorch is linked: the registration is Python's, made when gradcomp is imported.

``gradcomp.ops`` validates arguments, allocates outputs and calls these operators; call them
directly only with arguments ``ops`` would accept (the kernels trust what they are given).
Every operator returns nothing and writes the tensors marked ``(a!)`` in its schema:

    quant_encode(bucket, table, out!, world, slots, block, bits, dtype codes, rounding)
    quant_reduce(recv, my_rows, out!, ...)            quant_decode(gathered, table, bucket!, ...)
    topk_encode(bucket, table, out!, ...)             topk_decode(gathered, table, bucket!, status!, ...)
    randomk_encode(bucket, table, out!, ...)          randomk_decode(reduced, table, bucket!, ...)

Error feedback: the encoders (and quant_reduce) also update the residuals whose addresses the
table's rows hold. Those residuals are not arguments, so the schema cannot name them: to the
dispatcher and to a compiler they are memory no graph sees, written when the operator runs.
Compiled code must therefore use each operator's output (an unused output lets a compiler
drop the call, and the residual update with it), and must not read the residuals itself.

Seeds and steps are unsigned 64-bit counters; a schema's ``int`` is signed, so they travel as
their two's-complement int64 and are read back here (``_u64``).
"""

from __future__ import annotations

import torch

from . import _C

NAMESPACE = "gradcomp"
_U64 = 1 << 64

# name -> schema. The dtype codes are ops.DTYPE_CODES (0 float32, 1 float16, 2 bfloat16).
SCHEMAS = {
    "quant_encode": "quant_encode(Tensor bucket, Tensor table, Tensor(a!) out, int world, int slots, int block, "
                    "int bits, int dtype, int residual_dtype, int seed, int step, int rank, bool stochastic) -> ()",
    "quant_reduce": "quant_reduce(Tensor recv, Tensor my_rows, Tensor(a!) out, int world, int slots, int block, "
                    "int bits, int residual_dtype, int seed, int step, int rank, bool stochastic) -> ()",
    "quant_decode": "quant_decode(Tensor gathered, Tensor table, Tensor(a!) bucket, int world, int slots, int block, "
                    "int bits, int dtype) -> ()",
    "topk_encode": "topk_encode(Tensor bucket, Tensor table, Tensor(a!) out, int pairs, bool approx, int dtype, "
                   "int wire, int tiles) -> ()",
    "topk_decode": "topk_decode(Tensor gathered, Tensor table, Tensor(a!) bucket, Tensor(b!) status, int pairs, "
                   "int world, int dtype, int wire) -> ()",
    "randomk_encode": "randomk_encode(Tensor bucket, Tensor table, Tensor(a!) out, int pairs, int dtype, int seed, "
                      "int step) -> ()",
    "randomk_decode": "randomk_decode(Tensor reduced, Tensor table, Tensor(a!) bucket, int world, int dtype, "
                      "int seed, int step) -> ()",
}


def as_i64(v: int) -> int:
    """An unsigned 64-bit counter as the int64 a schema carries."""
    return v - _U64 if v >= 1 << 63 else v


def _u64(v: int) -> int:
    return v % _U64


_cuda_compiled: bool | None = None


def _cuda(name: str, device: torch.device, *args) -> None:
    """Runs ``_C.<name>_cuda`` on ``device``'s current stream (torch's, read at each call)."""
    global _cuda_compiled
    if _cuda_compiled is None:
        _cuda_compiled = bool(_C.build_info()["cuda_compiled"])
    if not _cuda_compiled:
        raise RuntimeError("gradcomp was built without CUDA; CUDA tensors cannot be encoded")
    fn = getattr(_C, name + "_cuda")
    stream = torch.cuda.current_stream(device).cuda_stream
    if torch.cuda.current_device() == device.index:
        fn(*args, device.index, stream)
    else:  # torch's guard restores the caller's device afterwards
        with torch.cuda.device(device):
            fn(*args, device.index, stream)


def _threads() -> int:
    return torch.get_num_threads()


# ---------------------------------------------------------------- kernels, one per backend
# Shapes (ops.py's module docstring): bucket [n]; table [W * S, 4] or [P, 8] int64; payloads uint8.

def _quant_encode_args(bucket, table, out, world, slots, block, bits, dtype, residual_dtype, seed, step, rank,
                       stochastic):
    return (bits, block, dtype, residual_dtype, bucket.data_ptr(), table.data_ptr(), world, slots, out.data_ptr(),
            _u64(seed), _u64(step), rank, stochastic)


def _quant_encode_cpu(*a):
    _C.quant_encode_cpu(*_quant_encode_args(*a), _threads())


def _quant_encode_cuda(*a):
    _cuda("quant_encode", a[0].device, *_quant_encode_args(*a))


def _quant_reduce_args(recv, my_rows, out, world, slots, block, bits, residual_dtype, seed, step, rank, stochastic):
    return (bits, block, residual_dtype, recv.data_ptr(), my_rows.data_ptr(), world, slots, out.data_ptr(),
            _u64(seed), _u64(step), rank, stochastic)


def _quant_reduce_cpu(*a):
    _C.quant_reduce_cpu(*_quant_reduce_args(*a), _threads())


def _quant_reduce_cuda(*a):
    _cuda("quant_reduce", a[0].device, *_quant_reduce_args(*a))


def _quant_decode_args(gathered, table, bucket, world, slots, block, bits, dtype):
    return (bits, block, dtype, gathered.data_ptr(), table.data_ptr(), world, slots, bucket.data_ptr())


def _quant_decode_cpu(*a):
    _C.quant_decode_cpu(*_quant_decode_args(*a), _threads())


def _quant_decode_cuda(*a):
    _cuda("quant_decode", a[0].device, *_quant_decode_args(*a))


def _topk_encode_cpu(bucket, table, out, pairs, approx, dtype, wire, tiles):
    _C.topk_encode_cpu(dtype, wire, approx, bucket.data_ptr(), table.data_ptr(), table.shape[0], pairs,
                       out.data_ptr(), _threads())


def _topk_encode_cuda(bucket, table, out, pairs, approx, dtype, wire, tiles):
    rows = table.shape[0]
    ws = torch.empty(int(_C.topk_workspace_bytes(rows, tiles)), dtype=torch.uint8, device=bucket.device)
    _cuda("topk_encode", bucket.device, dtype, wire, approx, bucket.data_ptr(), table.data_ptr(), rows, tiles, pairs,
          out.data_ptr(), ws.data_ptr())


def _topk_decode_cpu(gathered, table, bucket, status, pairs, world, dtype, wire):
    rejected = _C.topk_decode_cpu(dtype, wire, gathered.data_ptr(), table.data_ptr(), table.shape[0], pairs, world,
                                  bucket.data_ptr(), _threads())
    status.zero_()
    status[0] = rejected


def _topk_decode_cuda(gathered, table, bucket, status, pairs, world, dtype, wire):
    status.zero_()  # [rejected, wrote NaN], counted by the kernel
    scratch = (torch.empty(bucket.numel(), dtype=torch.float32, device=bucket.device)
               if bucket.dtype != torch.float32 else None)
    _cuda("topk_decode", bucket.device, dtype, wire, gathered.data_ptr(), table.data_ptr(), table.shape[0], pairs,
          world, bucket.data_ptr(), scratch.data_ptr() if scratch is not None else 0, status.data_ptr())


def _randomk_encode_args(bucket, table, out, pairs, dtype, seed, step):
    return (dtype, bucket.data_ptr(), table.data_ptr(), table.shape[0], pairs, _u64(seed), _u64(step), out.data_ptr())


def _randomk_encode_cpu(*a):
    _C.randomk_encode_cpu(*_randomk_encode_args(*a), _threads())


def _randomk_encode_cuda(*a):
    _cuda("randomk_encode", a[0].device, *_randomk_encode_args(*a))


def _randomk_decode_args(reduced, table, bucket, world, dtype, seed, step):
    return (dtype, reduced.data_ptr(), table.data_ptr(), table.shape[0], world, _u64(seed), _u64(step),
            bucket.data_ptr())


def _randomk_decode_cpu(*a):
    _C.randomk_decode_cpu(*_randomk_decode_args(*a), _threads())


def _randomk_decode_cuda(*a):
    _cuda("randomk_decode", a[0].device, *_randomk_decode_args(*a))


KERNELS = {
    "quant_encode": (_quant_encode_cpu, _quant_encode_cuda),
    "quant_reduce": (_quant_reduce_cpu, _quant_reduce_cuda),
    "quant_decode": (_quant_decode_cpu, _quant_decode_cuda),
    "topk_encode": (_topk_encode_cpu, _topk_encode_cuda),
    "topk_decode": (_topk_decode_cpu, _topk_decode_cuda),
    "randomk_encode": (_randomk_encode_cpu, _randomk_encode_cuda),
    "randomk_decode": (_randomk_decode_cpu, _randomk_decode_cuda),
}


def _fake(*args, **kwargs):
    """Every operator only writes tensors it was given: nothing to allocate, nothing returned."""
    return None


def _register() -> torch.library.Library:
    lib = torch.library.Library(NAMESPACE, "DEF")
    register_fake = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract  # torch < 2.4
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        cpu, cuda = KERNELS[name]
        lib.impl(name, cpu, "CPU")
        lib.impl(name, cuda, "CUDA")
        register_fake(f"{NAMESPACE}::{name}", _fake, lib=lib)
    return lib


# Kept alive for the process: dropping the Library object would unregister the operators.
_LIBRARY = _register()
