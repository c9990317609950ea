"""Skip, with the reason, a test whose optional GPU API this machine lacks (wgpu on a Vulkan adapter such
as lavapipe; an OpenCL platform such as PoCL): a missing driver or package is not a failure of ours."""

from __future__ import annotations

import functools

import pytest


@functools.cache
def missing(api: str) -> str | None:
    """Why `api` ("webgpu" or "opencl") cannot run kernels here; None when it can."""
    if api not in ("webgpu", "opencl"):
        raise ValueError(f"unknown GPU API {api!r}")
    try:
        if api == "webgpu":
            from toolkit.verify.wgsl_runner import adapter_name

            adapter_name()
        else:
            from toolkit.verify.opencl_runner import device_name

            device_name()
    except Exception as e:  # noqa: BLE001 - ImportError (package absent), no adapter / platform, driver errors
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return None


def require(api: str) -> None:
    why = missing(api)
    if why is not None:
        pytest.skip(f"no {api} device to run kernels on here ({why})")
