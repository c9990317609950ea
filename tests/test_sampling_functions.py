"""The sampling functions MLC-LLM's engine looks up (toolkit/compile/attach_sampling.py) against numpy.

Host: the whole Relax functions through our pipeline, relax.build and the VM, found the way the engine finds
them (VM functions, then the library's imports). GPUs: our kernels scheduled for each preset and run on the
GPU APIs this machine has (WGSL on wgpu/lavapipe, OpenCL C on PoCL), nvcc for CUDA, MSL parsed for Metal.
On GPUs the sort is ours (bitonic, toolkit/compile/gpu_sort.py) and runs here launch by launch; the running
sums are ours too (reductions, `prefix_sum`: TVM's scan gave wrong sums through the Vulkan runtime), and
these tests feed the kernels after them numpy running sums; tests/test_tvm_runtime_plugins.py runs whole
functions through the VM on lavapipe.

Tolerances: probabilities come from fp32 exp/sum over v = 777 values: reordering changes a sum by about
sqrt(v) * 6e-8 = 1.7e-6 relative, so rtol 1e-5 leaves ~6x. Logit updates are one to three fp32 operations;
GPU division may be 2.5 ulp (OpenCL) and llvm may fuse the multiply-add, so rtol 1e-6 (~8 ulp). Gathers,
masks and sampled token ids are exact.
"""

from __future__ import annotations

import shutil
from functools import cache

import gpu_apis
import numpy as np
import pytest
import sampling_refs as ref
import tvm
from tvm import IRModule, relax
from tvm.target import Target

from toolkit.compile import pipeline
from toolkit.compile.attach_sampling import ENGINE_SAMPLER_NAMES, GPU_SAMPLER_NAMES, attach_sampling_functions
from toolkit.compile.compile_model import schedule_fn
from toolkit.compile.gpu_schedule import check_thread_bindings
from toolkit.compile.gpu_sort import padded_length, stages
from toolkit.compile.kernel_info import describe
from toolkit.compile.logit_processor import NAMES as PROCESSORS
from toolkit.compile.spec_verify import spec_verify
from toolkit.targets import Preset, load_preset
from toolkit.verify.verify import RUN_TARGETS, build_runner, retarget

V, HIDDEN, CHUNK = 777, 16, 8  # odd vocabulary: partial thread blocks and a partial bitmask word
P_RTOL, P_ATOL, LOGIT_RTOL = 1e-5, 1e-9, 1e-6
HAS_NVCC = shutil.which("nvcc") is not None


def _attach(target: Target, gpu_sampler: bool | None = None) -> IRModule:
    return attach_sampling_functions(
        IRModule(),
        target,
        vocab_size=V,
        hidden_size=HIDDEN,
        dtype="float32",
        prefill_chunk_size=CHUNK,
        gpu_sampler=gpu_sampler,
    )


# -- host: the Relax functions through the VM ---------------------------------------------------------------
@pytest.fixture(scope="module")
def host():
    preset = load_preset("host")
    # the GPU sampler too: its Relax graphs (with TVM's CPU sort/scan) are the same on every target
    ex, _ = pipeline.build(_attach(preset.target, gpu_sampler=True), preset.target, schedule_fn(preset))
    vm = relax.VirtualMachine(ex, tvm.cpu())

    def lookup(name: str):
        # as cpp/serve/function_table.cc: GetFunction(name, /*query_imports=*/true)
        return vm.module.get_function(name, query_imports=True)

    return lookup


def _t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _np(x) -> np.ndarray:
    return x.numpy()


def test_the_engine_finds_every_function(host):
    for name in ("softmax_with_temperature", "alloc_embedding_tensor", *PROCESSORS):
        assert host(name) is not None, name


