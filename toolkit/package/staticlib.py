"""The app's static library: every model's system-lib objects in one `ar` archive, then checked by symbol.

The apps link it whole (MLC's iOS project passes `-Wl,-all_load`, mlc4j's CMake `--whole-archive`, at
mlc-ai/mlc-llm 79d603f085f50500e9509fa01785ffa7ecfaaa93), so every model must register under its own prefix
and no strong global symbol may be defined by two members. TVM names every library's host object `lib0.o`,
so a member whose name lacks the model_lib is stored as `<model_lib>-<name>`. Mach-O archives are written
in the Darwin (BSD) format that Apple's linker reads, ELF ones in the GNU format the NDK's linker reads;
llvm-ar writes both, with a symbol table, for any target, and llvm-nm reads both.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..compile.objfile import read_header
from ..errors import UserError

LIBRARY_BIN = "__tvm_ffi__library_bin"  # TVM FFI's blob symbol, after the system-lib prefix
ARCHIVE_FORMATS = {"macho": "darwin", "elf": "gnu"}
_INSTALL = "Debian: apt-get install llvm-15"


def find_tool(name: str) -> str:
    """`llvm-<name>-15`, else the unversioned `llvm-<name>` (both read Mach-O and aarch64 ELF here)."""
    for candidate in (f"llvm-{name}-15", f"llvm-{name}"):
        found = shutil.which(candidate)
        if found:
            return found
    raise UserError(f"packaging needs llvm-{name} (for Mach-O and aarch64 ELF objects); {_INSTALL}")


def library_symbol(prefix: str, fmt: str) -> str:
    """The registration blob's symbol for a system-lib prefix; Mach-O adds C's leading underscore."""
    name = prefix + LIBRARY_BIN
    return "_" + name if fmt == "macho" else name


@dataclass(frozen=True)
class Symbol:
    member: str
    name: str
    weak: bool


def extract_objects(tar_path: Path, model_lib: str, dest: Path, fmt: str, arch: str) -> list[Path]:
    """Unpack a library `.tar` into `dest` as `<model_lib>-<member>`; only fmt/arch objects are accepted."""
    out = []
    with tarfile.open(tar_path) as tar:  # TVM's .tar may be gzip-compressed; tarfile detects it
        for member in tar.getmembers():
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
            h = read_header(data[:64])
            if (h.format, h.arch, h.kind) != (fmt, arch, "relocatable"):
                raise UserError(
                    f"{member.name}: {h.format}/{h.arch}/{h.kind}, expected {fmt}/{arch} relocatable objects",
                    tar_path,
                )
            name = Path(member.name).name
            path = dest / (name if name.startswith(model_lib) else f"{model_lib}-{name}")
            path.write_bytes(data)
            out.append(path)
    if not out:
        raise UserError("no object files inside", tar_path)
    return out


def create_archive(output: Path, objects: list[Path], fmt: str) -> None:
    output.unlink(missing_ok=True)  # `ar r` would add to an old archive
    cmd = [find_tool("ar"), f"--format={ARCHIVE_FORMATS[fmt]}", "rcs", str(output), *map(str, objects)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")


def defined_globals(archive: Path) -> list[Symbol]:
    """Every defined global symbol of every member (llvm-nm; `-m` marks Mach-O weak definitions, ELF ones
    keep nm's W/V letters)."""
    cmd = [find_tool("nm"), "-A", "-g", "--defined-only", "-m", str(archive)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    symbols = []
    for line in proc.stdout.splitlines():
        head, sep, rest = line.partition(": ")
        fields = rest.split()
        if not sep or not fields or not head.startswith(f"{archive}:"):
            continue
        member = head[len(str(archive)) + 1 :]
        weak = "weak" in fields[1:-1] or (len(fields) == 3 and fields[1] in ("W", "V", "w", "v"))
        symbols.append(Symbol(member, fields[-1], weak))
    return symbols


def check_archive(archive: Path, prefixes: list[str], fmt: str) -> dict[str, str]:
    """Prove the archive serves every prefix and links whole: {prefix: member holding its blob symbol}."""
    symbols = defined_globals(archive)
    where = {s.name: s.member for s in symbols}
    found = {}
    for prefix in prefixes:
        name = library_symbol(prefix, fmt)
        if name not in where:
            raise UserError(f"no {name}: the library for system-lib prefix {prefix!r} is missing", archive)
        found[prefix] = where[name]
    owners: dict[str, str] = {}
    for s in symbols:
        if s.weak:
            continue
        if s.name in owners and owners[s.name] != s.member:
            raise UserError(
                f"{s.name} is defined by both {owners[s.name]} and {s.member}; the app's whole-archive link "
                "would fail",
                archive,
            )
        owners[s.name] = s.member
    return found
