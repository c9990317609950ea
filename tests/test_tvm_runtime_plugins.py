"""TVM's own Vulkan and OpenCL runtimes as plugins (`phi3 runtime build`), and whole tiny models under them
on lavapipe (Vulkan) and PoCL (OpenCL) against `host-exact`.

The plugins need TVM's source, which CI cannot fetch: set PHI3_TVM_SOURCE to an apache/tvm checkout (the
wheel's commit, or close to it). They are built once into the toolkit cache and reused by later sessions;
without PHI3_TVM_SOURCE (or without the Debian packages) the tests that need them skip, saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from toolkit.bench import device_parity as dp  # noqa: E402
from toolkit.errors import UserError  # noqa: E402
from toolkit.runtime import plugins  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Tolerances on max |Δlogit| / max |logit| against host-exact (fp32 everywhere):
# - fp32 activations: the builds differ only in summation order (tree/split reductions on the GPU, serial on
#   the CPU). Reordering K terms moves a sum by ~sqrt(K) * eps32 * |terms|: K <= 256 here, eps 6e-8 -> 1e-6
#   per matmul, a few matmuls deep -> measured 1e-6; 1e-4 leaves a margin of ~50x and still catches any
#   indexing or synchronisation bug (those move logits by O(1)).
# - fp16 activations (q4f16_1 on the device, fp32 on host-exact): every activation is rounded to fp16
#   (eps 4.9e-4) and GPU reductions accumulate in fp16 over K <= 256 terms: ~sqrt(256) * 4.9e-4 = 8e-3
#   relative per matmul before the next RMSNorm rescales; measured up to 5e-3; 3e-2 bounds it with margin.
REL_TOL = {"float32": 1e-4, "float16": 3e-2}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


# -- without TVM's source -----------------------------------------------------------------------------------
def test_build_rejects_bad_flags_in_one_line(tmp_path):
    cases = [
        (["--tvm-source", str(tmp_path / "missing")], 1, "--tvm-source: not a folder"),
        (["--tvm-source", str(tmp_path)], 1, "not an apache/tvm source checkout"),
        (["--tvm-source", str(tmp_path), "--backends", "vulkan,cuda"], 2, "--backends"),
    ]
    for args, code, text in cases:
        r = _cli("runtime", "build", *args)
        assert r.returncode == code, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], r.stderr


def test_missing_headers_name_the_debian_packages(monkeypatch):
    # a header and a library no system has: what a machine without libvulkan-dev looks like to the check
    fake = plugins._Backend(
        "device_api.vulkan", "no/such_vulkan_header.h", "no_such_vulkan", ("libvulkan-dev",)
    )
    monkeypatch.setitem(plugins._SPEC, "vulkan", fake)
    with pytest.raises(UserError, match="install the Debian packages libvulkan-dev"):
        plugins.check_system(("vulkan",))


def test_vulkan_without_the_plugin_says_how_to_build_it(tmp_path):
    # an empty toolkit cache: no plugin for this wheel (unless the TVM build has the runtime compiled in)
    if tvm.get_global_func("device_api.vulkan", allow_missing=True) is not None:
        pytest.skip("this TVM build has its Vulkan runtime compiled in")
    r = _cli("generate", "--device", "vulkan", "--prompt", "hi", env={"PHI3_TOOLKIT_CACHE": str(tmp_path)})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "phi3 runtime build --tvm-source DIR --backends vulkan" in lines[0], r.stderr


def test_presets_that_cannot_run_here_say_why():
    from toolkit.runtime.engine import open_device
    from toolkit.targets import load_preset

    with pytest.raises(UserError, match="host code is aarch64"):
        open_device(load_preset("android-adreno"))
    with pytest.raises(UserError, match="phi3 compile --device iphone-a16"):
        open_device(load_preset("iphone-a16"))


# -- with the plugins ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def runtimes() -> dict[str, str]:
    """Load the plugins, building them once (cached for later sessions) from $PHI3_TVM_SOURCE."""
    missing = [b for b in plugins.BACKENDS if b not in plugins.available()]
    if missing:
        src = os.environ.get("PHI3_TVM_SOURCE")
        if not src:
            pytest.skip("TVM's Vulkan/OpenCL runtimes need TVM's source: set PHI3_TVM_SOURCE to a checkout")
        try:
            plugins.build_plugins(src, tuple(missing))
        except UserError as e:
            pytest.skip(f"cannot build TVM's runtimes here: {e}")
    loaded = plugins.load_plugins()
    assert set(loaded) == set(plugins.BACKENDS), loaded
    return loaded


@pytest.fixture(scope="session")
def devices(runtimes) -> dict:
    out = {}
    for b in plugins.BACKENDS:
        try:
            out[b] = plugins.require_device(b)
        except UserError as e:
            pytest.skip(str(e))
    return out


def test_runtimes_move_tensors_to_the_driver(devices):
    assert "llvmpipe" in devices["vulkan"].device_name  # Mesa lavapipe
    assert "pthread" in devices["opencl"].device_name  # PoCL's CPU device
    a = np.arange(1000, dtype="float32").reshape(10, 100)
    for dev in devices.values():
        np.testing.assert_array_equal(tvm.runtime.tensor(a, dev).numpy(), a)


def test_plugins_are_recorded_for_this_wheel(runtimes):
    rec = plugins.manifest()
    for b in plugins.BACKENDS:
        assert rec[b]["wheel"]["tvm"] == tvm.__version__
        assert (plugins.plugin_dir() / plugins.library_name(b)).is_file()


_COMPILED: dict[Path, object] = {}  # one compile per (checkpoint, quantization, preset) per session


def _engine(ckpt: Path, quantization: str, preset, out: Path, chunk: int = 8):
    from toolkit.checkpoint import open_model
    from toolkit.compile.compile_model import compile_model
    from toolkit.runtime.engine import CacheOptions, Engine, open_device
    from toolkit.runtime.weights import load_params
    from toolkit.targets import load_preset

    src = open_model(ckpt)
    if out not in _COMPILED:
        _COMPILED[out] = compile_model(src.config, quantization, preset, out)
    compiled = _COMPILED[out]
    dev = open_device(load_preset(preset) if isinstance(preset, str) else preset)
    lib = tvm.runtime.load_module(str(compiled.library))
    params = load_params(src, compiled, dev)
    cache = CacheOptions(prefill_chunk=chunk)
    eng = Engine(lib, params, src.config, dtype=compiled.manifest["dtype"], device=dev, cache=cache)
    eng.compiled = compiled
    return eng


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("rt")
    return {v: make_tiny_checkpoint(root / v, v) for v in ("mini-4k", "mini-128k", "medium")}, root


def _parity(tiny, variant: str, quantization: str, device, sizes: tuple[int, int, int]) -> dp.Parity:
    ckpts, root = tiny
    ref_eng = _engine(ckpts[variant], quantization, "host-exact", root / f"{variant}-{quantization}-host")
    sc = dp.scenario_for(ref_eng.cfg.vocab_size, *sizes)
    ref, forced = dp.run(ref_eng, sc)
    name = device if isinstance(device, str) else f"{device.name}-{device.decode_attention}"
    eng = _engine(ckpts[variant], quantization, device, root / f"{variant}-{quantization}-{name}")
    got, _ = dp.run(eng, sc, forced)
    return dp.compare(ref, got)


def test_whole_model_on_lavapipe_matches_host_exact(tiny, devices):
    """q4f32_1, sliding-window model inside its window: chunked prefill (8 + 3), decode, then two sequences
    in one batch_decode, all on lavapipe through TVM's Vulkan runtime."""
    p = _parity(tiny, "mini-4k", "q4f32_1", "vulkan", (11, 5, 4))
    assert p.rows == 9
    assert p.rel <= REL_TOL["float32"], (p.max_abs_diff, p.max_abs_ref, p.worst_row)
    assert p.agreement == 1.0