def test_softmax_with_temperature(host):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 1, V)) * 3).astype(np.float32)
    logits[2, 0, [10, 500]] = logits[2].max() + 1  # a tie for the greedy row
    temperature = np.array([1.0, 0.7, 0.0, 1e-6, 2.0], np.float32)
    probs = _np(host("softmax_with_temperature")(_t(logits), _t(temperature)))
    assert probs.shape == (5, 1, V) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, ref.softmax_with_temperature(logits, temperature), P_RTOL, P_ATOL)
    assert probs[2, 0, 10] == probs[2, 0, 500] == 0.5 and np.count_nonzero(probs[2]) == 2
    assert probs[3, 0, logits[3, 0].argmax()] == 1.0 and np.count_nonzero(probs[3]) == 1


def _processor_inputs(rng: np.random.Generator):
    logits = (rng.standard_normal((4, V)) * 3).astype(np.float32)
    bias = (
        np.array([0, 0, 3, 1], np.int32),  # pos2seq_id
        np.array([5, 776, 0, 300], np.int32),  # token_ids
        np.array([1.5, -100.0, 0.25, 7.0], np.float32),
    )
    penalty = (
        np.array([1, 3], np.int32),  # seq_ids: rows of logits
        np.array([0, 0, 1, 1, 1], np.int32),  # pos2seq_id: index into seq_ids / penalties
        np.array([3, 700, 3, 9, 776], np.int32),
        np.array([1, 4, 2, 1, 3], np.int32),
        np.array([[0.5, 0.1, 1.3], [0.0, 0.25, 0.8]], np.float32),  # presence, frequency, repetition
    )
    allowed = rng.random((4, V)) < 0.3
    mask = (np.array([0, 2], np.int32), ref.pack_bitmask(allowed))
    return logits, bias, penalty, mask


def test_logit_processors(host):
    logits, bias, penalty, mask = _processor_inputs(np.random.default_rng(1))
    out = _t(logits)
    host("apply_logit_bias_inplace")(out, *map(_t, bias))
    np.testing.assert_array_equal(_np(out), ref.logit_bias(logits, *bias))
    out = _t(logits)
    host("apply_penalty_inplace")(out, *map(_t, penalty))
    expected = ref.penalty(logits, *penalty)
    np.testing.assert_allclose(_np(out), expected, rtol=LOGIT_RTOL)
    assert not np.array_equal(expected, logits)
    out = _t(logits)
    host("apply_bitmask_inplace")(out, *map(_t, mask))
    np.testing.assert_array_equal(_np(out), ref.bitmask(logits, *mask))
    assert (_np(out)[1] == logits[1]).all() and (_np(out)[0] == ref.F32_LOWEST).sum() > V // 2


def test_alloc_embedding_tensor(host):
    buf = host("alloc_embedding_tensor")()
    assert tuple(buf.shape) == (CHUNK, HIDDEN) and str(buf.dtype) == "float32"


def _multinomial_inputs(rng: np.random.Generator):
    probs = ref.random_probs(rng, 3, V)
    probs[1, :4] = 0  # leading zeros: u = 0 must skip them
    probs[2] *= 0.5  # a row summing to 0.5: u above it falls through to the last token
    cs = np.cumsum(probs.astype(np.float64), axis=1)
    wide = [int(j) for j in np.argsort(-probs[0])[:3]]
    uniform = [ref.midpoint_uniform(cs[0], j) for j in wide] + [0.0, 0.9]
    return probs, np.array(uniform, np.float32), np.array([0, 0, 0, 1, 2], np.int32)


def test_multinomial_from_uniform(host):
    probs, uniform, rows = _multinomial_inputs(np.random.default_rng(2))
    got = _np(host("multinomial_from_uniform")(_t(probs), _t(uniform), _t(rows)))
    np.testing.assert_array_equal(got, ref.multinomial(probs, uniform, rows))
    assert got[3] == 4 and got[4] == V - 1


def test_argsort_probs(host):
    probs = ref.random_probs(np.random.default_rng(3), 3, V)
    values, order = host("argsort_probs")(_t(probs))
    expected = np.argsort(-probs, axis=1, kind="stable")
    np.testing.assert_array_equal(_np(order), expected)
    np.testing.assert_array_equal(_np(values), np.take_along_axis(probs, expected, 1))


