"""What an OpenCL device can run, read from the ICD loader (libOpenCL) with ctypes: TVM's runtime exposes a
device's name but not its extensions, and an fp16 library on a device without cl_khr_fp16 (PoCL) only fails
when its first kernel is built, deep inside a call, with a driver log. `check_fp16` turns that into one line
before anything is loaded."""

from __future__ import annotations

import ctypes
import ctypes.util

from ..errors import UserError

_CL_DEVICE_TYPE_ALL = 0xFFFFFFFF
_CL_DEVICE_NAME = 0x102B
_CL_DEVICE_EXTENSIONS = 0x1030


def _opencl():
    name = ctypes.util.find_library("OpenCL") or "libOpenCL.so.1"
    return ctypes.CDLL(name)


def _info(cl, device, param: int) -> str:
    size = ctypes.c_size_t()
    if cl.clGetDeviceInfo(device, ctypes.c_uint(param), ctypes.c_size_t(0), None, ctypes.byref(size)):
        return ""
    buf = ctypes.create_string_buffer(size.value)
    if cl.clGetDeviceInfo(device, ctypes.c_uint(param), size, buf, None):
        return ""
    return buf.value.decode(errors="replace")


def device_extensions() -> dict[str, set[str]]:
    """Device name -> its OpenCL extensions, for every device of every platform ({} without an ICD)."""
    try:
        cl = _opencl()
    except OSError:
        return {}
    n = ctypes.c_uint()
    if cl.clGetPlatformIDs(0, None, ctypes.byref(n)) or not n.value:
        return {}
    platforms = (ctypes.c_void_p * n.value)()
    cl.clGetPlatformIDs(n, platforms, None)
    out: dict[str, set[str]] = {}
    for p in platforms:
        nd = ctypes.c_uint()
        if cl.clGetDeviceIDs(
            ctypes.c_void_p(p), ctypes.c_ulong(_CL_DEVICE_TYPE_ALL), 0, None, ctypes.byref(nd)
        ):
            continue
        devices = (ctypes.c_void_p * nd.value)()
        cl.clGetDeviceIDs(ctypes.c_void_p(p), ctypes.c_ulong(_CL_DEVICE_TYPE_ALL), nd, devices, None)
        for d in devices:
            dev = ctypes.c_void_p(d)
            out[_info(cl, dev, _CL_DEVICE_NAME)] = set(_info(cl, dev, _CL_DEVICE_EXTENSIONS).split())
    return out


def has_fp16(device_name: str) -> bool | None:
    """Whether the OpenCL device called `device_name` has cl_khr_fp16 (None: not found, unknown)."""
    ext = device_extensions().get(device_name)
    return None if ext is None else "cl_khr_fp16" in ext


def check_fp16(device_name: str, quantization: str, model_dtype: str, fp32_twin: str | None) -> None:
    """UserError (one line) when an fp16 library would run on an OpenCL device without cl_khr_fp16."""
    if model_dtype != "float16" or has_fp16(device_name) is not False:
        return
    instead = (
        f"; use -q {fp32_twin}, the same weights computed in fp32 (a converted folder: convert to it)"
        if fp32_twin
        else ""
    )
    raise UserError(
        f"{quantization} computes in fp16, which OpenCL device '{device_name}' cannot run (no cl_khr_fp16)"
        f"{instead}"
    )