def test_sampling_on_lavapipe_draws_the_host_samplers_tokens(tiny, devices):
    """The engine's device sampler (runtime/device_sampling.py) on lavapipe: softmax, the top-k / top-p /
    min-p cuts, the running sums and the id-order draw as Vulkan kernels. Greedy and seeded tokens with and
    without the cuts equal host sampling of the same library's logits, decoding two sequences in one
    batch and each alone, through the fused steps (decode_and_sample, batch_decode_and_sample); with a bias
    and penalties, through adjust_logits before sample_tokens."""
    from toolkit.runtime.device_sampling import DeviceSampler
    from toolkit.runtime.options import GenerationOptions
    from toolkit.runtime.sampling import TokenSampler

    ckpts, root = tiny
    eng = _engine(ckpts["mini-4k"], "q4f32_1", "vulkan", root / "mini-4k-q4f32_1-vulkan")
    eng.sampler = DeviceSampler(eng.vm, eng.device, eng.cache_opts.max_batch_size)
    assert set(eng._fused) == {"decode", "batch_decode"}
    prompt = [5, 17, 99, 3, 250, 11, 42]
    cases = [
        dict(temperature=0),
        dict(temperature=0.8, top_p=1.0, seed=1),
        dict(temperature=1.2, top_p=1.0, seed=2),
        dict(temperature=0.7, top_p=0.95, seed=3),  # the defaults
        dict(temperature=1.5, top_p=0.5, seed=4),
        dict(temperature=1.5, top_p=0.95, top_k=40, min_p=0.05, seed=5),
        # bias and penalties first (adjust_logits)
        dict(temperature=1.1, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3, seed=6),
        dict(temperature=0, repetition_penalty=2.0, logit_bias={7: 1.5, 99: -3.0}),
    ]

    def took(s, tok: int) -> int:  # the token, counted for the penalties as Generation.step counts it
        s.accept(tok)
        return tok

    for case in cases:
        opts = GenerationOptions(**case)
        host_s = [TokenSampler(opts, prompt) for _ in range(2)]
        dev_s = [TokenSampler(opts, prompt) for _ in range(2)]
        host = [eng.add_sequence() for _ in range(2)]
        dev = [eng.add_sequence() for _ in range(2)]
        try:
            toks_h = [[took(host_s[i], host_s[i](eng.prefill(host[i], prompt[: 5 + i])))] for i in range(2)]
            toks_d = [
                [took(dev_s[i], eng.prefill(dev[i], prompt[: 5 + i], draw=dev_s[i].device_draw()))]
                for i in range(2)
            ]
            for step in range(6):
                if step % 2:  # each alone: decode_and_sample, or with bias / penalties decode + adjust_logits
                    for i in range(2):
                        toks_h[i].append(took(host_s[i], host_s[i](eng.decode(host[i], toks_h[i][-1]))))
                        tok = eng.decode(dev[i], toks_d[i][-1], dev_s[i].device_draw())
                        toks_d[i].append(took(dev_s[i], tok))
                    continue
                rows = eng.decode_batch(host, [t[-1] for t in toks_h])
                for i in range(2):
                    toks_h[i].append(took(host_s[i], host_s[i](rows[i])))
                drawn = eng.decode_batch(dev, [t[-1] for t in toks_d], [s.device_draw() for s in dev_s])
                for i in range(2):
                    toks_d[i].append(took(dev_s[i], drawn[i]))
        finally:
            for sid in host + dev:
                eng.remove_sequence(sid)
        assert toks_d == toks_h, (case, toks_h, toks_d)


