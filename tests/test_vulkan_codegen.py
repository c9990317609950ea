"""Vulkan backend: GLSL/SPIR-V generation through TVM's normal build, spirv-val, serialised module format."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.skipif(
    shutil.which("glslangValidator") is None or shutil.which("spirv-val") is None,
    reason="needs Debian glslang-tools and spirv-tools",
)

import toolkit.backends.vulkan as vkb  # noqa: E402  (registers target.build.vulkan)
from toolkit.backends.vulkan import module_format as mf  # noqa: E402
from toolkit.backends.vulkan.runtime_module import make_module, save_to_bytes  # noqa: E402
from toolkit.backends.vulkan.spirv import validate  # noqa: E402
from toolkit.targets import load_preset  # noqa: E402
from toolkit.verify import vulkan_check as kc  # noqa: E402

SPIRV_MAGIC = 0x07230203


@pytest.fixture(scope="module")
def target():
    return load_preset("vulkan").target


def _build(func, name, target):
    mod = kc.dlight_schedule(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target)
    lib = tvm.compile(mod, target=target)
    (vk_mod,) = vkb.vulkan_imports(lib.mod)
    return lib, vk_mod


def test_registered_as_tvm_codegen():
    assert tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None


@pytest.mark.parametrize("name", sorted(kc.standalone_kernels()))
def test_standalone_kernel_builds_and_validates(name, target):
    func, _, _ = kc.standalone_kernels()[name]
    _, vk_mod = _build(func, name, target)
    assert vk_mod.kind == "vulkan"
    data = mf.decode_module(save_to_bytes(vk_mod))
    assert data.fmt == "vulkan"
    kernel_name = f"{name}_kernel"
    assert set(data.fmap) == set(data.smap) == {kernel_name}
    info, shader = data.fmap[kernel_name], data.smap[kernel_name]
    assert info.name == kernel_name
    # handles first (SplitHostDevice sorts), then the shape scalars in the kernel's index dtype (int32 from
    # te.var, int64 in the Relax-legalized sample kernels); one extra tag (kNone) per argument
    codes = [t.code for t in info.arg_types]
    assert codes == sorted(codes, key=lambda c: c != 3) and 3 in codes
    dims = [d for p in func.params if isinstance(p.ty, tvm.tirx.BufferType) for d in p.shape]
    index = {str(d.ty.dtype) for d in dims if isinstance(d, tvm.tirx.Var)}
    assert {str(t) for t in info.arg_types if t.code != 3} == index
    assert info.arg_extra_tags == [0] * len(info.arg_types)
    assert info.launch_param_tags and all(
        t.split(".")[0] in ("blockIdx", "threadIdx") for t in info.launch_param_tags
    )
    assert shader.flag == 0  # a few scalars fit the 128-byte push-constant block
    assert np.frombuffer(shader.words[:4], "<u4")[0] == SPIRV_MAGIC
    validate(shader.words, kernel_name)
    assert f'OpEntryPoint GLCompute %{kernel_name} "{kernel_name}"' in vkb.spirv.disassemble(
        shader.words
    ) or f'"{kernel_name}"' in vkb.spirv.disassemble(shader.words)


def test_fp16_kernel_uses_16bit_storage_and_arithmetic(target):
    func, _, _ = kc.standalone_kernels()["q4_gemv_f16_s16"]
    _, vk_mod = _build(func, "g16", target)
    glsl = vk_mod.inspect_source("glsl")
    assert "GL_EXT_shader_explicit_arithmetic_types" in glsl and "GL_EXT_shader_16bit_storage" in glsl
    assert "float16_t q_scale_ptr[]" in glsl and "uint q_weight_ptr[]" in glsl
    assert "barrier();" in glsl and "shared float16_t" in glsl  # cross-thread reduction via shared memory


def many_scalar_func(n_scalars: int = 17):
    from tvm import te

    n = te.var("n")
    coeffs = [te.var(f"c{i}") for i in range(n_scalars)]
    x = te.placeholder((n,), "float32", name="x")
    total = coeffs[0]
    for c in coeffs[1:]:
        total = total + c
    y = te.compute((n,), lambda i: x[i] * total.astype("float32"), name="y")
    return te.create_prim_func([x, y, *coeffs])


def test_many_scalars_go_to_a_uniform_buffer(target):
    _, vk_mod = _build(many_scalar_func(), "scalars", target)
    data = mf.decode_module(save_to_bytes(vk_mod))
    info, shader = data.fmap["scalars_kernel"], data.smap["scalars_kernel"]
    assert sum(t.code != 3 for t in info.arg_types) == 18  # n + 17 coefficients: 144 bytes > 128
    assert shader.flag == 1 and shader.uses_ubo
    glsl = vk_mod.inspect_source("glsl")
    assert "uniform TVMScalarArgs" in glsl and "binding = 2" in glsl and "push_constant" not in glsl


def test_bitwise_operators_on_bool_become_logical_ones(target):
    """GLSL has no & | ^ ~ on bool (TVMScript writes `a & b` on conditions as a bitwise op): they must be
    spelled && || ^^ !, and the shader must compile."""
    from tvm.script import tirx as T

    @T.prim_func
    def func(a: T.Buffer((64,), "float32"), out: T.Buffer((64,), "float32")):
        T.func_attr({"global_symbol": "bool_ops", "tirx.noalias": True})
        for tx in T.thread_binding(64, thread="threadIdx.x"):
            x = a[tx]
            keep = ((x > T.float32(0)) & (x < T.float32(1))) | ~(x == T.float32(2))
            out[tx] = T.Select(keep ^ (x > T.float32(5)), x, T.float32(0))

    lib = tvm.compile(tvm.IRModule({"bool_ops": func}), target=target)
    glsl = vkb.vulkan_imports(lib.mod)[0].inspect_source("glsl")
    assert "&&" in glsl and "||" in glsl and "^^" in glsl and "(!" in glsl


def test_unsupported_construct_is_a_compile_error(target):
    from tvm import te, tirx

    n = te.var("n")
    x = te.placeholder((n,), "float32", name="x")
    y = te.compute((n,), lambda i: tirx.erf(x[i]), name="y")  # GLSL has no erf; must not become wrong code
    mod = kc.dlight_schedule(
        tvm.IRModule({"e": te.create_prim_func([x, y]).with_attr("global_symbol", "e")}), target
    )
    with pytest.raises(Exception, match="erf"):
        tvm.compile(mod, target=target)


def test_unsupported_construct_direct_error_names_it(target):
    from tvm.script import tirx as T

    @T.prim_func
    def kernel(a: T.handle("float32", "global")):
        T.func_attr(
            {
                "calling_conv": 2,
                "global_symbol": "k",
                "tirx.noalias": True,
                "tirx.kernel_launch_params": ["threadIdx.x"],
            }
        )
        A = T.decl_buffer((16,), data=a)
        for i in T.parallel(16):
            A[i] = T.float32(1)

    with pytest.raises(vkb.UnsupportedConstruct, match="parallel loop"):
        vkb.generate_glsl(kernel, target)


def test_module_bytes_roundtrip_field_by_field():
    shader = mf.SPIRVShader(1, bytes(range(8)) * 3)
    info = mf.FunctionInfo(
        "k",
        [mf.DLType.parse("handle"), mf.DLType.parse("int32"), mf.DLType.parse("float32")],
        ["blockIdx.x", "threadIdx.x"],
        [0, 0, 0],
    )
    blob = mf.encode_module(mf.VulkanModuleData("vulkan", {"k": info}, {"k": shader}))
    # hand-computed prefix: String "vulkan", map size 1, key "k", name "k", 3 arg types
    assert blob[:8] == (6).to_bytes(8, "little") and blob[8:14] == b"vulkan"
    assert blob[14:22] == (1).to_bytes(8, "little")
    back = mf.decode_module(blob)
    assert back.fmt == "vulkan" and back.fmap["k"] == info and back.smap["k"] == shader
    assert [str(t) for t in back.fmap["k"].arg_types] == ["handle", "int32", "float32"]
    assert back.smap["k"].uses_ubo
    assert mf.encode_module(back) == blob
    with pytest.raises(ValueError):
        mf.decode_module(blob[:-1])
    # the C++ module returns exactly these bytes from SaveToBytes(), under kind "vulkan"
    mod = make_module(blob, {"glsl": "// src"})
    assert mod.kind == "vulkan" and mod.is_binary_serializable()
    assert save_to_bytes(mod) == blob and mod.inspect_source("glsl") == "// src"


def test_function_info_encoding_matches_tvm_serializer():
    """Cross-check against TVM's own C++ serializer: the wheel's webgpu module writes its
    Map<String, FunctionInfo> with the same Serializer<FunctionInfo> our decoder reads."""
    func, _, _ = kc.standalone_kernels()["q4_matmul_f32"]
    target = tvm.target.Target({"kind": "webgpu"})
    mod = kc.dlight_schedule(tvm.IRModule({"mm": func.with_attr("global_symbol", "mm")}), target)
    lib = tvm.compile(mod, target=target)
    (web,) = [m for m in lib.mod.imports if m.kind == "webgpu"]
    r = mf._Reader(save_to_bytes(web))
    fmap = mf.decode_fmap(r)
    info = fmap["mm_kernel"]
    assert info.name == "mm_kernel"
    assert [str(t) for t in info.arg_types] == ["handle"] * 4 + ["int32"]
    # webgpu appends its own "paramWriteAccess:[...]" tag after the launch tags
    assert info.launch_param_tags[:4] == ["blockIdx.y", "blockIdx.x", "threadIdx.y", "threadIdx.x"]
    assert info.launch_param_tags[4].startswith("paramWriteAccess:")
    assert info.arg_extra_tags in ([], [0] * 5)  # webgpu leaves the extra tags empty


def test_export_library_embeds_the_module(tmp_path, target):
    func, _, _ = kc.standalone_kernels()["rms_norm_f32"]
    lib, vk_mod = _build(func, "rms", target)
    path = tmp_path / "rms.so"
    lib.export_library(str(path))
    blob = save_to_bytes(vk_mod)
    raw = path.read_bytes()
    # the packed import blob holds kind "vulkan" followed by our bytes, verbatim
    key = (6).to_bytes(8, "little") + b"vulkan" + len(blob).to_bytes(8, "little")
    assert key + blob in raw


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_paged_kv_cache_kernels_build(dtype, target):
    from tvm import relax

    from toolkit.verify.vulkan_check import paged_kv_cache_module

    ex = relax.build(paged_kv_cache_module(target, dtype), target)
    builds = [vkb.build_of(m) for m in vkb.vulkan_imports(ex.mod)]
    names = {n for b in builds for n in b.kernels}
    assert {
        "batch_prefill_paged_kv_kernel",
        "batch_decode_paged_kv_kernel",
        "tir_attention_merge_state_kernel",
        "tir_kv_cache_transpose_append_kernel",
        "copy_single_page_kernel",
    } <= names
    assert len(names) >= 14
    for b in builds:
        for k in b.kernels.values():
            assert k.glsl.shared_bytes <= 32768
            validate(k.spirv, k.name)