def _top_p_inputs(rng: np.random.Generator):
    probs = ref.random_probs(rng, 2, V)
    ids = np.argsort(-probs, axis=1, kind="stable").astype(np.int32)
    sorted_probs = np.take_along_axis(probs, ids, 1)
    top_p = np.array([0.5, 0.999], np.float32)
    cs = np.cumsum(sorted_probs.astype(np.float64), axis=1)
    kept = int((cs[0] < top_p[0]).sum())
    mass = cs[0, kept]
    # inside the kept prefix, the last kept position, and u -> 1 (must stay inside the prefix)
    uniform = [ref.midpoint_uniform(cs[0], 0, mass), ref.midpoint_uniform(cs[0], kept, mass), 0.9999]
    uniform.append(ref.midpoint_uniform(cs[1], 1, cs[1, int((cs[1] < top_p[1]).sum())]))
    return sorted_probs, ids, np.array(uniform, np.float32), np.array([0, 0, 0, 1], np.int32), top_p, kept


def test_sample_with_top_p(host):
    sorted_probs, ids, uniform, rows, top_p, kept = _top_p_inputs(np.random.default_rng(4))
    got = _np(host("sample_with_top_p")(*map(_t, (sorted_probs, ids, uniform, rows, top_p))))
    np.testing.assert_array_equal(got, ref.sample_with_top_p(sorted_probs, ids, uniform, rows, top_p))
    assert got[0] == ids[0, 0] and got[1] == got[2] == ids[0, kept]


def _take_inputs(rng: np.random.Generator):
    probs = ref.random_probs(rng, 3, V)
    ids = np.argsort(-probs, axis=1, kind="stable").astype(np.int32)
    rows, results = np.array([2, 0], np.int32), np.array([776, 13], np.int32)
    offsets = np.array([0, 1, 2 * V + 4, V + 776], np.int32)  # row * v + rank
    return probs, ids, rows, results, offsets


def _take_expected(probs, ids, rows, results, offsets):
    r, k = offsets // V, offsets % V
    return probs[rows, results], probs[r, ids[r, k]], ids[r, k]


def test_sampler_take_probs(host):
    args = _take_inputs(np.random.default_rng(5))
    got = host("sampler_take_probs")(*map(_t, args))
    for g, e in zip(got, _take_expected(*args), strict=True):
        np.testing.assert_array_equal(_np(g), e)


def _renorm_inputs(rng: np.random.Generator):
    probs = ref.random_probs(rng, 3, V)
    probs[2] = 0
    probs[2, :6] = [0.3, 0.2, 0.2, 0.2, 0.05, 0.05]  # top_p 0.6 cuts inside the 0.2 ties: all three stay
    top_p = np.array([0.8, 1.0, 0.6], np.float32)
    pivots = np.zeros((3, 3), np.float32)
    return probs, top_p, pivots


def test_renormalize_by_top_p(host):
    probs, top_p, pivots = _renorm_inputs(np.random.default_rng(6))
    got = _np(host("renormalize_by_top_p")(*map(_t, (probs, top_p, pivots))))
    np.testing.assert_allclose(got, ref.renormalize_by_top_p(probs, top_p), P_RTOL, P_ATOL)
    np.testing.assert_array_equal(got[1], probs[1])  # top_p = 1: unchanged
    np.testing.assert_allclose(got[2, :4], [0.3 / 0.9, 0.2 / 0.9, 0.2 / 0.9, 0.2 / 0.9], rtol=P_RTOL)
    assert (got[2, 4:] == 0).all() and 0 < np.count_nonzero(got[0]) < V


# -- GPU presets -----------------------------------------------------------------------------------------
@cache
def _scheduled(preset_name: str) -> IRModule:
    preset = load_preset(preset_name)
    if preset.kind == "vulkan":
        from toolkit.backends import vulkan  # noqa: F401  (registers target.build.vulkan)
    lowered = pipeline.lower_to_tir(_attach(preset.target), preset.target)
    with preset.target:
        return schedule_fn(preset)(lowered)