def test_mlc_sampler_functions_through_the_vm_on_lavapipe(devices, tmp_path):
    """multinomial_from_uniform, sample_with_top_p and renormalize_by_top_p as MLC's engine calls them
    (through the VM, on the device) on lavapipe, against numpy. Their running sums are ours
    (compile/prefix_sum.py): with TVM's GPU scan multinomial_from_uniform drew 64 / 227 / 440
    where 79 / 342 / 693 were right. sample_with_top_p compares an int32 count widened to int64 with a
    constant, which lavapipe answered wrongly until codegen_glsl built the widening from its two halves
    (it drew the last-ranked token every time)."""
    import sampling_refs as ref
    from tvm import IRModule, relax

    from toolkit.backends import vulkan  # noqa: F401  (registers target.build.vulkan)
    from toolkit.compile import pipeline
    from toolkit.compile.attach_sampling import attach_sampling_functions
    from toolkit.compile.compile_model import export_library, schedule_fn
    from toolkit.targets import load_preset

    v, dev, preset = 777, devices["vulkan"], load_preset("vulkan")
    mod = attach_sampling_functions(
        IRModule(), preset.target, vocab_size=v, hidden_size=16, dtype="float32", prefill_chunk_size=8
    )
    ex, _ = pipeline.build(mod, preset.target, schedule_fn(preset))
    export_library(ex, tmp_path / "lib.so", preset)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "lib.so")), dev)
    rng = np.random.default_rng(0)
    probs = ref.random_probs(rng, 2, v)
    uniform, rows = np.array([0.1, 0.5, 0.9, 0.3], np.float32), np.array([0, 0, 1, 1], np.int32)
    t = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
    got = vm["multinomial_from_uniform"](t(probs), t(uniform), t(rows)).numpy()
    np.testing.assert_array_equal(got, ref.multinomial(probs, uniform, rows))
    top_p = np.array([0.9, 0.5], np.float32)
    ids = np.argsort(-probs, axis=1, kind="stable").astype(np.int32)
    ranked = np.take_along_axis(probs, ids, 1)
    for tp in ([0.5, 0.999], [0.05, 0.9]):
        tp = np.array(tp, np.float32)
        got = vm["sample_with_top_p"](t(ranked), t(ids), t(uniform), t(rows), t(tp)).numpy()
        np.testing.assert_array_equal(got, ref.sample_with_top_p(ranked, ids, uniform, rows, tp))
    got = vm["renormalize_by_top_p"](t(probs), t(top_p), t(np.zeros((2, 3), np.float32))).numpy()
    expected = ref.renormalize_by_top_p(probs, top_p)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert ((got > 0) == (expected > 0)).all()


