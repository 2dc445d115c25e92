"""The CUDA backend on the CPU: builds csrc/cuda/*.cu for the host through the emulation of
CUDA's execution model in csrc/emu (docs/emulator.md), under AddressSanitizer and
UndefinedBehaviorSanitizer, and runs its entry points in that process (an ASan build cannot
be loaded into a plain Python).

``build()`` compiles the same kernel sources the wheel's CUDA build compiles, with the host
compiler and the real build's pinned floating point, caching objects by content under
build/emulator. ``Emulator`` talks to the process (csrc/emu/server.cpp says the wire
format); ``EmulatedCuda`` mirrors the ``gradcomp.ops`` entry points on it: its "device
memory" is host tensors, each placed at an address of its own, which is what the tables'
residual addresses name.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
from gradcomp import ops

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests/support/emulator.py
CSRC = ROOT / "csrc"
CACHE = ROOT / "build" / "emulator"
SOURCES = ("cuda/quant.cu", "cuda/sparse.cu", "cuda/driver.cpp", "emu/runtime.cpp", "emu/server.cpp",
           "emu/selftest.cpp")
# The real build's floating point (CMakeLists.txt: no contraction, no fast-math), and the sanitizers.
FLAGS = ("-std=c++17", "-O0", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off", "-fno-fast-math",
         "-fno-math-errno", "-fno-trapping-math", "-fsanitize=address,undefined,float-cast-overflow",
         "-fno-sanitize-recover=all", "-Wall", "-Wno-unknown-pragmas")
SANITIZER_ENV = {
    # leaks: the process exits with _Exit when its caller hangs up; nothing to learn there
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
MAGIC = 0x31454347
POISON_EMU = 0xA5  # outputs start as this in the emulator, as 0x5A on the CPU: unwritten bytes differ


class EmulatorCrash(AssertionError):
    """The emulated process died: a sanitizer report, or the emulator's own check."""


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("the CUDA emulator needs a C++ compiler (g++ or clang++); none is on PATH")
    return cxx


def _headers(csrc: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(csrc.rglob("*.h")) + sorted(csrc.rglob("*.cuh")))


