"""Our paged-KV decode attention kernel (toolkit/compile/gpu_decode_attention.py) against TVM's own
`_attention_decode` (`batch_decode_paged_kv`), which it replaces in the KV cache.

Both kernels are built from their PrimFuncs and launched with the same arrays: fp32 on OpenCL (PoCL, no fp16
there) and fp16 on WGSL (wgpu on lavapipe, which has shader-f16). A float64 numpy model of TVM's output
convention (output in the qkv dtype, lse = log2 sum exp2(q.k * sm_scale * log2 e)) checks both. CUDA is
compile-checked with nvcc for sm_90, the shape the kernel is for (Phi-3-mini: 32 heads, head_dim 96).
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import gpu_apis
import numpy as np
import pytest
import tvm

from toolkit.compile.gpu_decode_attention import decode_attention_gpu
from toolkit.compile.kernel_info import NO_CSE, describe
from toolkit.targets import load_preset

D, PAGE = 96, 16  # Phi-3-mini's head_dim and the KV cache's page size
H = 4  # heads in the numerical tests: enough for distinct (b, h) blocks, small for CPU GPU-emulation
HAS_NVCC = shutil.which("nvcc") is not None
LOG2E = np.log2(np.e)


def _tvm_decode(h: int, dtype: str, sliding_window: bool, target) -> tvm.tirx.PrimFunc:
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode

    return _attention_decode(h, h, D, dtype, sliding_window, {}, target, PAGE)


@cache
def _built(api: str, which: str, dtype: str, sliding_window: bool, h: int = H):
    """(runner, launch) for our kernel or TVM's on `api` ("opencl" or "webgpu"), built once per session."""
    preset = load_preset(api)
    target = preset.target
    if which == "ours":
        # WebGPU caps a workgroup at 256 invocations; 1024 (the CUDA configuration) elsewhere
        func = decode_attention_gpu(
            h, h, D, dtype, sliding_window, PAGE, max_threads=256 if api == "webgpu" else 1024
        )
    else:
        func = _tvm_decode(h, dtype, sliding_window, target)
    mod = tvm.IRModule({"decode": func.with_attr("global_symbol", "decode")})
    with tvm.transform.PassContext(config=NO_CSE):  # as compile/pipeline.py builds GPU kernels
        built = tvm.compile(mod, target=target)
    source = next(m for m in built.mod.imports if m.kind != "llvm").inspect_source()
    (launch,) = describe(mod, target)["decode"].kernels
    if api == "opencl":
        from toolkit.verify.opencl_runner import OpenCLRunner

        return OpenCLRunner(source), launch
    from toolkit.verify.wgsl_runner import WGSLRunner, split_wgsl_source

    return WGSLRunner(split_wgsl_source(source)), launch