def test_wheel_bug_gpu_scan_races(devices, tmp_path):
    """Why attach_sampling has its own running sums: TVM's GPU cumsum (DispatchSortScan) adds a neighbour's
    shared-memory entry while that neighbour rewrites it, right only where 32 threads run in lockstep. On
    lavapipe and PoCL it sums wrongly. When this fails, the wheel's scan is right here and the kernel in
    compile/prefix_sum.py can give way to it."""
    from tvm import relax

    from toolkit.backends import vulkan  # noqa: F401  (registers target.build.vulkan)
    from toolkit.compile import pipeline
    from toolkit.compile.compile_model import export_library, schedule_fn
    from toolkit.targets import load_preset

    a = np.random.default_rng(0).random((2, 777), dtype=np.float32)
    for name in ("vulkan", "opencl"):
        preset = load_preset(name)
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((tvm.tirx.Var("n", "int64"), 777), "float32"))
        with bb.function("cumsum", [x]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.cumsum(x, axis=-1))
            bb.emit_func_output(out)
        ex, _ = pipeline.build(bb.get(), preset.target, schedule_fn(preset))
        export_library(ex, tmp_path / f"{name}.so", preset)
        dev = devices[preset.kind]
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / f"{name}.so")), dev)
        got = vm["cumsum"](tvm.runtime.tensor(a, dev)).numpy()
        assert np.abs(got - np.cumsum(a, axis=1)).max() > 0.1, name


CASES = [
    ("mini-4k", "q4f16_1", "vulkan", (11, 5, 4)),
    ("mini-4k", "q0f32", "vulkan", (11, 5, 4)),
    ("mini-128k", "q4f32_1", "vulkan", (12, 5, 7)),  # crosses LongRoPE's original_max (16) while decoding
    ("mini-128k", "q4f16_1", "vulkan", (12, 5, 7)),
    ("medium", "q4f32_1", "vulkan", (20, 7, 4)),
    ("medium", "q4f16_1", "vulkan", (20, 7, 4)),
    # PoCL: fp32 activations only (no cl_khr_fp16)
    ("mini-4k", "q4f32_1", "opencl", (11, 5, 4)),
    ("mini-4k", "q0f32", "opencl", (11, 5, 4)),
    ("mini-128k", "q4f32_1", "opencl", (12, 5, 7)),
    # head_dim 16: PoCL miscompiles the wheel's ragged-prefill kernel; ours is right (kv_kernels.py)
    ("medium", "q4f32_1", "opencl", (20, 7, 4)),
    # GGUF blocks (quantized by gguf-py): fp16 on lavapipe, the fp32 twin on PoCL
    ("mini-4k", "gguf_q4_1-q8_0", "vulkan", (11, 5, 4)),
    ("mini-4k", "gguf_q4_1-q8_0_f32", "opencl", (11, 5, 4)),
    ("medium", "gguf_q4_0_f32", "opencl", (20, 7, 4)),
]