def build(csrc: Path = CSRC, cache: Path = CACHE) -> Path:
    """The emulator executable built from ``csrc`` (objects cached by their sources' content)."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    common = hashlib.sha256((version + " ".join(FLAGS)).encode() + _headers(csrc)).hexdigest()
    (cache / "obj").mkdir(parents=True, exist_ok=True)
    objects, jobs = [], []
    for src in SOURCES:
        path = csrc / src
        key = hashlib.sha256(common.encode() + src.encode() + path.read_bytes()).hexdigest()[:24]
        obj = cache / "obj" / f"{Path(src).name}-{key}.o"
        objects.append(obj)
        if obj.exists():
            continue
        tmp = obj.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # builds may run side by side
        lang = ["-x", "c++"] if src.endswith(".cu") else []
        cmd = [cxx, *FLAGS, f"-I{csrc / 'emu'}", f"-I{csrc}", *lang, "-c", str(path), "-o", str(tmp)]
        jobs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), tmp, obj))
    errors = []
    for proc, tmp, obj in jobs:
        out, _ = proc.communicate()
        if proc.returncode:
            errors.append(out)
        else:
            os.replace(tmp, obj)
    if errors:
        raise RuntimeError("building the CUDA emulator failed:\n" + "\n".join(errors)[-8000:])
    exe = cache / "bin" / hashlib.sha256("".join(o.name for o in objects).encode()).hexdigest()[:24] / "gradcomp-emu"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        link = subprocess.run([cxx, "-fsanitize=address,undefined,float-cast-overflow", *map(str, objects), "-o",
                               str(tmp)], capture_output=True, text=True)
        if link.returncode:
            raise RuntimeError("linking the CUDA emulator failed:\n" + link.stdout + link.stderr)
        os.replace(tmp, exe)
    for path in (*objects, exe):
        os.utime(path)
    _prune(cache)
    return exe


def _prune(cache: Path, keep_objects: int = 48, keep_executables: int = 16) -> None:
    """Drops the least recently used objects and executables past the counts (a source
    change makes new ones; a mutation run makes one object and one executable per mutant)."""
    for pattern, keep in (("obj/*.o", keep_objects), ("bin/*/gradcomp-emu", keep_executables)):
        paths = sorted(cache.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in paths[keep:]:
            try:
                old.unlink()
                if old.parent.name != "obj":
                    old.parent.rmdir()
            except OSError:  # another run's, in use or gone
                pass


class Emulator:
    """One emulator process; restarted after a crash. A call that gets no reply within
    ``timeout`` seconds (GRADCOMP_EMULATOR_TIMEOUT, default 600: a kernel spinning on a value
    another thread never writes, which a GPU would hang on too) kills it."""

    def __init__(self, exe: Path, timeout: float | None = None):
        self.exe = Path(exe)
        self.timeout = float(timeout or os.environ.get("GRADCOMP_EMULATOR_TIMEOUT", 600))
        self._proc = None
        self._stderr = None

    def _start(self):
        self._stderr = tempfile.TemporaryFile()
        env = {**os.environ, **SANITIZER_ENV}
        self._proc = subprocess.Popen([str(self.exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, env=env, bufsize=0)

    def close(self):
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
            for f in (self._proc.stdout, self._stderr):
                f.close()
            self._proc = None

    def _crashed(self, why: str = "") -> EmulatorCrash:
        proc, self._proc = self._proc, None
        try:
            proc.kill()
        except OSError:
            pass
        rc = proc.wait()
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        self._stderr.close()
        return EmulatorCrash(f"the CUDA emulator died (exit {rc}){why}:\n{text[-12000:]}")

    def call(self, op: str, args, buffers, words=(), seed: int = 0):
        """Runs entry point ``op``. ``buffers``: (address, bytes, misalignment); ``words``:
        (buffer index, first int64 word, stride, count) holding addresses. Returns (return
        value, every buffer's bytes after the call); raises ValueError or RuntimeError as the
        entry point threw (pybind11 maps std::invalid_argument to ValueError)."""
        if self._proc is None:
            self._start()
        name = op.encode()
        parts = [struct.pack("<II", MAGIC, len(name)), name, struct.pack(f"<I{len(args)}q", len(args), *args),
                 struct.pack("<QI", seed & (2**64 - 1), len(buffers))]
        for addr, data, misalign in buffers:
            parts += [struct.pack("<QQI", addr, len(data), misalign), data]
        parts.append(struct.pack("<I", len(words)))
        for w in words:
            parts.append(struct.pack("<IQQQ", *w))
        self._deadline = time.monotonic() + self.timeout
        try:
            request = memoryview(b"".join(parts))
            while request:
                request = request[self._proc.stdin.write(request):]
        except BrokenPipeError as e:
            raise self._crashed() from e
        head = self._read(12)
        magic, status, n = struct.unpack("<III", head)
        assert magic == MAGIC, "emulator reply out of step"
        text = self._read(n).decode(errors="replace")
        ret, count = struct.unpack("<qI", self._read(12))
        outs = []
        for _ in range(count):
            (size,) = struct.unpack("<Q", self._read(8))
            outs.append(self._read(size))
        if status == 1:
            raise ValueError(text)
        if status:
            raise RuntimeError(text)
        return ret, outs, text

    def _read(self, n: int) -> bytes:
        chunks, fd = [], self._proc.stdout.fileno()
        while n:
            ready, _, _ = select.select([fd], [], [], max(0.0, self._deadline - time.monotonic()))
            if not ready:
                raise self._crashed(f", killed: no reply within {self.timeout:.0f} s")
            data = os.read(fd, min(n, 1 << 20))
            if not data:
                raise self._crashed()
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _store(t: torch.Tensor, data: bytes) -> None:
    if data:
        t.view(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


class EmulatedCuda:
    """``gradcomp.ops``'s CUDA entry points on the emulator. Tensors stay on the CPU and play
    device memory: ``place()`` gives a tensor an address (with the misalignment asked for: the
    emulator's copy sits at an address with that residue mod 256) that tables may name;
    every placed tensor travels with every call and is updated in place, as device memory
    would be. Inputs must come back unchanged (a kernel writing into its input fails the call)."""

    def __init__(self, emulator: Emulator, schedule_seed: int = 0):
        self.emu = emulator
        self.seed = schedule_seed
        self._placed: list[tuple[torch.Tensor, int, int]] = []
        self._next = 1 << 44

    def _entry(self, t: torch.Tensor, misalign: int) -> tuple[torch.Tensor, int, int]:
        """``t`` at a fresh address (16 GiB apart from the others) with that residue mod 256."""
        assert t.is_contiguous() and 0 <= misalign < 256
        addr = self._next + misalign
        self._next += 1 << 34
        return t, addr, misalign

    def place(self, t: torch.Tensor, misalign: int = 0) -> int:
        """Registers ``t`` (contiguous) as device memory for every call until ``clear()``;
        returns its address."""
        self._placed.append(self._entry(t, misalign))
        return self._placed[-1][1]

    def addr(self, t: torch.Tensor) -> int:
        for u, a, _ in self._placed:
            if u is t:
                return a
        raise KeyError("tensor not placed")

    def clear(self):
        self._placed.clear()

    def call(self, op: str, args: list, *, inputs=(), outputs=(), tables=(), misalign=None):
        """``args``: ints, or tensors (passed as their addresses). ``inputs`` must not change;
        ``outputs`` start poisoned; ``tables``: (tensor, row words) whose column 2 holds
        addresses. Placed tensors travel too."""
        misalign = misalign or {}
        temp: list[tuple[torch.Tensor, int, int]] = []

        def address(t):  # placed, or placed for this call
            for u, a, _ in self._placed + temp:
                if u is t:
                    return a
            temp.append(self._entry(t, misalign.get(id(t), 0)))
            return temp[-1][1]

        for t in outputs:
            t.view(-1).view(torch.uint8).fill_(POISON_EMU)
        ints = [address(a) if isinstance(a, torch.Tensor) else int(a) for a in args]
        for t, _ in tables:
            address(t)
        for t in (*inputs, *outputs):
            address(t)
        everything = temp + self._placed
        before = {id(t): _raw(t) for t in inputs}
        words = []
        for t, row_words in tables:
            i = next(k for k, (u, _, _) in enumerate(everything) if u is t)
            rows = t.shape[0]
            words.append((i, 2, row_words, rows))
        ret, outs, text = self.emu.call(op, ints, [(a, _raw(t), m) for t, a, m in everything], words, self.seed)
        self.seed += 1
        for (t, _, _), data in zip(everything, outs):
            if id(t) in before:
                assert data == before[id(t)], f"{op} wrote into its input of {t.numel()} {t.dtype}"
            else:
                _store(t, data)
        return ret, text

    # ---- gradcomp.h's entry points, as ops.py calls them (arguments in ops.py's order)
    # ``bucket_misalign`` / ``payload_misalign``: bytes past a 256-byte boundary the emulator's
    # copies of the bucket / the payloads start at (payloads must stay 16-byte aligned, as ops checks)
    def quant_encode(self, bucket, table, world, slots, block, *, bits=8, residual_dtype=torch.float32,
                     stochastic=False, seed=0, step=0, rank=0, stream=0, bucket_misalign=0, payload_misalign=0):
        out = torch.empty(world * ops.shard_bytes(slots, block, bits), dtype=torch.uint8)
        self.call("quant_encode", [bits, block, ops.DTYPE_CODES[bucket.dtype], ops.DTYPE_CODES[residual_dtype],
                                   bucket, table, world, slots, out, seed, step, rank, int(stochastic), 0, stream],
                  inputs=[bucket, table], outputs=[out], tables=[(table, 4)],
                  misalign={id(bucket): bucket_misalign, id(out): payload_misalign})
        return out

    def quant_reduce(self, recv, my_rows, world, slots, block, *, bits=8, residual_dtype=torch.float32,
                     stochastic=False, seed=0, step=0, rank=0, stream=0, payload_misalign=0):
        out = torch.empty(ops.shard_bytes(slots, block, bits), dtype=torch.uint8)
        self.call("quant_reduce", [bits, block, ops.DTYPE_CODES[residual_dtype], recv, my_rows, world, slots, out,
                                   seed, step, rank, int(stochastic), 0, stream],
                  inputs=[recv, my_rows], outputs=[out], tables=[(my_rows, 4)],
                  misalign={id(recv): payload_misalign, id(out): (payload_misalign + 32) % 256})
        return out

    def quant_decode(self, gathered, table, world, slots, block, bucket, *, bits=8, stream=0, bucket_misalign=0,
                     payload_misalign=0):
        self.call("quant_decode", [bits, block, ops.DTYPE_CODES[bucket.dtype], gathered, table, world, slots, bucket,
                                   0, stream],
                  inputs=[gathered, table], tables=[(table, 4)],
                  misalign={id(bucket): bucket_misalign, id(gathered): payload_misalign})
        return bucket

    def topk_encode(self, bucket, table, pairs, *, approx=False, value_dtype=torch.float32, tiles=None, stream=0):
        rows = table.shape[0]
        tiles = ops._tiles(table) if tiles is None else tiles
        ws_bytes, _ = self.call("topk_workspace_bytes", [rows, tiles])
        ws = torch.empty(ws_bytes, dtype=torch.uint8)
        out = torch.empty(ops.topk_payload_bytes(pairs, value_dtype), dtype=torch.uint8)
        self.call("topk_encode", [ops.DTYPE_CODES[bucket.dtype], ops.DTYPE_CODES[value_dtype], int(approx), bucket,
                                  table, rows, tiles, pairs, out, ws, 0, stream],
                  inputs=[bucket, table], outputs=[out, ws], tables=[(table, 8)])
        return out

    def topk_decode(self, gathered, table, pairs, world, bucket, *, value_dtype=torch.float32, stream=0,
                    scratch=True):
        """Returns (rejected index lists, wrote NaN): the CUDA status words."""
        status = torch.empty(2, dtype=torch.int32)
        scr = torch.empty(bucket.numel(), dtype=torch.float32) if bucket.dtype != torch.float32 and scratch else None
        self.call("topk_decode", [ops.DTYPE_CODES[bucket.dtype], ops.DTYPE_CODES[value_dtype], gathered, table,
                                  table.shape[0], pairs, world, bucket, scr if scr is not None else 0, status, 0,
                                  stream],
                  inputs=[gathered, table], outputs=[status] + ([scr] if scr is not None else []),
                  tables=[(table, 8)])
        return int(status[0]), int(status[1])

    def randomk_encode(self, bucket, table, pairs, *, seed, step, stream=0):
        out = torch.empty(ops.RANDOMK_HEADER + pairs, dtype=torch.float32)
        self.call("randomk_encode", [ops.DTYPE_CODES[bucket.dtype], bucket, table, table.shape[0], pairs, seed, step,
                                     out, 0, stream],
                  inputs=[bucket, table], outputs=[out], tables=[(table, 8)])
        return out

    def randomk_decode(self, reduced, table, world, bucket, *, seed, step, stream=0):
        self.call("randomk_decode", [ops.DTYPE_CODES[bucket.dtype], reduced, table, table.shape[0], world, seed, step,
                                     bucket, 0, stream],
                  inputs=[reduced, table], tables=[(table, 8)])
        return bucket
