"""The int8-activation q4 GEMV (AVX2 integer dot products, `cpu_q8_gemv`) and when it is chosen.

Reference: numpy doing the same arithmetic in float64: x quantized per 32-group exactly as the kernel does
(fp32 `x * (127 / max|x|)`, rounded half to even), integer dot products with the 4-bit codes, the -7 zero
point, and scale products per group. The kernel accumulates G = K/32 scaled group sums in fp32, so it is
within about G * 2^-24 * sum_g |terms| of that (we allow 2x, as test_cpu_schedule does for K products).
Against the exact fp32-activation product it must differ (else the int8 path isn't running) by no more than
activation rounding allows: |dx| <= max|x_group| / 254 per element.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_cpu_schedule import _matmul_func, _q4_weights
from tvm.s_tir import dlight as dl

from toolkit.compile import cpu_schedule as cs

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
GENERIC = tvm.target.Target({"kind": "llvm", "num-cores": 2})
RNG = np.random.default_rng(1)
HOST_HAS_AVX2 = cs.has_avx2(
    tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
)


def _q8_reference(
    x: np.ndarray,
    qw: np.ndarray,
    qs: np.ndarray,
    zero_point: int = 7,
    bits: int = 4,
    high=None,
    high_bits: int = 1,
):
    """(y, bound): y = the int8-activation product in float64; bound = fp32 accumulation allowance.
    `bits`: 4 (8 codes per uint32) or 8 (GGUF Q8_0: 4 codes per uint32, zero point 128); `high`: a plane
    of `high_bits` more code bits per weight, 32 / high_bits per uint32 (GGUF Q5_K 1, Q6_K 2), bits 4.. of
    the codes. `qs` (n, K / wg): one weight scale per wg weights, 32 or 16 (GGUF Q6_K); x's per 32."""
    epw = 32 // bits
    n, k = qw.shape[0], qw.shape[1] * epw
    shifts = np.arange(epw, dtype=np.uint32) * bits
    codes = ((qw[..., None] >> shifts) & (2**bits - 1)).reshape(n, k).astype(np.int64)
    if high is not None:
        at = np.arange(32 // high_bits, dtype=np.uint32) * high_bits
        top = (high[..., None] >> at) & (2**high_bits - 1)
        codes |= top.reshape(n, k).astype(np.int64) << 4
    wg = k // qs.shape[1]
    xg = x.reshape(-1, k // 32, 32).astype(np.float32)
    amax = np.abs(xg).max(axis=-1, keepdims=True)
    safe = np.where(amax > 0, amax, 1)
    inv = np.where(amax > 0, np.float32(127) / safe, 0).astype(np.float32)
    q = np.round((xg * inv).astype(np.float32)).astype(np.int64)  # half to even (llvm.nearbyint)
    d = (amax / np.float32(127)).astype(np.float32)[..., 0]  # [rows, G]
    d = np.repeat(d, 32 // wg, axis=-1)  # [rows, K / wg]
    q, codes = q.reshape(-1, k // wg, wg), codes.reshape(n, k // wg, wg)
    dots = np.einsum("rgi,ngi->rng", q, codes - zero_point)  # [rows, n, K / wg] exact
    terms = dots * (qs.astype(np.float64)[None] * d[:, None, :].astype(np.float64))
    y = terms.sum(-1)
    bound = 2 * (k // wg) * 2.0**-24 * np.abs(terms).sum(-1) + 1e-6 * np.abs(y)
    return y.reshape(*x.shape[:-1], n), bound.reshape(*x.shape[:-1], n)


def _q8_reference_with_min(x: np.ndarray, qw: np.ndarray, qs: np.ndarray, qm: np.ndarray, high=None):
    """(y, bound) for GGUF's Q4_1 (code * scale + min, no zero point): the codes' part as `_q8_reference`,
    plus the mins times each group's sum of x as the kernels round it (per 32-group, as the codes see it),
    in float64; bound adds fp32 summation of at most K/8 + 8 terms of the mins' part."""
    k = qw.shape[1] * 8
    codes, bound = _q8_reference(x, qw, qs, zero_point=0, high=high)
    xg = x.reshape(-1, k // 32, 32).astype(np.float32)
    amax = np.abs(xg).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xr = np.round((xg * inv).astype(np.float32)) * (amax / np.float32(127)).astype(np.float32)
    mins = xr.astype(np.float64).sum(-1) @ qm.astype(np.float64).T  # [rows, n]
    abs_mins = np.abs(xr).astype(np.float64).sum(-1) @ np.abs(qm.astype(np.float64)).T
    bound = bound + ((k // 8 + 8) * 2.0**-24 * abs_mins + 1e-6).reshape(bound.shape)
    return codes + mins.reshape(codes.shape), bound


def _build(func, target, rules):
    mod = tvm.IRModule({"main": func})
    with target:
        mod = dl.ApplyDefaultSchedule(*rules)(mod)
    return tvm.compile(mod, target=target)


# (n, k, rows as compiled, rows at run time, residual add, scale dtype, weight rows per x load, rows per task)
CASES = [
    (64, 128, (1, 1), (1, 1), True, "float16", 1, 16),
    (48, 256, ("b", 1), (3, 1), False, "float32", 1, 16),  # decode with a dynamic batch of 3
    (32, 576, ("b", 1), (1, 1), True, "float16", 1, 16),  # SmolLM2's K: 9 chunks of 64
    (16, 192, (1, 2), (1, 2), False, "float16", 1, 16),  # two static rows
    (64, 128, ("b", 1), (2, 1), True, "float16", 4, 16),  # 4 weight rows interleaved per x load
    (128, 128, ("b", 1), (2, 1), True, "float16", 2, 64),  # the tuner's knobs: big tasks
    (48, 256, (1, 1), (1, 1), False, "float32", 1, 8),  # small tasks
    (64, 576, ("b", 1), (20, 1), True, "float16", 1, 16),  # batched decode: 5 blocks of 4 rows
    (32, 1536, ("b", 1), (7, 1), True, "float16", 1, 16),  # one block of 4 rows and 3 left over
    (48, 256, ("b", 1), (5, 1), True, "float16", 1, 3),  # odd tasks: one weight row per x load
]


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2: the int8 kernel cannot run here")
@pytest.mark.parametrize("n,k,rows,real_rows,add,scale_dtype,w_rows,tile", CASES)
def test_int8_gemv_matches_numpy_int8_reference(n, k, rows, real_rows, add, scale_dtype, w_rows, tile):
    func = _matmul_func(n, k, rows, quant=True, scale_dtype=scale_dtype, add=add)
    assert isinstance(_first_rule(func, AVX2, "int8"), cs.CPUQ8DotGEMV)
    ex = _build(func, AVX2, [cs.CPUQ8DotGEMV(rows=w_rows, tile=tile)])
    qw, qs, w = _q4_weights(n, k, scale_dtype)
    x = RNG.standard_normal((*real_rows, k)).astype(np.float32)
    x[..., :32] = 0  # an all-zero group: scale 0, no division by zero
    res = RNG.standard_normal((*real_rows, n)).astype(np.float32) if add else None
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in [x, qw, qs] + ([res] if add else [])]
    out = tvm.runtime.empty((*real_rows, n), "float32", dev)
    ex["main"](*args, out)
    got = out.numpy()
    ref, bound = _q8_reference(x, qw, qs)
    if add:
        ref = ref + res
        bound = bound + 1e-7 * np.abs(ref)
    assert np.all(np.abs(got - ref) <= bound), np.abs(got - ref).max()
    exact = x.astype(np.float64) @ w.T + (res if add else 0)
    # rounding x to int8: |dx| <= amax/254 per element, so |dy| <= sum_g amax_g/254 * sum_k |w|
    xg = np.abs(x.reshape(-1, k // 32, 32)).max(-1)  # [rows, G]
    allow = (xg[:, None, :] / 254 * np.abs(w).reshape(n, k // 32, 32).sum(-1)[None]).sum(-1)
    diff = np.abs(got - exact).reshape(-1, n)
    assert np.all(diff <= allow + 1e-5) and diff.max() > 1e-6


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2: the int8 kernel cannot run here")
@pytest.mark.parametrize("add", [False, True])
def test_batched_rows_equal_single_row_kernel_bit_for_bit(add: bool) -> None:
    """Batched decode (dynamic batch: blocks of rows plus a remainder) computes each row exactly as the
    one-row kernel does, so a stream's greedy tokens don't depend on how many others run beside it."""
    n, k, b = 48, 576, 7
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    kw = {"quant": True, "scale_dtype": "float16", "add": add}
    one = _build(_matmul_func(n, k, (1, 1), **kw), host, [cs.CPUQ8DotGEMV()])
    many = _build(_matmul_func(n, k, ("b", 1), **kw), host, [cs.CPUQ8DotGEMV()])
    qw, qs, _ = _q4_weights(n, k, "float16")
    x = RNG.standard_normal((b, 1, k)).astype(np.float32)
    res = RNG.standard_normal((b, 1, n)).astype(np.float32)
    dev = tvm.cpu()

    def run(ex, xs, rs):
        args = [tvm.runtime.tensor(a, dev) for a in [xs, qw, qs] + ([rs] if add else [])]
        out = tvm.runtime.empty((xs.shape[0], 1, n), "float32", dev)
        ex["main"](*args, out)
        return out.numpy()

    batched = run(many, x, res)
    for i in range(b):
        np.testing.assert_array_equal(batched[i], run(one, x[i : i + 1], res[i : i + 1])[0])


def _first_rule(func, target, q4_activations: str):
    for rule in cs.cpu_schedule_rules(target, q4_activations):
        if rule.apply(func, target, False) is not None:
            return rule
    return None


def test_int8_rule_is_chosen_only_where_it_applies() -> None:
    decode = _matmul_func(64, 128, ("b", 1), quant=True)
    assert isinstance(_first_rule(decode, AVX2, "int8"), cs.CPUQ8DotGEMV)
    assert isinstance(_first_rule(decode, AVX2, "float32"), cs.CPUDequantGEMV)  # host-exact
    assert isinstance(_first_rule(decode, GENERIC, "int8"), cs.CPUDequantGEMV)  # no AVX2
    odd_k = _matmul_func(64, 96, (1, 1), quant=True)  # K not a multiple of 64
    assert isinstance(_first_rule(odd_k, AVX2, "int8"), cs.CPUDequantGEMV)
    prefill = _matmul_func(64, 128, (1, "s"), quant=True)
    assert isinstance(_first_rule(prefill, AVX2, "int8"), cs.CPUQ8VNNIGEMM)  # vpmaddubsw's form
    assert isinstance(_first_rule(prefill, AVX2, "float32"), cs.CPUQ4OuterGEMM)
    fp32 = _matmul_func(64, 128, (1, 1), quant=False)
    assert not isinstance(_first_rule(fp32, AVX2, "int8"), cs.CPUQ8DotGEMV)
    with pytest.raises(ValueError, match="q4_activations"):
        cs.cpu_schedule_rules(AVX2, "int4")


def test_host_presets_choose_activations() -> None:
    from toolkit.targets import load_preset

    assert load_preset("host").q4_activations == "int8"
    assert load_preset("host-exact").q4_activations == "float32"
    assert load_preset("cuda-sm90").q4_activations == "float32"