@pytest.mark.slow
@pytest.mark.parametrize("variant,quantization,device,sizes", CASES)
def test_whole_model_variants_match_host_exact(tiny, devices, variant, quantization, device, sizes):
    p = _parity(tiny, variant, quantization, device, sizes)
    from toolkit.quantization import get_scheme

    act = get_scheme(quantization).model_dtype
    print(
        f"{variant} {quantization} {device}: max|dlogit| {p.max_abs_diff:.3g}, max|logit| {p.max_abs_ref:.3g}"
    )
    assert p.rel <= REL_TOL[act], (p.max_abs_diff, p.max_abs_ref, p.worst_row)
    assert p.agreement == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant,quantization,device,sizes",
    [("mini-4k", "q4f32_1", "opencl", (11, 5, 4)), ("mini-4k", "q4f16_1", "vulkan", (11, 5, 4))],
)
def test_whole_model_with_our_decode_attention_matches_host_exact(
    tiny, devices, variant, quantization, device, sizes
):
    """Our GPU decode attention (compile/gpu_decode_attention.py, cuda-sm90's choice) inside a whole model,
    through TVM's runtime and the paged KV cache: single and batched decode against host-exact."""
    import dataclasses

    import tvm_ffi

    from toolkit.compile import pipeline
    from toolkit.compile.compile_model import graph_options
    from toolkit.compile.gpu_decode_attention import decode_attention_gpu
    from toolkit.config import load_hf_config
    from toolkit.targets import load_preset

    preset = dataclasses.replace(load_preset(device), decode_attention="ours")
    cfg = load_hf_config(tiny[0][variant])
    mod, _ = pipeline.export_model(cfg, graph_options(quantization, preset), preset.target)
    (decode,) = [f for gv, f in mod.functions.items() if gv.name_hint == "batch_decode_paged_kv"]
    page_size = int(decode.params[1].shape[3])
    threads = min(int(preset.target.attrs["max_num_threads"]), 1024)
    ours = decode_attention_gpu(
        cfg.num_key_value_heads,
        cfg.num_attention_heads,
        cfg.head_dim,
        str(decode.params[0].dtype),
        False,
        page_size,
        threads,
    )
    assert tvm_ffi.structural_equal(
        [*decode.params, decode.body], [*ours.params, ours.body], map_free_vars=True
    )
    p = _parity(tiny, variant, quantization, preset, sizes)
    assert p.rel <= REL_TOL[graph_options(quantization, preset).dtype], (
        p.max_abs_diff,
        p.max_abs_ref,
        p.worst_row,
    )
    assert p.agreement == 1.0


def test_wheel_bug_batched_decode_with_cache_sliding_window(tiny, devices):
    """apache-tvm 0.27.0.post1: a paged KV cache created with sliding-window support on a device that gets
    the plain aux-data manager (all but CPU/CUDA/ROCm) cannot decode two sequences in one forward:
    CopyVecDataToArray (src/runtime/vm/attn_utils.h) copies each of the three length-info rows into the
    [3, n] view with ndim set to 1 but the view's strides [n, 1] kept, so the copy's destination looks strided
    and DeviceAPI::CopyDataFromTo refuses it. One sequence (n = 1) passes. Our engine creates its caches
    without that support (KV_SLIDING_WINDOW_SUPPORT = 0), and then the same batch decode is right."""
    from tvm.runtime import ShapeTuple

    from toolkit.runtime.engine import KV_SLIDING_WINDOW_SUPPORT

    assert KV_SLIDING_WINDOW_SUPPORT == 0
    ckpts, root = tiny
    eng = _engine(ckpts["mini-4k"], "q4f32_1", "vulkan", root / "mini-4k-q4f32_1-vulkan")
    f = tvm.get_global_func
    kv = eng.vm["create_tir_paged_kv_cache"](
        ShapeTuple([4]), ShapeTuple([4 * 64]), ShapeTuple([8]), ShapeTuple([16]), ShapeTuple([1])
    )
    begin, end = f("vm.builtin.kv_state_begin_forward"), f("vm.builtin.kv_state_end_forward")
    for sid, prompt in ((0, [5, 6, 7]), (1, [9, 10])):
        f("vm.builtin.kv_state_add_sequence")(kv, sid)
        begin(kv, ShapeTuple([sid]), ShapeTuple([len(prompt)]))
        _, kv = eng._fn["prefill"](eng._embed(prompt, (1, len(prompt))), kv, eng.params)  # one sequence: fine
        end(kv)
    with pytest.raises(Exception, match="only support contiguous array"):
        begin(kv, ShapeTuple([0, 1]), ShapeTuple([1, 1]))
        eng._fn["batch_decode"](eng._embed([11, 12], (2, 1)), kv, eng.params)
    # the engine's own cache (no sliding-window support): the same two sequences, one batch decode, right
    ref = _engine(ckpts["mini-4k"], "q4f32_1", "host-exact", root / "mini-4k-q4f32_1-host")
    outs = []
    for e in (eng, ref):
        a, b = e.add_sequence(), e.add_sequence()
        e.prefill(a, [5, 6, 7])
        e.prefill(b, [9, 10])
        outs.append(e.decode_batch([a, b], [11, 12]))
    assert np.abs(outs[0] - outs[1]).max() <= REL_TOL["float32"] * np.abs(outs[1]).max()