def _inputs(lens: list[int], dtype: str, seed: int, h: int = H, window: list[tuple[int, int]] | None = None):
    """Random q and pages; each sequence's pages are a random (shuffled) subset of a pool with spare pages.

    `window`: per sequence (sink length, window start); the sequence then holds `lens[b]` positions of
    which sink + (lens[b] - start) are attended.
    """
    rng = np.random.default_rng(seed)
    npages = [-(-n // PAGE) for n in lens]
    pool = sum(npages) + 5
    order = rng.permutation(pool).astype("int32")
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype("int32")
    last = np.array([n - (p - 1) * PAGE for n, p in zip(lens, npages)], "int32")
    if window is None:
        length_info = last
    else:
        sink = np.array([s for s, _ in window], "int32")
        start = np.array([w for _, w in window], "int32")
        length_info = np.stack([last, start, sink])
    b = len(lens)
    arrays = {
        "Q": rng.standard_normal((b, h, D)).astype(dtype),
        "pages": rng.standard_normal((pool, 2, h, PAGE, D)).astype(dtype),
        "page_table_indptr": indptr,
        "page_table_values": order[: indptr[-1]].copy(),
        "length_info": np.ascontiguousarray(length_info),
        "k_rope_pos_offset": np.zeros(b, "int32"),
        "q_rope_position": np.zeros(b, "int32"),
        "output": np.zeros((b, h, D), dtype),
        "lse": np.zeros((b, h), "float32"),
    }
    values = {
        "B": b,
        "nnz_pages": int(indptr[-1]),
        "max_num_pages": pool,
        "rotary_mode": 0,
        "rope_scale": 1.0,
        "rope_theta": 1e4,
        "sm_scale": float(1 / np.sqrt(D)),
        "pages_elem_offset": 0,
        "page_indptr_elem_offset": 0,
        "page_values_elem_offset": 0,
        "k_rope_pos_offset_elem_offset": 0,
        "q_rope_position_elem_offset": 0,
        "length_info_elem_offset": 0,
    }
    return arrays, values


def _reference(arrays, values, window=None) -> tuple[np.ndarray, np.ndarray]:
    """float64 (output, lse) in TVM's convention: lse = log2 sum_j exp2(q . k_j * sm_scale * log2 e)."""
    q, pages = arrays["Q"].astype("float64"), arrays["pages"].astype("float64")
    indptr, table = arrays["page_table_indptr"], arrays["page_table_values"]
    out, lse = np.zeros(q.shape), np.zeros(q.shape[:2])
    for b in range(q.shape[0]):
        n = (indptr[b + 1] - indptr[b] - 1) * PAGE + (arrays["length_info"][..., b].flat[0])
        pos = np.arange(n)
        if window is not None:
            sink, start = window[b]
            pos = np.concatenate([pos[:sink], pos[start:]])
        page, slot = table[indptr[b] + pos // PAGE], pos % PAGE
        k, v = pages[page, 0, :, slot], pages[page, 1, :, slot]  # [n, h, D]
        s = np.einsum("hd,nhd->hn", q[b], k) * values["sm_scale"] * LOG2E
        m = s.max(1, keepdims=True)
        p = np.exp2(s - m)
        out[b] = np.einsum("hn,nhd->hd", p, v) / p.sum(1)[:, None]
        lse[b] = m[:, 0] + np.log2(p.sum(1))
    return out, lse


def _run(api: str, which: str, arrays, values, sliding_window: bool = False, h: int = H):
    runner, launch = _built(api, which, str(arrays["Q"].dtype), sliding_window, h)
    mine = {k: v.copy() for k, v in arrays.items()}
    runner.launch(launch, mine, values)
    return mine["output"].astype("float64"), mine["lse"].astype("float64")


LENGTHS = [[1], [15], [16], [17], [190], [700], [17, 190, 1], [700, 16, 15]]


@pytest.mark.parametrize("lens", LENGTHS, ids=lambda x: "-".join(map(str, x)))
def test_fp32_matches_tvm_kernel_on_opencl(lens):
    gpu_apis.require("opencl")
    arrays, values = _inputs(lens, "float32", seed=len(lens) * 1000 + lens[0])
    ours, theirs = _run("opencl", "ours", arrays, values), _run("opencl", "tvm", arrays, values)
    ref = _reference(arrays, values)
    # fp32 throughout: 96-term dot products, a softmax over <= 700 scores and a 700-term weighted sum, summed
    # in a different order from TVM's kernel: rounding only, measured <= 4e-7 on outputs of size ~0.1-1 and
    # <= 8e-7 (absolute) on lse values of size ~0-10. 1e-5 relative + 1e-6 absolute leaves >= 2x margin
    # and still catches any wrong token, page or scale (those move results by > 1e-2).
    for got in (ours, theirs):
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-6)


def test_a_sequence_without_kv_gets_zeros():
    """A sequence with no pages: output 0 and lse -5e4 (TVM's GPU kernel: -5e4 + log2 of its group count)."""
    gpu_apis.require("opencl")
    arrays, values = _inputs([5, 0, 33], "float32", seed=3)
    ours, theirs = _run("opencl", "ours", arrays, values), _run("opencl", "tvm", arrays, values)
    assert np.all(ours[0][1] == 0) and np.all(ours[1][1] == -5e4)
    for b in (0, 2):  # its neighbours are unaffected
        np.testing.assert_allclose(ours[0][b], theirs[0][b], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours[1][b], theirs[1][b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lens", [[17], [190, 40, 3]], ids=lambda x: "-".join(map(str, x)))
def test_fp32_sliding_window_with_sinks_matches_tvm_kernel(lens):
    gpu_apis.require("opencl")
    # per sequence (sink length, window start): attend to [0, sink) and [start, len)
    window = [(4, 100), (4, 9), (0, 0)] if len(lens) > 1 else [(3, 10)]
    arrays, values = _inputs(lens, "float32", seed=7, window=window)
    ours, theirs = _run("opencl", "ours", arrays, values, True), _run("opencl", "tvm", arrays, values, True)
    ref = _reference(arrays, values, window)
    for got in (ours, theirs):  # tolerances as above
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lens", [[1], [17], [190], [700, 16, 15]], ids=lambda x: "-".join(map(str, x)))
def test_fp16_matches_tvm_kernel_on_wgsl(lens):
    gpu_apis.require("webgpu")
    from toolkit.verify.wgsl_runner import device

    if "shader-f16" not in device().features:
        pytest.skip("this Vulkan adapter has no shader-f16: fp16 kernels cannot run here")
    arrays, values = _inputs(lens, "float16", seed=lens[0])
    ours, theirs = _run("webgpu", "ours", arrays, values), _run("webgpu", "tvm", arrays, values)
    ref = _reference(arrays, values)  # from the same fp16 inputs, in float64
    # fp16 output: the final rounding of values |x| < 2 is at most half an ulp, 2^-11 * 2 ~ 1e-3; both kernels
    # accumulate in fp32 (rounding ~1e-6). Measured: 3.7e-4 from the float64 model, 1.5e-5 between the two
    # kernels; lse is fp32 (measured 8.7e-7): as for fp32.
    for got in (ours, theirs):
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-3)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=1e-3)


def test_interface_is_tvm_kernels():
    """Same parameters, buffer shapes, dtypes, elem_offset symbols and global symbol as TVM's kernel."""
    target = load_preset("cuda-sm90").target
    for dtype in ("float16", "float32"):
        for sliding in (False, True):
            ours = decode_attention_gpu(32, 32, D, dtype, sliding, PAGE)
            theirs = _tvm_decode(32, dtype, sliding, target)
            assert ours.attrs["global_symbol"] == theirs.attrs["global_symbol"]
            assert ours.attrs["tirx.is_scheduled"]
            assert len(ours.params) == len(theirs.params) == 13
            for a, b in zip(ours.params, theirs.params, strict=True):
                assert a.name == b.name
                if getattr(b, "shape", None) is None:  # scalar
                    assert str(a.ty) == str(b.ty)
                    continue
                assert a.dtype == b.dtype
                assert [str(x) for x in a.shape] == [str(x) for x in b.shape]
                assert str(a.elem_offset) == str(b.elem_offset)
                assert str(a.elem_offset.ty) == str(b.elem_offset.ty)


def test_unsupported_shapes_return_none():
    assert decode_attention_gpu(8, 32, D, "float16", False, PAGE) is None  # GQA
    assert decode_attention_gpu(32, 32, 90, "float16", False, PAGE) is None  # head_dim not a multiple of 4
    assert decode_attention_gpu(32, 32, D, "int8", False, PAGE) is None


def _cuda_source(dtype: str = "float16") -> tuple[str, str]:
    """CUDA source of ours and of TVM's kernel for the Phi-3-mini shape on the sm_90 preset."""
    target = load_preset("cuda-sm90").target
    sources = []
    for func in (decode_attention_gpu(32, 32, D, dtype, False, PAGE), _tvm_decode(32, dtype, False, target)):
        built = tvm.compile(tvm.IRModule({"batch_decode_paged_kv": func}), target=target)
        sources.append(built.mod.imports[0].inspect_source())
    return sources[0], sources[1]


def test_cuda_launch_is_wider_and_has_no_barrier_in_the_token_loop():
    import re

    target = load_preset("cuda-sm90").target
    launches = {}
    for name, func in [
        ("ours", decode_attention_gpu(32, 32, D, "float16", False, PAGE)),
        ("tvm", _tvm_decode(32, "float16", False, target)),
    ]:
        (launch,) = describe(tvm.IRModule({"decode": func}), target)["decode"].kernels
        grid, block = launch.grid({"B": 1})
        launches[name] = (grid[0] * grid[1] * grid[2], block[0] * block[1] * block[2])
    assert launches["ours"] == (32, 1024)  # grid B x H_qo, 32 lanes x 32 groups
    assert launches["tvm"] == (32, 504)
    ours, _ = _cuda_source()
    # one __syncthreads (the final merge of the groups' states); the dot products reduce by warp shuffles
    assert ours.count("__syncthreads()") == 1 and "__shfl_down_sync" in ours
    loop = ours[ours.index("for (int step") : ours.index("__syncthreads()")]
    assert "__shared__" not in loop and re.search(r"__shfl_down_sync\(.*16, 32\)", loop)


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found: CUDA kernels can only be compile-checked with nvcc")
def test_nvcc_compiles_the_kernel_for_sm90():
    from toolkit.verify.cuda_check import compile_kernels

    ours, _ = _cuda_source()
    report = compile_kernels(ours, load_preset("cuda-sm90"))
    assert report.ok and report.compiled == ["batch_decode_paged_kv_kernel"], report


def _exported(variant: str, preset, tmp_path):
    """The tiny model's graph as a build for `preset` starts from it (pipeline.export_model)."""
    from tiny import make_tiny_checkpoint

    from toolkit.compile import pipeline
    from toolkit.compile.compile_model import graph_options
    from toolkit.config import load_hf_config

    cfg = load_hf_config(make_tiny_checkpoint(tmp_path / variant / preset.name, variant, tokenizer=False))
    mod, _ = pipeline.export_model(cfg, graph_options("q4f16_1", preset), preset.target)
    return cfg, {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def _same_kernel(a: tvm.tirx.PrimFunc, b: tvm.tirx.PrimFunc) -> bool:
    """Same parameters and body (attributes aside: the swap keeps TVM's)."""
    import tvm_ffi

    return tvm_ffi.structural_equal(list(a.params) + [a.body], list(b.params) + [b.body], map_free_vars=True)


def test_cuda_sm90_builds_run_our_decode_kernel(tmp_path):
    """The cuda-sm90 preset swaps ours in for both decode symbols; presets that keep TVM's kernel do."""
    preset = load_preset("cuda-sm90")
    assert preset.decode_attention == "ours"
    cfg, funcs = _exported("mini-4k", preset, tmp_path)
    for name in ("batch_decode_paged_kv", "batch_decode_paged_kv_sliding_window"):
        sliding = name.endswith("window")
        ours = decode_attention_gpu(
            cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, "float16", sliding, PAGE
        )
        assert _same_kernel(funcs[name], ours), name
        assert funcs[name].attrs["global_symbol"] == name
    kept = load_preset("cuda-sm80")
    assert kept.decode_attention == "tvm"
    _, funcs = _exported("mini-4k", kept, tmp_path)
    assert not _same_kernel(funcs["batch_decode_paged_kv"], ours)


def test_gqa_models_keep_tvms_decode_kernel(tmp_path):
    cfg, funcs = _exported("medium", load_preset("cuda-sm90"), tmp_path)
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    (launch,) = describe(
        tvm.IRModule({"d": funcs["batch_decode_paged_kv"]}), load_preset("cuda-sm90").target
    )["d"].kernels
    _, block = launch.grid({"B": 1})
    assert block[0] * block[1] * block[2] != 1024  # not ours (ours fills 1024 threads)


def test_decode_attention_key_is_validated(tmp_path):
    import json

    from toolkit.errors import UserError
    from toolkit.targets import _load

    for value, gpu in (("ours", False), ("fast", True)):
        d = json.loads(Path(load_preset("cuda-sm90" if gpu else "host").path).read_text())
        d["decode_attention"] = value
        path = tmp_path / f"{d['name']}.json"
        path.write_text(json.dumps(d))
        with pytest.raises(UserError, match="decode_attention"):
            _load(path)