@pytest.mark.parametrize(
    ("preset_name", "samplers"),
    [
        ("webgpu", [n for n in GPU_SAMPLER_NAMES if n != "sampler_verify_draft_tokens"]),
        # Metal's kernels also run (as WGSL) and parse by default below; this binding check with --runslow
        pytest.param("iphone-a16", list(GPU_SAMPLER_NAMES), marks=pytest.mark.slow),
        ("cuda-sm80", list(GPU_SAMPLER_NAMES)),
        ("vulkan", list(GPU_SAMPLER_NAMES)),
        ("android-adreno", []),  # MLC's engine uses the GPU sampler on cuda, metal, vulkan and webgpu only
    ],
)
def test_gpu_presets_get_thread_bound_kernels(preset_name, samplers):
    scheduled = _scheduled(preset_name)
    check_thread_bindings(scheduled)  # raises if any kernel would run as host code
    names = {gv.name_hint for gv in scheduled.get_global_vars()}
    ours = list(ENGINE_SAMPLER_NAMES) if samplers else []  # the engine's own, wherever the GPU sampler is
    expected = {"softmax_with_temperature", "alloc_embedding_tensor", *PROCESSORS, *samplers, *ours}
    everything = set(GPU_SAMPLER_NAMES) | set(ENGINE_SAMPLER_NAMES)
    assert expected <= names and not (everything - set(samplers) - set(ours)) & names


@pytest.mark.parametrize(
    "preset_name",
    [
        "webgpu",  # by default; the other two builds (11 s and 16 s on a loaded 2-core box) with --runslow
        pytest.param("cuda-sm80", marks=pytest.mark.slow),
        pytest.param(
            "vulkan",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    shutil.which("glslangValidator") is None,
                    reason="glslangValidator not found (glslang-tools)",
                ),
            ],
        ),
    ],
)
def test_relax_build_for_gpu_presets(preset_name):
    """Codegen of the Relax side too (call_tir argument order, fusion, VM lowering), not just the kernels."""
    preset = load_preset(preset_name)
    _scheduled(preset_name)  # imports the Vulkan backend when needed
    ex, _ = pipeline.build(
        _attach(preset.target), preset.target, schedule_fn(preset), system_lib=preset.system_lib
    )
    assert ex is not None


_RUNNERS: dict = {}


def _compiled(scheduled: IRModule, name: str, backend: str):
    """(FuncInfo, runner) of one PrimFunc, compiled once (the bitonic stage runs 55 times per sort)."""
    key = (id(scheduled), name, backend)
    if key not in _RUNNERS:
        run_target = Target(RUN_TARGETS[backend])
        mod = retarget(IRModule({name: scheduled[name]}), run_target)
        _RUNNERS[key] = (describe(mod, run_target)[name], build_runner(mod, backend, run_target), scheduled)
    return _RUNNERS[key][:2]


def _run(scheduled: IRModule, name: str, backend: str, *arrays: np.ndarray) -> list[np.ndarray]:
    """Launch every kernel of PrimFunc `name` on `backend` with `arrays` in PrimFunc parameter order."""
    info, runner = _compiled(scheduled, name, backend)
    named = {p.name: np.array(a) for p, a in zip(info.params, arrays, strict=True)}
    values = {}
    for p, a in zip(info.params, arrays, strict=True):
        if p.shape is None:  # scalar parameter (the bitonic stage's j, k)
            values[p.name] = int(a)
            continue
        for dim, n in zip(p.shape, a.shape):
            if dim in info.shape_vars:
                values[dim] = n
    for launch in info.kernels:
        runner.launch(launch, named, values)
    return [named[p.name] for p in info.params]


