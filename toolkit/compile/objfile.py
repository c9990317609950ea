"""Minimal readers for object-file headers (ELF, Mach-O, wasm) and ELF symbols: enough to prove what a
library is.

Only the fixed header fields are read (format, CPU, file type); for ELF also the symbol table, to pull the
serialized TVM module blob (`__tvm_ffi__library_bin`) out of a shared library without loading it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 190: "cuda", 243: "riscv"}
ELF_TYPES = {1: "relocatable", 2: "executable", 3: "shared", 4: "core"}
MACHO_CPUS = {0x0100000C: "arm64", 0x01000007: "x86_64", 12: "arm"}
MACHO_TYPES = {1: "relocatable", 2: "executable", 6: "shared", 8: "bundle"}


@dataclass(frozen=True)
class ObjectHeader:
    format: str  # "elf" | "macho" | "wasm" | "unknown"
    arch: str  # "x86_64" | "aarch64" | "arm64" | "wasm32" | ...
    kind: str  # "relocatable" | "shared" | "executable" | "module"
    bits: int = 64


def read_header(data: bytes) -> ObjectHeader:
    """Identify an object file from its first bytes."""
    if data[:4] == b"\x7fELF":
        bits = 64 if data[4] == 2 else 32
        endian = "<" if data[5] == 1 else ">"
        e_type, e_machine = struct.unpack_from(endian + "HH", data, 16)
        return ObjectHeader(
            "elf",
            ELF_MACHINES.get(e_machine, f"machine{e_machine}"),
            ELF_TYPES.get(e_type, f"type{e_type}"),
            bits,
        )
    if data[:4] in (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe"):  # MH_MAGIC_64 / MH_MAGIC, little endian
        cputype, _sub, filetype = struct.unpack_from("<iII", data, 4)
        bits = 64 if data[:4] == b"\xcf\xfa\xed\xfe" else 32
        return ObjectHeader(
            "macho",
            MACHO_CPUS.get(cputype & 0xFFFFFFFF, f"cpu{cputype:#x}"),
            MACHO_TYPES.get(filetype, f"type{filetype}"),
            bits,
        )
    if data[:4] == b"\0asm":
        return ObjectHeader("wasm", "wasm32", "module", 32)
    return ObjectHeader("unknown", "unknown", "unknown", 0)


def elf_symbol_bytes(data: bytes, name: str, size: int | None = None) -> bytes | None:
    """Contents of ELF data symbol `name` (from .symtab or .dynsym), or None when absent.

    `size` overrides the symbol's st_size (TVM declares the blob as an unsized extern array in some builds).
    """
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for sh in sections:
        sh_type = sh[1]
        if sh_type not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 24):
            st_name, _info, _other, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", data, off)
            sym = data[strtab[4] + st_name : data.index(b"\0", strtab[4] + st_name)].decode()
            if sym != name or st_shndx == 0 or st_shndx >= len(sections):
                continue
            sec = sections[st_shndx]
            if sec[1] == 8:  # SHT_NOBITS: zero-filled
                return b"\0" * st_size
            # in a shared object st_value is a virtual address; map it through the section's address
            start = sec[4] + (st_value - sec[3]) if sec[3] else sec[4] + st_value
            return data[start : start + (size if size is not None else st_size)]
    return None


def read_library_bin(data: bytes) -> bytes:
    """The serialized TVM module blob inside an exported library (8-byte length prefix included)."""
    head = elf_symbol_bytes(data, "__tvm_ffi__library_bin", size=8)
    if head is None:
        raise ValueError("no __tvm_ffi__library_bin symbol: not a TVM-exported library")
    (n,) = struct.unpack("<Q", head)
    return elf_symbol_bytes(data, "__tvm_ffi__library_bin", size=8 + n)
