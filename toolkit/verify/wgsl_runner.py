"""Run TVM-generated WGSL kernels through wgpu-py (on this machine: Mesa lavapipe, a CPU Vulkan driver).

Follows TVM's WebGPU runtime convention exactly (tvm/web/src/webgpu.ts, `createShaderFunc`):
- one `@group(0) @binding(i)` storage buffer per buffer parameter, in kernel-parameter order, `read_write`
only for
  written buffers;
- after them one uniform `podArgs`: the scalar parameters as 32-bit words (int -> i32, uint -> u32, float ->
f32),
  followed by `packGridDimX` (u32) = the blockIdx.x extent;
- dispatch (blockIdx.x, blockIdx.y, 1); an x extent >= 65536 is folded into z (halving x, doubling z) and the
  shader skips the surplus workgroups by comparing with packGridDimX.
"""

from __future__ import annotations

import os
import re
import tempfile
from functools import cache

import numpy as np

from ..compile.kernel_info import KernelLaunch

_FUNC_HEADER = re.compile(r"// Function: (\S+)\n//-+\n")
_MAX_DIM = 1 << 16


def split_wgsl_source(source: str) -> dict[str, str]:
    """Split TVM's concatenated WebGPU source (one shader per '// Function:' header) into kernel -> shader."""
    parts = _FUNC_HEADER.split(source)
    shaders: dict[str, str] = {}
    # parts = [prefix, name1, body1, name2, body2, ...]; the listing repeats a header before the body
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if body.strip():
            shaders[name] = body
    return shaders


@cache
def device():
    """The wgpu device on a CPU (lavapipe) or real Vulkan adapter, with shader-f16 when the adapter has it."""
    import wgpu

    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())  # silences Mesa's warning
    adapters = [a for a in wgpu.gpu.enumerate_adapters_sync() if a.info.get("backend_type") == "Vulkan"]
    if not adapters:
        raise RuntimeError("no Vulkan adapter for wgpu (install mesa-vulkan-drivers for lavapipe)")
    adapter = adapters[0]
    features = [f for f in ("shader-f16",) if f in adapter.features]
    return adapter.request_device_sync(required_features=features)


def adapter_name() -> str:
    return str(device().adapter.info.get("device", "?"))


class WGSLRunner:
    """Launches WGSL kernels on numpy arrays; arrays are uploaded per call and read back after each kernel."""

    def __init__(self, shaders: dict[str, str], write_access: dict[str, list[int]] | None = None):
        self.shaders = shaders
        self.write_access = write_access or {}
        self._pipelines: dict[str, object] = {}

    def _pipeline(self, launch: KernelLaunch):
        import wgpu

        if launch.name in self._pipelines:
            return self._pipelines[launch.name]
        dev = device()
        src = self.shaders[launch.name]
        written = self._written(launch, src)
        entries = []
        buffers = [p for p in launch.params if p.is_buffer]
        for i in range(len(buffers)):
            kind = wgpu.BufferBindingType.storage if written[i] else wgpu.BufferBindingType.read_only_storage
            entries.append({"binding": i, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": kind}})
        entries.append(
            {
                "binding": len(buffers),
                "visibility": wgpu.ShaderStage.COMPUTE,
                "buffer": {"type": wgpu.BufferBindingType.uniform},
            }
        )
        layout = dev.create_bind_group_layout(entries=entries)
        pipeline = dev.create_compute_pipeline(
            layout=dev.create_pipeline_layout(bind_group_layouts=[layout]),
            compute={"module": dev.create_shader_module(code=src), "entry_point": launch.name},
        )
        self._pipelines[launch.name] = (pipeline, layout, written)
        return self._pipelines[launch.name]

    def _written(self, launch: KernelLaunch, src: str) -> list[bool]:
        if launch.name in self.write_access:
            return [bool(w) for w in self.write_access[launch.name]]
        # the shader itself declares which storage buffers it writes
        access = {name: mode for mode, name in re.findall(r"var<storage, (read_write|read)> (\w+) ", src)}
        return [access.get(p.name) == "read_write" for p in launch.params if p.is_buffer]

    def launch(
        self, launch: KernelLaunch, arrays: dict[str, np.ndarray], shape_values: dict[str, int]
    ) -> None:
        """Run one kernel; buffers come from `arrays` by PrimFunc buffer name and written ones are updated."""
        import wgpu

        dev = device()
        pipeline, layout, written = self._pipeline(launch)
        bufs, gpu_bufs, entries = [], [], []
        for i, p in enumerate([p for p in launch.params if p.is_buffer]):
            host = np.ascontiguousarray(arrays[p.source])
            data = host.tobytes()
            data += b"\0" * ((-len(data)) % 4 or (0 if data else 4))  # sizes must be non-zero multiples of 4
            usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
            buf = dev.create_buffer_with_data(data=data, usage=usage)
            gpu_bufs.append((p, buf, written[i]))
            entries.append({"binding": i, "resource": {"buffer": buf, "offset": 0, "size": buf.size}})
            bufs.append(buf)
        grid, _block = launch.grid(shape_values)
        pods = _pod_words(launch, shape_values, pack_grid_dim_x=grid[0])
        uniform = dev.create_buffer_with_data(data=pods, usage=wgpu.BufferUsage.UNIFORM)
        entries.append(
            {"binding": len(bufs), "resource": {"buffer": uniform, "offset": 0, "size": uniform.size}}
        )
        wx, wz = _fold_x(grid[0])
        encoder = dev.create_command_encoder()
        cpass = encoder.begin_compute_pass()
        cpass.set_pipeline(pipeline)
        cpass.set_bind_group(0, dev.create_bind_group(layout=layout, entries=entries))
        cpass.dispatch_workgroups(wx, grid[1], wz)
        cpass.end()
        dev.queue.submit([encoder.finish()])
        for p, buf, was_written in gpu_bufs:
            if was_written:
                out = arrays[p.source]
                raw = dev.queue.read_buffer(buf)
                out[...] = np.frombuffer(raw, dtype=out.dtype, count=out.size).reshape(out.shape)


def _pod_words(launch: KernelLaunch, shape_values: dict[str, int], pack_grid_dim_x: int) -> bytes:
    from ..compile.kernel_info import eval_extent

    words = []
    for p in launch.params:
        if p.is_buffer:
            continue
        # webgpu.ts writes ints as i32, uints as u32, floats as f32 into one 32-bit word each
        if p.dtype.startswith("float"):
            words.append(
                np.array(
                    [float(eval(p.source, {"__builtins__": {}}, dict(shape_values)))], np.float32
                ).tobytes()
            )
            continue
        np_dtype = np.uint32 if p.dtype.startswith("uint") else np.int32
        words.append(np.array([eval_extent(p.source, shape_values)], dtype=np_dtype).tobytes())
    words.append(np.array([pack_grid_dim_x], dtype=np.uint32).tobytes())
    data = b"".join(words)
    return data + b"\0" * ((-len(data)) % 16)  # uniform buffers: keep 16-byte multiples


def _fold_x(x: int) -> tuple[int, int]:
    """webgpu.ts: fold blockIdx.x extents >= 65536 into z (pad odd values up)."""
    z = 1
    while x >= _MAX_DIM:
        x = x // 2 if x % 2 == 0 else (x + 1) // 2
        z *= 2
    return x, z
