"""What GPU code a built module really carries: the entries of the CUDA fat binaries in its
``.nv_fatbin`` section (cubins for real architectures, PTX for virtual ones), read straight
from the ELF file, with no CUDA tool needed.

Layout (as nvcc writes it, stable since CUDA 4): a fat binary is a 16-byte header
(magic 0xBA55ED50, u16 version, u16 header size, u64 size of the entries) followed by
entries, each a header (u16 kind: 1 PTX, 2 ELF cubin; u16; u32 header size; u64 payload
size; ...; u32 architecture at byte 28, e.g. 90) and its payload. A module holds one fat
binary per CUDA translation unit, each aligned in the section.
"""

from __future__ import annotations

import struct

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX = 1
KIND_ELF = 2


def _section(path: str, name: bytes) -> bytes | None:
    """The contents of one section of a 64-bit little-endian ELF file, or None."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):  # (name offset, type, offset, size)
        base = shoff + i * shentsize
        sh_name, sh_type = struct.unpack_from("<II", data, base)
        sh_offset, sh_size = struct.unpack_from("<QQ", data, base + 0x18)
        return sh_name, sh_type, sh_offset, sh_size

    _, _, str_off, str_size = header(shstrndx)
    names = data[str_off : str_off + str_size]
    for i in range(shnum):
        sh_name, sh_type, off, size = header(i)
        end = names.index(b"\0", sh_name)
        if names[sh_name:end] == name:
            return b"" if sh_type == 8 else data[off : off + size]  # SHT_NOBITS holds nothing
    return None


def entries(path: str) -> list[tuple[str, int]]:
    """[(kind, arch)] of every fat-binary entry in the module at `path`, kind "sm" for a
    cubin and "compute" for PTX, in file order; [] for a module without GPU code."""
    section = _section(path, b".nv_fatbin")
    if not section:
        return []
    found = []
    magic_bytes = struct.pack("<I", FATBIN_MAGIC)
    pos = section.find(magic_bytes)  # padding may sit between the fat binaries of two units
    while pos >= 0 and pos + 16 <= len(section):
        _magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", section, pos)
        entry = pos + header_size
        end = min(entry + fat_size, len(section))
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", section, entry)
            arch, = struct.unpack_from("<I", section, entry + 28)
            if kind in (KIND_PTX, KIND_ELF):
                found.append(("compute" if kind == KIND_PTX else "sm", arch))
            if entry_header == 0:
                break
            entry += entry_header + payload
        pos = section.find(magic_bytes, max(end, pos + 16))  # always forward, even past a bad header
    return found


def summary(path: str) -> str:
    """e.g. "sm_75, sm_80, sm_90 + PTX compute_90"; "" without GPU code."""
    found = entries(path)
    cubins = sorted({a for k, a in found if k == "sm"})
    ptx = sorted({a for k, a in found if k == "compute"})
    text = ", ".join(f"sm_{a}" for a in cubins)
    if ptx:
        text += (" + " if text else "") + "PTX " + ", ".join(f"compute_{a}" for a in ptx)
    return text