def _check_softmax_and_processors(scheduled: IRModule, backend: str) -> None:
    rng = np.random.default_rng(10)
    logits = (rng.standard_normal((4, 1, V)) * 3).astype(np.float32)
    logits[1, 0, [7, 600]] = logits[1].max() + 1
    temperature = np.array([1.0, 0.0, 0.5, 3.0], np.float32)
    *_, probs = _run(scheduled, "softmax_temperature", backend, logits, temperature, np.zeros_like(logits))
    np.testing.assert_allclose(probs, ref.softmax_with_temperature(logits, temperature), P_RTOL, P_ATOL)
    logits2, bias, penalty, mask = _processor_inputs(rng)
    out = _run(scheduled, "apply_logit_bias_inplace", backend, logits2, *bias)[0]
    np.testing.assert_array_equal(out, ref.logit_bias(logits2, *bias))
    out = _run(scheduled, "apply_penalty_inplace", backend, logits2, *penalty)[0]
    np.testing.assert_allclose(out, ref.penalty(logits2, *penalty), rtol=LOGIT_RTOL)
    out = _run(scheduled, "apply_bitmask_inplace", backend, logits2, *mask)[0]
    _assert_masked(out, ref.bitmask(logits2, *mask))
    if "adjust_logits" in {gv.name_hint for gv in scheduled.get_global_vars()}:  # wherever sample_tokens is
        _check_adjust_logits(scheduled, backend, logits2)


def _check_adjust_logits(scheduled: IRModule, backend: str, logits: np.ndarray) -> None:
    """The engine's bias and penalties (compile/adjust_logits.py) against the host sampler's own rule
    (TokenSampler.adjust, float64) on rows 0 and 2 of four, with tokens under each change and all three."""
    from toolkit.runtime.device_sampling import pack_adjust
    from toolkit.runtime.options import GenerationOptions
    from toolkit.runtime.sampling import TokenSampler

    samplers = {
        0: TokenSampler(
            GenerationOptions(
                repetition_penalty=1.4,
                frequency_penalty=0.6,
                presence_penalty=0.2,
                logit_bias={5: 2.5, 9: -1.0},
            ),
            prompt=[5, 7, 300],
        ),
        2: TokenSampler(GenerationOptions(repetition_penalty=0.8, logit_bias={700: 4.0}), prompt=[1, 2, 700]),
    }
    for t in (5, 5, 9, 40):
        samplers[0].accept(t)
    adjusts = [(r, s.device_draw().adjust) for r, s in samplers.items()]
    pairs, values = pack_adjust(logits.shape[0], adjusts)
    out = _run(scheduled, "adjust_logits", backend, logits, pairs, values)[0]
    expected = logits.astype(np.float64)
    for r, s in samplers.items():
        expected[r] = s.adjust(logits[r])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)  # float32 against float64
    assert not np.allclose(expected, logits)


def _assert_masked(got: np.ndarray, expected: np.ndarray) -> None:
    """Kept logits exact; masked ones at the lowest float32 as the GPU source spells it: TVM prints it as the
    decimal literal -3.402823e+38, one ulp above numpy's -3.4028235e+38 (still below any real logit)."""
    masked = expected == ref.F32_LOWEST
    np.testing.assert_array_equal(got[~masked], expected[~masked])
    assert (got[masked] <= -3.4028e38).all() and masked.any()


def _check_sampler(scheduled: IRModule, backend: str) -> None:
    rng = np.random.default_rng(11)
    probs, uniform, rows = _multinomial_inputs(rng)
    cumsum = np.cumsum(probs, axis=1, dtype=np.float32)  # what TVM's scan kernel hands over
    *_, got = _run(scheduled, "sample_token", backend, cumsum, uniform, rows, np.zeros(len(rows), np.int32))
    np.testing.assert_array_equal(got, ref.multinomial(probs, uniform, rows))

    sorted_probs, ids, uniform, rows, top_p, _kept = _top_p_inputs(rng)
    cumsum = np.cumsum(sorted_probs, axis=1, dtype=np.float32)
    out = np.zeros(len(rows), np.int32)
    *_, got = _run(scheduled, "top_p_token", backend, cumsum, ids, uniform, rows, top_p, out)
    np.testing.assert_array_equal(got, ref.sample_with_top_p(sorted_probs, ids, uniform, rows, top_p))

    _check_bitonic_argsort(scheduled, backend, probs)
    _check_bitonic_argsort(scheduled, backend, _renorm_inputs(rng)[0])  # ties: 0.2 x 3 and 771 zeros
    _check_sampling_cut(scheduled, backend, rng)


