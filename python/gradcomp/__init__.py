"""gradcomp: gradient compression for PyTorch data-parallel training.

    import gradcomp
    state = gradcomp.register(ddp_model, "int8")   # block-wise int8 with error feedback
    gradcomp.all_reduce(tensors, gradcomp.State("int8"))   # any tensors, e.g. outer steps
    diloco = gradcomp.DiLoCo(model, inner_opt, sync_every=100, codec="int4")   # low-communication training
"""

from __future__ import annotations

from . import _C, fsdp, optim
from .allreduce import all_reduce
from .codecs import Bf16, Codec, Fp16, Int2, Int4, Int8, PowerSGD, RandomK, Sign, TopK
from .diloco import DiLoCo
from .hooks import GradcompError, State, comm_hook, register

__version__ = _C.build_info()["version"]

__all__ = [
    "Bf16", "Codec", "DiLoCo", "Fp16", "GradcompError", "Int2", "Int4", "Int8", "PowerSGD", "RandomK", "Sign", "State",
    "TopK", "all_reduce", "build_info", "comm_hook", "cuda_available", "fsdp", "optim", "register",
]


def build_info() -> dict:
    """How this gradcomp was built: version, cuda_compiled, cuda_version (CUDART_VERSION,
    e.g. 12090 for 12.9), cuda_archs (the architectures really compiled, from nvcc's
    __CUDA_ARCH_LIST__, e.g. "750,800,900"), compiler, cpu_isa; and openmp_runtime: the file
    of the OpenMP runtime the CPU kernels use, the one torch loaded (found at run time, not
    linked; "" if none: the kernels then run on the calling thread)."""
    return dict(_C.build_info())


def cuda_available() -> bool:
    """Whether the CUDA backend can be used now: compiled in, a device visible to it, and a
    CUDA-enabled torch."""
    import torch

    return bool(_C.build_info()["cuda_compiled"]) and _C.cuda_device_count() > 0 and torch.cuda.is_available()
