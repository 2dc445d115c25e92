"""The ``gradcomp`` command.

    gradcomp demo [--world 2] [--methods allreduce,torch-fp16,...,int8,sign] [--epochs 20]
                  [--ranks-per-node L]
        DDP training on the digits dataset once per method (plain all-reduce, torch's fp16
        and PowerSGD hooks, gradcomp's codecs, node:<codec> reduced node by node): a table of
        loss, accuracy, bytes sent per step, compression ratio and step time, and a PNG of the
        loss curves. Spawns its ranks, or runs as one rank under torchrun.
    gradcomp bench kernels [--device cpu|cuda] [--codecs int8,...] [--sizes 1e6,...]
        the fused codec passes against a copy and against torch ops: a table and JSON
    gradcomp bench sparse [--device cpu|cuda]
        top-k / random-k selection against torch.topk: a table and JSON
    gradcomp bench net [--rate 1gbit] [--world 2 | --nodes N --ranks-per-node L] [--methods ...]
        real DDP steps between nodes (network namespaces of L ranks each) joined by veth
        pairs shaped to --rate (root only): step time and bytes between nodes per method
        over the shaped and the unshaped link
    gradcomp bench converge [--tasks lm,mlp] [--methods allreduce,int8,...] [--world 4] [--seeds 0,1]
                            [--steps N]
        training quality: a small transformer language model (AdamW) and the demo's MLP (SGD)
        trained once per method and seed; each method's final held-out loss against plain
        all-reduce's at the same seed, beside the seed-to-seed spread: a table, JSON and a PNG
    gradcomp info
        version, how the core was built, torch, CUDA devices, which backends run here

Each takes --help.
"""

import struct
import sys


def demo(argv) -> int:
    from . import demo as demo_module

    return demo_module.main(argv)


def bench(argv) -> int:
    kinds = ("kernels", "sparse", "net", "converge")
    if not argv or argv[0] not in kinds:
        print(f"usage: gradcomp bench {{{'|'.join(kinds)}}} [options]   (each takes --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "kernels":
        from .benchmarks import kernels as module
    elif argv[0] == "sparse":
        from .benchmarks import sparse as module
    elif argv[0] == "converge":
        from .benchmarks import converge as module
    else:
        from .benchmarks import net as module
    return module.main(argv[1:]) or 0


def info(argv) -> int:
    import torch
    import torch.distributed as dist

    import gradcomp

    print(f"gradcomp {gradcomp.__version__}")
    build = gradcomp.build_info()
    for k, v in build.items():
        print(f"  {k}: {v}")
    from . import _C

    if build["cuda_compiled"]:
        from . import _fatbin

        try:  # what the module really carries, PTX included
            code = _fatbin.summary(_C.__file__) or "none"
        except (OSError, ValueError, struct.error) as e:
            code = f"? ({e})"
        print(f"  CUDA kernels: built with CUDA {cuda_version_name(build['cuda_version'])}: {code}")
        driver = _C.cuda_driver_version()
        print(f"  NVIDIA driver: {'supports CUDA ' + cuda_version_name(driver) if driver else 'none found'}")
    print(f"  CPU threads: {build['openmp_runtime'] or 'the calling thread only (no OpenMP runtime loaded)'}")
    print(f"torch {torch.__version__} (built with CUDA {torch.version.cuda})")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"CUDA devices visible to torch: {gpus}")
    for i in range(gpus):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    print("backends that run here:")
    print("  gradcomp CPU backend: yes")
    if gradcomp.cuda_available():
        cuda = "yes"
    elif not build["cuda_compiled"]:
        cuda = "no (this gradcomp was built without CUDA)"
    elif _C.cuda_problem():
        cuda = f"no ({_C.cuda_problem()})"
    elif torch.version.cuda is None:
        cuda = "no (this torch is a CPU-only build)"
    else:
        cuda = "no (no CUDA device visible)"
    print(f"  gradcomp CUDA backend: {cuda}")
    for name, available in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())):
        print(f"  torch.distributed {name}: {'yes' if available else 'no'}")
    return 0


def cuda_version_name(version: int) -> str:
    """12090 -> "12.9" (CUDART_VERSION and cudaDriverGetVersion's encoding)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": demo, "bench": bench, "info": info}
    if not argv or argv[0] not in commands:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