def _cut(p: np.ndarray, top_p: float, top_k: int = 0, min_p: float = 0.0) -> np.ndarray:
    """p with only what the host sampler keeps (runtime/sampling.py's rules, from a full sort): top-k keeps
    p >= the k-th largest (ties too); top-p, on those renormalised, the shortest prefix of a stable sort by
    -p whose float64 mass reaches top_p; min-p, p >= min_p * max p."""
    out = p.copy()
    if 0 < top_k < p.size:
        out[out < np.sort(p)[-top_k]] = 0
    if top_p < 1:
        ranked = np.argsort(-out, kind="stable")
        mass = np.cumsum(out[ranked].astype(np.float64)) / out.sum(dtype=np.float64)
        dropped = ranked[np.searchsorted(mass, top_p) + 1 :]
        out[dropped] = 0
    out[out < min_p * p.max()] = 0
    return out


def _check_sampling_cut(scheduled: IRModule, backend: str, rng: np.random.Generator) -> None:
    """sample_tokens' cuts (compile/sampling_cut.py): rows of random probabilities under top-p, top-k and
    min-p alone and together, and rows of 0.2 ties across the top-p edge (ids 2, 3, 4 at top_p 0.6: 2 and 3
    kept) and across the top-k edge (k 2: all three kept); top_p 1, k 0, min_p 0 copy a row."""
    probs = ref.random_probs(rng, 2, V)
    ties = np.zeros((2, V), np.float32)
    ties[:, [0, 2, 3, 4, 9]] = [0.1, 0.2, 0.2, 0.2, 0.3]
    cases = [  # (row, top_p, top_k, min_p)
        (probs[0], 0.5, 0, 0.0),
        (probs[1], 0.95, 0, 0.0),
        (probs[0], 0.1, 0, 0.0),
        (probs[1], 1.0, 0, 0.0),
        (ties[0], 0.6, 0, 0.0),
        (ties[1], 0.75, 0, 0.0),
        (probs[0], 1.0, 40, 0.0),
        (probs[1], 0.9, 100, 0.0),
        (probs[0], 1.0, 0, 0.3),
        (probs[1], 0.95, 60, 0.1),
        (ties[0], 1.0, 2, 0.0),
        (ties[1], 0.5, 2, 0.0),
    ]
    rows = np.stack([c[0] for c in cases])
    n = len(cases)
    params = np.zeros((5, n), np.float32)
    params[0] = 1.0
    params[2:] = np.array([c[1:] for c in cases], np.float32).T
    *_, kept = _run(scheduled, "sampling_cut", backend, rows, params, np.zeros_like(rows))
    for r, (p, top_p, top_k, min_p) in enumerate(cases):
        np.testing.assert_array_equal(kept[r], _cut(p, top_p, top_k, min_p), err_msg=f"case {r}")
    assert np.count_nonzero(kept[4]) == 3 and kept[4, 4] == 0  # the third tie is cut
    assert np.count_nonzero(kept[10]) == 4  # top-k 2 keeps 0.3 and all three 0.2 ties
    assert 0 < np.count_nonzero(kept[6]) == 40 and np.count_nonzero(kept[8]) < np.count_nonzero(probs[0])


def _check_bitonic_argsort(scheduled: IRModule, backend: str, probs: np.ndarray) -> None:
    """The kernel chain argsort_probs runs on GPUs: init, one launch per bitonic stage, take."""
    rows, n = probs.shape[0], padded_length(V)
    keys, ids = _run(
        scheduled,
        "bitonic_init",
        backend,
        probs,
        np.zeros((rows, n), np.float32),
        np.zeros((rows, n), np.int32),
    )[1:]
    for j, k in stages(V):
        keys, ids = _run(
            scheduled, "bitonic_stage", backend, keys, ids, j, k, np.zeros_like(keys), np.zeros_like(ids)
        )[4:]
    values, order = _run(
        scheduled, "bitonic_take", backend, keys, ids, np.zeros_like(probs), np.zeros(probs.shape, np.int32)
    )[2:]
    expected = np.argsort(-probs, axis=1, kind="stable")  # larger first, ties by smaller index
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(values, np.take_along_axis(probs, expected, 1))