@pytest.mark.parametrize("backend", ["opencl", "vulkan"])
def test_attention_merge_kernel_has_no_race(devices, backend, tmp_path):
    """The wheel's GPU merge kernel (chunked prefill) lets every thread of a head read and then overwrite
    S[n, h] without a barrier: PoCL runs a group's work-items one after another and gets it wrong. Ours
    (toolkit/model/kv_kernels.py) matches numpy on both runtimes; the wheel's is shown wrong on PoCL."""
    from toolkit.model.kv_kernels import _ORIGINAL, merge_state_inplace
    from toolkit.targets import load_preset
    from toolkit.verify.runtime_check import merge_state_reference

    if backend == "vulkan":
        import toolkit.backends.vulkan  # noqa: F401  (our target.build.vulkan)
    target = load_preset(backend).target
    rng = np.random.default_rng(0)
    n, h, d = 5, 4, 32
    v, vo = (rng.standard_normal((n, h, d)).astype("float32") for _ in range(2))
    s, so = (rng.standard_normal((n, h)).astype("float32") for _ in range(2))
    ref_v, ref_s = merge_state_reference(v, s, vo, so)
    errors = {}
    for name, make in (("ours", merge_state_inplace), ("wheel", _ORIGINAL)):
        built = tvm.compile(tvm.IRModule({"merge": make(h, d, "float32", target, "merge")}), target=target)
        built.export_library(str(tmp_path / f"{name}.so"))
        lib = tvm.runtime.load_module(str(tmp_path / f"{name}.so"))
        args = [tvm.runtime.tensor(x, devices[backend]) for x in (v, s, vo, so)]
        lib["merge"](*args)
        errors[name] = max(np.abs(args[0].numpy() - ref_v).max(), np.abs(args[1].numpy() - ref_s).max())
    assert errors["ours"] < 1e-5, errors  # fp32 exp2/log2/division rounding only
    if backend == "opencl":
        assert errors["wheel"] > 0.1, errors  # the race, reproduced


@pytest.mark.slow
@pytest.mark.parametrize(
    "device,quantization",
    [
        ("vulkan", "q4f32_1"),
        ("opencl", "q4f32_1"),
        # fp16 activations and KV pages on the device, fp32 in the host-exact build that records the inputs
        ("vulkan", "q4f16_1"),
        ("vulkan", "gguf_q4_1-q8_0"),
    ],
)
def test_verify_runs_every_kernel_through_the_runtime(tiny, devices, device, quantization):
    """`phi3 verify` on a library of the device preset: every kernel, TVM's paged-attention ones included,
    called in the library through TVM's runtime on the inputs the host-exact build's kernels received (cast
    to the kernel's own dtypes for fp16 libraries)."""
    from toolkit.quantization import get_scheme
    from toolkit.verify.verify import verify_model

    ckpts, root = tiny
    out = root / f"mini-4k-{quantization}-{device}"
    eng = _engine(ckpts["mini-4k"], quantization, device, out)
    assert eng.compiled.manifest["dtype"] == get_scheme(quantization).model_dtype
    report = verify_model(out)
    assert report.backend == f"{device} (TVM runtime plugin)"
    assert report.ok, [(c.func, c.status, c.note) for c in report.checks if c.status not in ("ok", "not-run")]
    ok = {c.func for c in report.checks if c.status == "ok"}
    attention = {"batch_prefill_ragged_kv", "batch_prefill_paged_kv", "batch_decode_paged_kv"}
    assert attention | {"tir_attention_merge_state", "tir_kv_cache_transpose_append"} <= ok, sorted(ok)


