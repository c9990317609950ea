"""Run TVM-generated OpenCL C kernels through pyopencl (on this machine: PoCL, a CPU OpenCL implementation).

Launch convention of TVM's OpenCL runtime: NDRange global size = grid * block per axis, local size = block;
arguments in kernel-parameter order (buffers, then scalars as their own dtype).

PoCL has no `cl_khr_fp16`, so fp16 kernels cannot be built there: `fp16_supported()` says so and callers
report
those kernels as not run instead of pretending.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from ..compile.kernel_info import KernelLaunch, eval_extent


@cache
def _context():
    import pyopencl as cl

    platforms = cl.get_platforms()
    if not platforms:
        raise RuntimeError("no OpenCL platform (install pocl-opencl-icd)")
    device = platforms[0].get_devices()[0]
    ctx = cl.Context([device])
    return ctx, cl.CommandQueue(ctx), device


def device_name() -> str:
    _ctx, _q, dev = _context()
    return f"{dev.platform.name}: {dev.name}"


def fp16_supported() -> bool:
    _ctx, _q, dev = _context()
    return "cl_khr_fp16" in dev.extensions


def uses_fp16(source: str) -> bool:
    return "half" in source or "cl_khr_fp16" in source


class OpenCLRunner:
    """Builds one OpenCL program (all kernels of a module) and launches kernels on numpy arrays."""

    def __init__(self, source: str):
        import pyopencl as cl

        ctx, self.queue, _dev = _context()
        self.ctx = ctx
        self.program = cl.Program(ctx, source).build()

    def launch(
        self, launch: KernelLaunch, arrays: dict[str, np.ndarray], shape_values: dict[str, float]
    ) -> None:
        import pyopencl as cl

        kernel = cl.Kernel(self.program, launch.name)
        args, written = [], []
        mf = cl.mem_flags
        for p in launch.params:
            if p.is_buffer:
                host = np.ascontiguousarray(arrays[p.source])
                buf = cl.Buffer(
                    self.ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=host if host.nbytes else np.zeros(1)
                )
                args.append(buf)
                written.append((p, buf))
            elif p.source in shape_values:  # a scalar given by name, e.g. a float such as sm_scale
                args.append(np.dtype(p.dtype).type(shape_values[p.source]))
            else:
                args.append(np.dtype(p.dtype).type(eval_extent(p.source, shape_values)))
        grid, block = launch.grid(shape_values)
        global_size = tuple(g * b for g, b in zip(grid, block, strict=True))
        kernel(self.queue, global_size, block, *args)
        for p, buf in written:
            out = arrays[p.source]
            if out.nbytes:
                cl.enqueue_copy(self.queue, out, buf)
        self.queue.finish()
