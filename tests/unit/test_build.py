"""How the installed module was built and what it needs at run time: the GPU code it really
carries, the OpenMP runtime it borrows from torch, and what it says when the NVIDIA driver
cannot run it."""

import os
import re
import shutil
import struct
import subprocess
import sys

import gradcomp
import pytest
import torch
from gradcomp import _C, _fatbin, codecs

MODULE = _C.__file__
BUILD = gradcomp.build_info()


def dynamic_needed(path: str) -> list[str]:
    """DT_NEEDED entries of an ELF file, read by readelf (binutils comes with the compiler)."""
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def loaded_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if "/" in line}


def is_openmp(path: str) -> bool:
    return os.path.basename(path).startswith(("libgomp", "libiomp", "libomp"))


@pytest.mark.skipif(not shutil.which("readelf"), reason="needs readelf (binutils)")
def test_module_links_no_openmp_runtime_and_no_cuda_library():
    needed = dynamic_needed(MODULE)
    assert needed, "readelf found no DT_NEEDED at all"
    assert not [n for n in needed if is_openmp(n)], needed
    # static cudart: nothing of CUDA is needed to import (the driver is dlopen'ed by cudart)
    assert not [n for n in needed if n.startswith(("libcuda", "libcudart"))], needed


THREADS_SCRIPT = r"""
import os, torch, gradcomp
from gradcomp import ops
from gradcomp.engine import layout
torch.set_num_threads(2)
tasks = lambda: len(os.listdir("/proc/self/task"))
before = tasks()
numels = [1 << 20]
bt = layout.build_table(layout.contiguous_spans(numels, 256), 256, 1, 4)
send = ops.quant_encode(torch.randn(numels[0]), bt.table, 1, bt.slots, 256)
after_gradcomp = tasks()
torch.randn(1 << 22).mul_(2).sum()  # an intra-op parallel torch op on the same thread
after_torch = tasks()
print(before, after_gradcomp, after_torch, gradcomp.build_info()["openmp_runtime"])
"""


def test_cpu_kernels_share_the_openmp_runtime_and_threads_torch_uses(tmp_path):
    """gradcomp's kernel starts torch's OpenMP worker (one more thread for a team of 2); the
    torch op after it reuses that worker instead of starting a pool of its own. With a second
    OpenMP runtime in the process the torch op would add threads of its own."""
    r = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before, after_gradcomp, after_torch, runtime = r.stdout.split()
    assert is_openmp(runtime)
    assert int(after_gradcomp) == int(before) + 1, r.stdout
    assert int(after_torch) == int(after_gradcomp), r.stdout


def test_openmp_runtime_is_one_torch_loaded():
    runtime = BUILD["openmp_runtime"]
    openmp_loaded = {os.path.realpath(p) for p in loaded_files() if is_openmp(p)}
    if not openmp_loaded:  # a torch without OpenMP: the kernels run on the calling thread
        assert runtime == ""
        return
    assert os.path.realpath(runtime) in openmp_loaded
    assert len(openmp_loaded) == 1, openmp_loaded