def _rms_norm_lib(dtype: str):
    from toolkit.verify.sample_kernels import rms_norm

    func = rms_norm(64, dtype).with_attr("global_symbol", "rms_norm")
    built = tvm.compile(tvm.IRModule({"rms_norm": func}), target="llvm")
    return func, built["rms_norm"]


def test_runtime_check_casts_recorded_inputs_to_the_kernel_dtypes():
    """An fp16 kernel checked on an fp32 host call (what `phi3 verify` does for q4f16_1 on a runtime plugin):
    its inputs are the recorded ones cast to fp16, the reference is the fp32 host kernel rerun on those
    values, and the fp16 tolerance applies. A right fp16 kernel passes; one off in a single element by a
    tenth of the output's range (5x the fp16 tolerance, far below what an indexing bug does) is a mismatch.
    Both run on the CPU (llvm): the comparison, not the device, is under test here."""
    from toolkit.verify.runtime_check import _check, in_kernel_dtypes

    rng = np.random.default_rng(0)
    _, host_fn = _rms_norm_lib("float32")
    func16, fn16 = _rms_norm_lib("float16")
    x, w = rng.standard_normal((1, 5, 64)).astype("float32"), rng.uniform(0.5, 1.5, 64).astype("float32")
    before = [x, w, np.full((1, 5, 64), np.nan, "float32")]  # the output: uninitialised memory
    args = [tvm.runtime.tensor(a) for a in before]
    host_fn(*args)
    after = [a.numpy() for a in args]

    inputs, ref = in_kernel_dtypes(func16, host_fn, before, after)
    assert [a.dtype for a in inputs] == [np.float16] * 3
    assert [a.dtype for a in ref] == [np.float32] * 3
    np.testing.assert_array_equal(ref[0], x.astype("float16").astype("float32"))  # the same values
    good = _check("rms_norm", fn16, func16, inputs, ref, tvm.cpu(), "llvm")
    assert good.status == "ok", good.note
    assert 0 < good.error <= good.tolerance
    assert good.tolerance == pytest.approx(2e-2 * max(1.0, float(np.abs(ref[2]).max())))  # fp16's

    def wrong(*a):
        fn16(*a)
        out = a[2].numpy()
        out[0, 3, 17] += 0.1 * np.abs(out).max()
        a[2].copyfrom(out)

    bad = _check("rms_norm", wrong, func16, inputs, ref, tvm.cpu(), "llvm")
    assert bad.status == "mismatch" and bad.error > bad.tolerance, (bad.error, bad.tolerance)
    # an fp32 kernel on an fp32 call: inputs and reference as recorded, no rerun
    func32, fn32 = _rms_norm_lib("float32")
    same = in_kernel_dtypes(func32, host_fn, before, after)
    assert same[0] is before and same[1] is after


def test_runtime_check_uses_a_host_call_only_where_its_shapes_fit():
    """FuseOps numbers twin functions (rms_norm, rms_norm1, ...) in the order each graph emits them, and the
    fp16 and fp32 builds emit prefill's and decode's in different orders: a namesake whose arguments do not
    fit the device kernel is not its reference (the kernel is checked against its own TIR instead)."""
    from tvm.script import tirx as T

    from toolkit.verify.runtime_check import fits, host_call_for

    @T.prim_func
    def decode_shaped(x: T.handle, y: T.handle):
        b = T.int64()
        X = T.match_buffer(x, (b, 1, 8), "float16")
        Y = T.match_buffer(y, (b, 1, 8), "float16")
        for i in range(b):
            Y[i, 0, 0] = X[i, 0, 0]

    prefill = [np.zeros((1, 7, 8), "float32"), np.zeros((1, 7, 8), "float32")]
    decode = [np.zeros((2, 1, 8), "float32"), np.zeros((2, 1, 8), "float32")]
    assert fits(decode_shaped, decode) and not fits(decode_shaped, prefill)
    assert not fits(decode_shaped, [decode[0], np.zeros((3, 1, 8), "float32")])  # b bound once
    assert not fits(decode_shaped, decode[:1])
    calls = {"rms_norm": (("f0", prefill, prefill), ""), "rms_norm1": (("f1", decode, decode), "")}
    assert host_call_for("rms_norm", decode_shaped, calls) is None
    assert host_call_for("rms_norm1", decode_shaped, calls)[0][0] == "f1"
    assert host_call_for("softmax", decode_shaped, calls) is None