@pytest.mark.parametrize("preset_name", ["webgpu", "iphone-a16"])  # Metal's schedule runs as WGSL here
def test_kernels_on_wgsl_lavapipe(preset_name):
    gpu_apis.require("webgpu")
    scheduled = _scheduled(preset_name)
    _check_softmax_and_processors(scheduled, "webgpu")
    _check_sampler(scheduled, "webgpu")


def test_kernels_on_opencl_pocl():
    gpu_apis.require("opencl")
    _check_softmax_and_processors(_scheduled("android-adreno"), "opencl")


def _tree_inputs(rng: np.random.Generator):
    """Three sequences: a chain accept -> reject; siblings reject -> accept -> reject; a rejection whose
    residual is zero (accepted). Acceptance is forced with u = 0 and rejection with model < draft, u = 1."""
    draft_probs = ref.random_probs(rng, 10, V)
    model_probs = ref.random_probs(rng, 10, V)
    tokens = np.array([0, 11, 22, 0, 33, 44, 55, 0, 66, 0], np.int32)
    for node, parent in [(2, 1), (4, 3), (6, 5)]:  # the rejected ones: model below draft at their token
        model_probs[parent, tokens[node]], draft_probs[node, tokens[node]] = 1e-4, 0.5
    model_probs[7] = draft_probs[8]  # identical rows: zero residual
    uniform = np.array([0, 0, 1, 0, 1, 0, 1, 0, 1.5, 0], np.float32)
    first_child = np.array([1, 2, -1, 4, -1, 6, -1, 8, -1, -1], np.int32)
    next_sibling = np.array([-1, -1, -1, -1, 5, -1, -1, -1, -1, -1], np.int32)
    parents = np.array([0, 3, 7], np.int32)
    return draft_probs, tokens, model_probs, first_child, next_sibling, uniform, parents


def test_verify_draft_tokens_on_opencl_pocl():
    gpu_apis.require("opencl")
    run_target = Target(RUN_TARGETS["opencl"])
    scheduled = IRModule({"sampler_verify_draft_tokens": spec_verify(V, run_target)})
    args = _tree_inputs(np.random.default_rng(12))
    got = _run(scheduled, "sampler_verify_draft_tokens", "opencl", *args)
    model, parents = ref.verify_draft_tokens(*args)
    np.testing.assert_array_equal(got[6], parents)
    assert parents.tolist() == [1, 5, 8]
    np.testing.assert_allclose(got[2], model, P_RTOL, P_ATOL)
    assert not np.allclose(model[3], args[2][3]) and not np.allclose(model[1], args[2][1])


def test_every_webgpu_shader_validates():
    """TVM's sort/scan kernels included: wgpu (naga) compiles each WGSL shader into a pipeline."""
    from toolkit.compile.kernel_info import with_global_symbols
    from toolkit.verify.wgsl_runner import device, split_wgsl_source

    gpu_apis.require("webgpu")
    preset = load_preset("webgpu")
    built = tvm.compile(with_global_symbols(_scheduled("webgpu")), target=preset.target)
    shaders = split_wgsl_source(next(m for m in built.mod.imports if m.kind != "llvm").inspect_source())
    names = {k.split("_kernel")[0] for k in shaders}
    assert {"bitonic_stage", "prefix_sum", "softmax_temperature", "top_p_token", "sampling_cut"} <= names
    for name, code in shaders.items():
        device().create_shader_module(code=code)  # raises GPUValidationError on invalid WGSL
        assert name


def test_metal_source_parses():
    from toolkit.compile.kernel_info import with_global_symbols
    from toolkit.verify.metal_check import check_msl

    preset = load_preset("iphone-a16")
    built = tvm.compile(with_global_symbols(_scheduled("iphone-a16")), target=preset.target)
    result = check_msl(next(m for m in built.mod.imports if m.kind != "llvm").inspect_source())
    assert result.ok, result.diagnostics
    assert {"verify_draft_tokens_kernel", "sampling_cut_kernel"} <= set(result.kernels)


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found: CUDA kernels can only be compile-checked with nvcc")
def test_nvcc_compiles_every_sampling_kernel():
    from toolkit.compile.kernel_info import with_global_symbols
    from toolkit.verify.cuda_check import compile_kernels

    preset = load_preset("cuda-sm80")
    built = tvm.compile(with_global_symbols(_scheduled("cuda-sm80")), target=preset.target)
    report = compile_kernels(next(m for m in built.mod.imports if m.kind == "cuda").inspect_source(), preset)
    assert report.ok, report
    assert {"verify_draft_tokens_kernel", "sampling_cut_kernel"} <= set(report.compiled)