def test_openmp_runtime_is_empty_before_torch_is_imported(tmp_path):
    """Without torch in the process the core finds no runtime (and would run serially); it
    binds once torch has loaded one."""
    code = ("import sys; sys.modules['torch'] = None\n"  # make `import torch` fail inside gradcomp
            "import importlib.util, os\n"
            "spec = importlib.util.find_spec('gradcomp')\n"
            "path = [p for p in os.listdir(spec.submodule_search_locations[0]) if p.startswith('_C.')][0]\n"
            "import importlib.machinery as m\n"
            "loader = m.ExtensionFileLoader('gradcomp._C', os.path.join(spec.submodule_search_locations[0], path))\n"
            "mod = importlib.util.module_from_spec(importlib.util.spec_from_loader('gradcomp._C', loader))\n"
            "loader.exec_module(mod)\n"
            "print(repr(mod.build_info()['openmp_runtime']))\n"
            "del sys.modules['torch']\n"
            "import torch\n"
            "print(mod.build_info()['openmp_runtime'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before, after = r.stdout.splitlines()
    assert before == "''"
    assert is_openmp(after), after  # bound once torch had loaded its runtime


def test_fatbin_entries_match_the_compiled_architecture_list():
    found = _fatbin.entries(MODULE)
    if not BUILD["cuda_compiled"]:
        assert found == [] and BUILD["cuda_archs"] == ""
        return
    # __CUDA_ARCH_LIST__ (what nvcc compiled) against the module's own fat binaries
    archs = {int(a) // 10 for a in BUILD["cuda_archs"].split(",")}
    assert archs and min(archs) >= 75
    cubins = {a for k, a in found if k == "sm"}
    ptx = {a for k, a in found if k == "compute"}
    assert cubins | ptx == archs, (found, BUILD["cuda_archs"])
    # both CUDA translation units carry every architecture
    assert all(sum(1 for k, a in found if (k, a) == entry) % 2 == 0 for entry in set(found)), found
    assert _fatbin.summary(MODULE).startswith(f"sm_{min(cubins)}" if cubins else "PTX")


def handmade_fatbin(entries, header_size=16, fat_size=None):
    """A fat binary as nvcc lays it out: its header, then each entry's 64-byte header and payload."""
    body = b""
    for kind, arch, payload in entries:
        header = struct.pack("<HHIQ", kind, 0x0101, 64, len(payload)) + bytes(12)
        header += struct.pack("<I", arch) + bytes(64 - 32)
        body += header + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, header_size, len(body) if fat_size is None else fat_size) + body


def handmade_module(path, section: bytes) -> str:
    """A minimal ELF64 file: its header, the .nv_fatbin bytes, .shstrtab, three section headers."""
    names = b"\0.nv_fatbin\0.shstrtab\0"
    data_off = 64
    names_off = data_off + len(section)
    sh_off = names_off + len(names)
    elf = bytearray(b"\x7fELF\x02\x01\x01" + bytes(9))
    elf += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 2)
    elf += section + names

    def sh(name, kind, off, size):
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, off, size, 0, 0, 1, 0)

    elf += sh(0, 0, 0, 0) + sh(1, 1, data_off, len(section)) + sh(12, 3, names_off, len(names))
    path.write_bytes(bytes(elf))
    return str(path)


def test_fatbin_reader_on_a_handmade_module(tmp_path):
    """The reader against a fat binary built by hand: two translation units, padding between."""
    section = handmade_fatbin([(2, 75, b"\1" * 40), (2, 90, b"\2" * 8), (1, 90, b"ptx\0")]) + bytes(8)
    section += handmade_fatbin([(2, 75, b"\3" * 16)])
    path = handmade_module(tmp_path / "fake.so", section)
    assert _fatbin.entries(path) == [("sm", 75), ("sm", 90), ("compute", 90), ("sm", 75)]
    assert _fatbin.summary(path) == "sm_75, sm_90 + PTX compute_90"
    (tmp_path / "text.txt").write_text("not elf")
    with pytest.raises(ValueError):
        _fatbin.entries(str(tmp_path / "text.txt"))


def test_fatbin_reader_ends_on_malformed_sections(tmp_path):
    """A header claiming no size, padding of odd length, a size past the section's end: the
    reader moves forward every time and ends, reading what is there."""
    empty_header = handmade_fatbin([], header_size=0, fat_size=0)
    good = handmade_fatbin([(2, 80, b"\4" * 24)])
    path = handmade_module(tmp_path / "a.so", empty_header + bytes(3) + good)
    assert _fatbin.entries(path) == [("sm", 80)]
    path = handmade_module(tmp_path / "b.so", good + handmade_fatbin([(1, 90, b"ptx\0")], fat_size=1 << 40))
    assert _fatbin.entries(path) == [("sm", 80), ("compute", 90)]
    path = handmade_module(tmp_path / "c.so", bytes(5) + struct.pack("<I", 0xBA55ED50))  # a lone magic, cut short
    assert _fatbin.entries(path) == []


@pytest.mark.parametrize("driver,runtime,words", [
    (12040, 13000, ["supports CUDA 12.4", "built with CUDA 13.0", "R580", "Update the driver", "CUDA 12.9"]),
    (11080, 12090, ["supports CUDA 11.8", "built with CUDA 12.9", "R525"]),
    (0, 12090, ["no NVIDIA driver was found", "built with CUDA 12.9", "R525", "CPU backend works"]),
    (0, 13000, ["no NVIDIA driver was found", "R580", "CPU backend works"]),
])
def test_driver_too_old_or_absent_says_so(driver, runtime, words):
    msg = _C._cuda_driver_problem(driver, runtime)
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("driver,runtime", [(12020, 12090), (12090, 12090), (13000, 12090), (13020, 13000)])
def test_driver_of_the_same_major_or_newer_is_enough(driver, runtime):
    """Minor-version compatibility: any driver of the build's CUDA major release runs it."""
    assert _C._cuda_driver_problem(driver, runtime) == ""


