"""Byte format of a TVM "vulkan" runtime module, written and read back in Python.

Facts taken from apache/tvm (src/backend/vulkan/runtime/vulkan_module.cc, spirv_shader.h,
src/runtime/metadata.h, include/tvm/support/serializer.h); the code here is our own:

  module   := String fmt ("vulkan") | Map<String, FunctionInfo> fmap | Map<String, Bytes> smap
  String / Bytes := u64 length | bytes
  Map<K, V>      := u64 count | (K V)*
  Array<T>       := u64 count | T*
  FunctionInfo   := String name | Array<DLDataType> arg_types | Array<String> launch_param_tags
                    | Array<i32> arg_extra_tags
  DLDataType     := u8 code | u8 bits | u16 lanes
  smap value     := SPIRVShader = u32 flag | u64 word count | u32 words   (flag bit 0: scalars in a UBO)

All integers little-endian (TVM swaps to little-endian on big-endian hosts). The blob is what the runtime's
`ffi.Module.load_from_bytes.vulkan` consumes when an exported library imports a module of kind "vulkan".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MODULE_KIND = "vulkan"
FORMAT = "vulkan"

# DLDataTypeCode values (dlpack.h)
_DL_CODES = {"int": 0, "uint": 1, "float": 2, "handle": 3, "bfloat": 4, "bool": 6}
_DL_NAMES = {v: k for k, v in _DL_CODES.items()}


@dataclass(frozen=True)
class DLType:
    code: int
    bits: int
    lanes: int = 1

    @classmethod
    def parse(cls, dtype: str) -> DLType:
        if dtype == "handle":
            return cls(3, 64, 1)
        if dtype == "bool":
            return cls(6, 8, 1)
        base, _, lanes = dtype.partition("x")
        for name in ("uint", "int", "float", "bfloat"):
            if base.startswith(name) and base[len(name) :].isdigit():
                return cls(_DL_CODES[name], int(base[len(name) :]), int(lanes or 1))
        raise ValueError(f"unknown dtype {dtype!r}")

    def __str__(self) -> str:
        if self.code == 3:
            return "handle"
        if self.code == 6:
            return "bool"
        text = f"{_DL_NAMES[self.code]}{self.bits}"
        return text if self.lanes == 1 else f"{text}x{self.lanes}"


@dataclass
class FunctionInfo:
    name: str
    arg_types: list[DLType]
    launch_param_tags: list[str]
    arg_extra_tags: list[int] = field(default_factory=list)


@dataclass
class SPIRVShader:
    flag: int
    words: bytes  # SPIR-V binary, a multiple of 4 bytes

    @property
    def uses_ubo(self) -> bool:
        return bool(self.flag & 1)


@dataclass
class VulkanModuleData:
    fmt: str
    fmap: dict[str, FunctionInfo]
    smap: dict[str, SPIRVShader]


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> None:
        self.parts.append(struct.pack("<B", v))

    def u16(self, v: int) -> None:
        self.parts.append(struct.pack("<H", v))

    def i32(self, v: int) -> None:
        self.parts.append(struct.pack("<i", v))

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack("<I", v))

    def u64(self, v: int) -> None:
        self.parts.append(struct.pack("<Q", v))

    def bytes_(self, b: bytes) -> None:
        self.u64(len(b))
        self.parts.append(bytes(b))

    def string(self, s: str) -> None:
        self.bytes_(s.encode())

    def value(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(bytes(data))
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError(f"truncated vulkan module: need {n} bytes at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self._take(2))[0]

    def i32(self) -> int:
        return struct.unpack("<i", self._take(4))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def bytes_(self) -> bytes:
        return bytes(self._take(self.u64()))

    def string(self) -> str:
        return self.bytes_().decode()


def encode_shader(shader: SPIRVShader) -> bytes:
    if len(shader.words) % 4:
        raise ValueError("SPIR-V length is not a multiple of 4")
    w = _Writer()
    w.u32(shader.flag)
    w.u64(len(shader.words) // 4)
    w.parts.append(bytes(shader.words))
    return w.value()


def decode_shader(blob: bytes) -> SPIRVShader:
    r = _Reader(blob)
    flag = r.u32()
    n = r.u64()
    words = bytes(r._take(4 * n))
    if r.pos != len(r.data):
        raise ValueError("trailing bytes after SPIRVShader")
    return SPIRVShader(flag, words)


def encode_function_info(w: _Writer, info: FunctionInfo) -> None:
    w.string(info.name)
    w.u64(len(info.arg_types))
    for t in info.arg_types:
        w.u8(t.code)
        w.u8(t.bits)
        w.u16(t.lanes)
    w.u64(len(info.launch_param_tags))
    for tag in info.launch_param_tags:
        w.string(tag)
    w.u64(len(info.arg_extra_tags))
    for t in info.arg_extra_tags:
        w.i32(t)


def decode_function_info(r: _Reader) -> FunctionInfo:
    name = r.string()
    arg_types = [DLType(r.u8(), r.u8(), r.u16()) for _ in range(r.u64())]
    tags = [r.string() for _ in range(r.u64())]
    extra = [r.i32() for _ in range(r.u64())]
    return FunctionInfo(name, arg_types, tags, extra)


def encode_module(data: VulkanModuleData) -> bytes:
    w = _Writer()
    w.string(data.fmt)
    w.u64(len(data.fmap))
    for key, info in data.fmap.items():
        w.string(key)
        encode_function_info(w, info)
    w.u64(len(data.smap))
    for key, shader in data.smap.items():
        w.string(key)
        w.bytes_(encode_shader(shader))
    return w.value()


def decode_fmap(r: _Reader) -> dict[str, FunctionInfo]:
    fmap = {}
    for _ in range(r.u64()):
        key = r.string()
        fmap[key] = decode_function_info(r)
    return fmap


def decode_module(blob: bytes) -> VulkanModuleData:
    r = _Reader(blob)
    fmt = r.string()
    fmap = decode_fmap(r)
    smap = {}
    for _ in range(r.u64()):
        key = r.string()
        smap[key] = decode_shader(r.bytes_())
    if r.pos != len(r.data):
        raise ValueError(f"{len(r.data) - r.pos} trailing bytes after the vulkan module")
    return VulkanModuleData(fmt, fmap, smap)


# --- the container TVM's export_library writes (src/runtime/library_module.cc / pack_imports) -------------


def extract_device_blobs(packed: bytes) -> list[tuple[str, bytes]]:
    """Split the `__tvm_ffi__library_bin` blob of an exported library into (kind, payload) pairs.

    Layout: u64 number of entries, then per entry String kind and, except for the "_lib" placeholder of the
    host module and the "_import_tree" entry, Bytes payload of that module's SaveToBytes()."""
    r = _Reader(packed)
    out = []
    for _ in range(r.u64()):
        kind = r.string()
        if kind == "_lib":
            out.append((kind, b""))
            continue
        out.append((kind, r.bytes_()))
    return out