def _sampler_at(vocab: int, preset_name: str) -> tuple[IRModule, Preset]:
    preset = load_preset(preset_name)
    mod = attach_sampling_functions(
        IRModule(),
        preset.target,
        vocab_size=vocab,
        hidden_size=HIDDEN,
        dtype="float32",
        prefill_chunk_size=CHUNK,
    )
    return mod, preset


@pytest.mark.parametrize("vocab", [49152, pytest.param(32064, marks=pytest.mark.slow)])  # SmolLM2's, Phi-3's
def test_the_gpu_sampler_fits_shared_memory_at_real_vocabularies(vocab):
    """Tests elsewhere use a 777-token vocabulary; a kernel that stages a whole row in shared memory passes
    there and fails at a real one (a dlight-scheduled prefix sum wanted 203520 bytes at 49152). Our Vulkan
    code generator refuses a kernel over the preset's limit (32 KB, the tightest of the presets)."""
    _scheduled("vulkan")  # imports the Vulkan backend
    mod, preset = _sampler_at(vocab, "vulkan")
    ex, _ = pipeline.build(mod, preset.target, schedule_fn(preset))
    assert ex is not None


@pytest.mark.slow  # nvcc over every sampler kernel at a real vocabulary: 6 s
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found: CUDA kernels can only be compile-checked with nvcc")
def test_ptxas_takes_the_gpu_sampler_at_a_real_vocabulary():
    """ptxas refuses a kernel over CUDA's 48 KB of static shared memory."""
    from toolkit.compile.kernel_info import with_global_symbols
    from toolkit.verify.cuda_check import compile_kernels

    mod, preset = _sampler_at(49152, "cuda-sm80")
    lowered = pipeline.lower_to_tir(mod, preset.target)
    with preset.target:
        scheduled = schedule_fn(preset)(lowered)
    built = tvm.compile(with_global_symbols(scheduled), target=preset.target)
    report = compile_kernels(next(m for m in built.mod.imports if m.kind == "cuda").inspect_source(), preset)
    assert report.ok, report


def test_compile_model_attaches_the_functions(tmp_path):
    """`phi3 compile` output: the engine finds every function in the library, and softmax runs."""
    from tiny import make_tiny_checkpoint

    from toolkit.compile.compile_model import compiled_for
    from toolkit.config import load_hf_config

    make_tiny_checkpoint(tmp_path / "ckpt", "mini-4k")
    cfg = load_hf_config(tmp_path / "ckpt")
    # compile_model's output, through the session's JIT cache: shared with the runtime tests' library
    compiled = compiled_for(cfg, "q4f16_1", load_preset("host"))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(compiled.library)), tvm.cpu())
    find = lambda name: vm.module.get_function(name, query_imports=True)  # noqa: E731
    for name in ("softmax_with_temperature", "alloc_embedding_tensor", *PROCESSORS):
        assert find(name) is not None, name
    logits = np.random.default_rng(0).standard_normal((2, 1, cfg.vocab_size)).astype(np.float32)
    temperature = np.array([0.8, 0.0], np.float32)
    probs = find("softmax_with_temperature")(_t(logits), _t(temperature)).numpy()
    np.testing.assert_allclose(probs, ref.softmax_with_temperature(logits, temperature), P_RTOL, P_ATOL)
    rows = compiled.manifest["mlc_metadata"]["prefill_chunk_size"]  # what the engine reads from _metadata
    assert tuple(find("alloc_embedding_tensor")().shape) == (rows, cfg.hidden_size)