def test_missing_kernels_and_ptx_messages_name_the_gpu_and_the_build():
    msg = _C._cuda_arch_problem(7, 0, "750,800")
    assert "compute capability 7.0" in msg and "750,800" in msg and "CMAKE_CUDA_ARCHITECTURES" in msg
    msg = _C._cuda_ptx_problem(12040, 12090, 13, 0, "750,1200")
    assert "compute capability 13.0" in msg and "CUDA 12.9" in msg and "CUDA 12.4" in msg


def test_first_cuda_call_without_a_usable_driver_raises_the_reason():
    """On a machine whose driver cannot run this build (none at all on CPU CI), a CUDA entry
    point stops at the check, before touching any pointer, with the reason."""
    problem = _C.cuda_problem()
    if BUILD["cuda_compiled"] and problem == "":
        pytest.skip("this machine's driver runs the CUDA backend (tests/cuda/test_cuda.py covers it)")
    with pytest.raises(RuntimeError) as e:
        _C.quant_encode_cuda(8, 256, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, False, 0, 0)
    assert problem in str(e.value)
    with pytest.raises(RuntimeError) as e:
        _C.randomk_decode_cuda(0, 0, 0, 0, 1, 0, 0, 0, 0, 0)
    assert problem in str(e.value)
    if BUILD["cuda_compiled"]:
        assert _C.cuda_device_count() == 0 and not gradcomp.cuda_available()


def test_cuda_problem_is_empty_where_torch_runs_cuda():
    if not (BUILD["cuda_compiled"] and torch.cuda.is_available()):
        pytest.skip("needs gradcomp's CUDA backend and a GPU")
    assert _C.cuda_problem() == "" and _C.cuda_driver_version() >= BUILD["cuda_version"] // 1000 * 1000


def test_info_shows_compiled_code_cuda_version_and_openmp_runtime(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gradcomp", "info"], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout
    if BUILD["cuda_compiled"]:
        v = BUILD["cuda_version"]
        assert f"CUDA kernels: built with CUDA {v // 1000}.{v % 1000 // 10}: {_fatbin.summary(MODULE)}" in out
        driver = _C.cuda_driver_version()
        assert ("NVIDIA driver: none found" if driver == 0 else "NVIDIA driver: supports CUDA") in out
        if _C.cuda_problem():
            assert f"gradcomp CUDA backend: no ({_C.cuda_problem()})" in out
    runtime = BUILD["openmp_runtime"]
    assert f"CPU threads: {runtime}" in out if runtime else "CPU threads: the calling thread only" in out


def test_register_of_a_gpu_model_fails_at_once_when_the_cuda_backend_cannot_run(one_rank_group, monkeypatch):
    """gradcomp.register of a DDP model with a parameter on a GPU, where gradcomp's CUDA
    backend cannot run (built without CUDA, no driver or one too old for the build: any CPU
    machine): it raises at registration with the reason and the fix, before it registers a
    hook (the model then takes fp16's). fp16 and bf16 are torch casts: they register wherever
    the model is, as every codec does for a CPU model. This machine may have no GPU: the
    models are real DDP models on one Gloo rank, and the GPU one's ``parameters()`` (all that
    register asks of where the model is) also yields a tensor that says it is on a GPU."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    class OnGpu(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    def gpu_model():
        ddp = DDP(torch.nn.Linear(4, 4))
        params = [*ddp.module.parameters(), torch.zeros(1).as_subclass(OnGpu)]
        monkeypatch.setattr(ddp, "parameters", lambda recurse=True: iter(params))
        assert any(p.is_cuda for p in ddp.parameters())
        return ddp

    codecs_needing_kernels = ("int8", "int4", "sign", "topk:0.01", "randomk:0.01")
    for codec in (*codecs_needing_kernels, "fp16", "bf16"):  # a CPU model: nothing to check
        assert gradcomp.register(DDP(torch.nn.Linear(4, 4)), codec).codec == codecs.parse(codec)
    for codec in ("fp16", "bf16"):  # torch casts: no gradcomp kernels, wherever the model is
        assert gradcomp.register(gpu_model(), codec).codec == codecs.parse(codec)
    problem = _C.cuda_problem()
    for codec in codecs_needing_kernels:
        ddp = gpu_model()
        if not problem:  # this machine runs the CUDA backend: registration goes through
            assert gradcomp.register(ddp, codec).codec == codecs.parse(codec)
            continue
        with pytest.raises(RuntimeError) as e:
            gradcomp.register(ddp, codec)
        assert "the model is on a GPU" in str(e.value) and repr(codec.split(":")[0]) in str(e.value)
        assert problem in str(e.value)
        gradcomp.register(ddp, "fp16")  # the failed registration left the model without a hook
