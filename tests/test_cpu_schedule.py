"""CPU (llvm) schedule rules: each rule's kernel equals a float64 numpy reference on the dequantized weights,
for static and dynamic row counts and odd sizes, and the rules really schedule (parallel + vectorized loops).

Tolerance: fp32 accumulation of K products in any order (the rules reassociate: SIMD lanes, 32-groups) is
within gamma_K * sum|x_k * w_k| with gamma_K ~ K * 2^-24 (Higham, recursive summation); we allow 2x that per
output element, computed from the float64 |x| @ |W|^T. That bound is tight enough to catch any wrong index
(an error there is O(|x||w|), not O(K eps |x||w|)).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te, tirx
from tvm.s_tir import dlight as dl
from tvm.script import tirx as T

from toolkit.compile import cpu_schedule as cs

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})
RNG = np.random.default_rng(0)


def _q4_weights(n: int, k: int, scale_dtype: str, zero_point: int = 7):
    qw = RNG.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    qs = (RNG.random((n, k // 32)) * 0.05 + 0.001).astype(scale_dtype)
    codes = ((qw[..., None] >> (np.arange(8, dtype=np.uint32) * 4)) & 15).reshape(n, k).astype(np.float64)
    w = (codes - zero_point) * np.repeat(qs.astype(np.float64), 32, axis=1)
    return qw, qs, w


def _matmul_func(
    n: int,
    k: int,
    rows: tuple,
    *,
    quant: bool,
    scale_dtype: str = "float16",
    add: bool = False,
    zero_point: float = 7.0,
    with_min: bool = False,
    bits: int = 4,
):
    """The PrimFunc the pipeline makes for a Linear: [dequantize block] -> NT_matmul block [-> T_add].
    `with_min`: GGUF Q4_1's dequantize, code * scale + min (no zero point); `bits=8`: GGUF Q8_0's, 4 codes
    per uint32, (code - zero_point) * scale."""
    dims = [tirx.Var(d, "int64") if isinstance(d, str) else d for d in rows]
    x = te.placeholder((*dims, k), "float32", name="x")
    args = [x]
    if quant:
        epw = 32 // bits
        qw = te.placeholder((n, k // epw), "uint32", name="q_weight")
        qs = te.placeholder((n, k // 32), scale_dtype, name="q_scale")
        if bits == 8:
            w = te.compute(
                (n, k),
                lambda i, j: (
                    (
                        ((qw[i, j // 4] >> (j % 4 * 8).astype("uint32")) & tirx.const(255, "uint32")).astype(
                            "float32"
                        )
                        - tirx.const(zero_point, "float32")
                    )
                    * qs[i, j // 32].astype("float32")
                ),
                name="dequantize",
            )
            args += [qw, qs]
        elif with_min:
            qm = te.placeholder((n, k // 32), scale_dtype, name="q_min")
            w = te.compute(
                (n, k),
                lambda i, j: (
                    ((qw[i, j // 8] >> (j % 8 * 4).astype("uint32")) & tirx.const(15, "uint32")).astype(
                        "float32"
                    )
                    * qs[i, j // 32].astype("float32")
                    + qm[i, j // 32].astype("float32")
                ),
                name="dequantize",
            )
            args += [qw, qs, qm]
        else:
            w = te.compute(
                (n, k),
                lambda i, j: (
                    (
                        ((qw[i, j // 8] >> (j % 8 * 4).astype("uint32")) & tirx.const(15, "uint32")).astype(
                            "float32"
                        )
                        - tirx.const(zero_point, "float32")
                    )
                    * qs[i, j // 32].astype("float32")
                ),
                name="dequantize",
            )
            args += [qw, qs]
    else:
        w = te.placeholder((n, k), "float32", name="w")
        args.append(w)
    r = te.reduce_axis((0, k), "k")
    y = te.compute((*dims, n), lambda *i: te.sum(x[(*i[:-1], r)] * w[i[-1], r], axis=r), name="NT_matmul")
    if add:
        res = te.placeholder((*dims, n), "float32", name="res")
        args += [res, te.compute((*dims, n), lambda *i: y[i] + res[i], name="T_add")]
    else:
        args.append(y)
    return te.create_prim_func(args).with_attr("global_symbol", "main")


def _schedule(func: tirx.PrimFunc, rules=None) -> tvm.IRModule:
    mod = tvm.IRModule({"main": func})
    with TARGET:
        return dl.ApplyDefaultSchedule(*(rules or cs.cpu_schedule_rules(TARGET)))(mod)


def _run(mod: tvm.IRModule, arrays: list[np.ndarray], out_shape: tuple) -> np.ndarray:
    ex = tvm.compile(mod, target=TARGET)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays] + [tvm.runtime.empty(out_shape, "float32", dev)]
    ex["main"](*args)
    return args[-1].numpy()


def _check_matmul(out: np.ndarray, x: np.ndarray, w: np.ndarray, res: np.ndarray | None) -> None:
    x64 = x.astype(np.float64)
    ref = x64 @ w.T + (res if res is not None else 0)
    k = x.shape[-1]
    bound = 2 * k * 2.0**-24 * (np.abs(x64) @ np.abs(w).T) + 1e-6 * np.abs(ref)
    assert out.shape == ref.shape
    excess = np.abs(out - ref) - bound
    assert excess.max() <= 0, (
        f"max error {np.abs(out - ref).max():.3g} exceeds bound where {excess.max():.3g}"
    )


def _rule_used(func: tirx.PrimFunc) -> str | None:
    for rule in cs.cpu_schedule_rules(TARGET):
        if rule.apply(func, TARGET, False) is not None:
            return type(rule).__name__
    return None


def _assert_parallel_vectorized(mod: tvm.IRModule) -> None:
    func = mod["main"]
    assert func.attrs["tirx.is_scheduled"]
    text = func.script()
    assert "T.parallel(" in text and "T.vectorized(" in text, text


# (n, k, rows of x as compiled, rows at run time, add epilogue, scale dtype, expected rule)
Q4_CASES = [
    (64, 128, (1, 1), (1, 1), True, "float16", "CPUDequantGEMV"),  # decode, residual add
    (48, 256, ("b", 1), (3, 1), False, "float32", "CPUDequantGEMV"),  # decode with a dynamic batch of 3
    (40, 96, (1, 1), (1, 1), False, "float16", "CPUDequantGEMV"),  # 3 groups, 40 rows (tile of 8)
    (37, 64, (1, 1), (1, 1), True, "float16", "CPUGEMV"),  # prime N: regrouped tiles don't fit, generic GEMV
    (64, 128, (1, "s"), (1, 5), True, "float16", "CPUQ4OuterGEMM"),  # prefill, dynamic seq_len
    (72, 160, (1, "s"), (1, 33), False, "float32", "CPUQ4OuterGEMM"),  # N % 16 != 0: tiles of 8
    (48, 64, (1, "s"), (1, 1), False, "float16", "CPUQ4OuterGEMM"),  # prefill of a single token
    (64, 128, (1, "s"), (1, 13), False, "float16", "CPUQ4OuterGEMM"),  # 13 rows: 2 blocks of 6 + a tail
    (36, 64, (1, "s"), (1, 7), True, "float16", "CPUGEMM"),  # N % 8 != 0: the generic GEMM
]


@pytest.mark.parametrize("n,k,rows,real_rows,add,scale_dtype,rule", Q4_CASES)
def test_q4_matmul_matches_numpy(n, k, rows, real_rows, add, scale_dtype, rule) -> None:
    func = _matmul_func(n, k, rows, quant=True, scale_dtype=scale_dtype, add=add)
    assert _rule_used(func) == rule
    mod = _schedule(func)
    qw, qs, w = _q4_weights(n, k, scale_dtype)
    x = RNG.standard_normal((*real_rows, k)).astype(np.float32)
    res = RNG.standard_normal((*real_rows, n)).astype(np.float32) if add else None
    arrays = [x, qw, qs] + ([res] if add else [])
    _check_matmul(_run(mod, arrays, (*real_rows, n)), x, w, res)


FP32_CASES = [
    (96, 64, (1, 1), (1, 1), False, "CPUGEMV"),
    (50, 24, ("b", 1), (2, 1), True, "CPUGEMV"),  # odd N, K not a multiple of 16
    (80, 48, (1, "s"), (1, 7), True, "CPUGEMM"),
]


@pytest.mark.parametrize("n,k,rows,real_rows,add,rule", FP32_CASES)
def test_fp32_matmul_matches_numpy(n, k, rows, real_rows, add, rule) -> None:
    func = _matmul_func(n, k, rows, quant=False, add=add)
    assert _rule_used(func) == rule
    mod = _schedule(func)
    w = RNG.standard_normal((n, k)).astype(np.float32)
    x = RNG.standard_normal((*real_rows, k)).astype(np.float32)
    res = RNG.standard_normal((*real_rows, n)).astype(np.float32) if add else None
    arrays = [x, w] + ([res] if add else [])
    _check_matmul(_run(mod, arrays, (*real_rows, n)), x, w.astype(np.float64), res)


def test_rules_schedule_parallel_and_vectorized_loops() -> None:
    for func in (
        _matmul_func(256, 256, (1, 1), quant=True, add=True),
        _matmul_func(256, 256, (1, "s"), quant=True),
        _matmul_func(256, 256, ("b", 1), quant=False),
        _matmul_func(256, 256, (1, "s"), quant=False),
    ):
        _assert_parallel_vectorized(_schedule(func))


def test_q4_gemv_reads_packed_words_only() -> None:
    """The dequantized fp32 weight must not be materialised: no buffer of N*K floats in the scheduled code."""
    mod = _schedule(_matmul_func(256, 512, (1, 1), quant=True))
    text = mod["main"].script()
    assert "dequantize" not in text and "(256, 512)" not in text


def _rms_norm_func(rows, h: int):
    dims = [tirx.Var(d, "int64") if isinstance(d, str) else d for d in rows]
    x = te.placeholder((*dims, h), "float32", name="x")
    wt = te.placeholder((h,), "float32", name="weight")
    r = te.reduce_axis((0, h), "k")
    ss = te.compute(tuple(dims), lambda *i: te.sum(x[(*i, r)] * x[(*i, r)], axis=r), name="sq_sum")
    y = te.compute(
        (*dims, h),
        lambda *i: x[i] * wt[i[-1]] / te.sqrt(ss[i[:-1]] / h + tirx.const(1e-5, "float32")),
        name="rms_norm",
    )
    return te.create_prim_func([x, wt, y]).with_attr("global_symbol", "main")


@pytest.mark.parametrize("h,rule", [(96, "CPURowReduction"), (90, "Reduction")])
def test_rms_norm(h, rule) -> None:
    """A row width the vector width divides: partial sums per lane (rfactor), vectorized; another width:
    dlight's scalar reduction. Both against numpy."""
    func = _rms_norm_func((1, "s"), h)
    assert _rule_used(func) == rule
    mod = _schedule(func)
    assert ("_rf" in mod["main"].script()) == (rule == "CPURowReduction")
    if rule == "CPURowReduction":
        _assert_parallel_vectorized(mod)
    x = RNG.standard_normal((1, 5, h)).astype(np.float32)
    wt = RNG.standard_normal(h).astype(np.float32)
    out = _run(mod, [x, wt], (1, 5, h))
    x64 = x.astype(np.float64)
    ref = x64 * wt / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5)
    # fp32 sum of 96 squares and one sqrt/divide: relative 1e-5 of the row scale is ample and still strict
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _runs_of_block(stmt, name: str, times: int = 1) -> int:
    """How many times block `name` runs: the product of the loop extents around it (static loops)."""
    from tvm.s_tir.stmt import SBlock, SBlockRealize

    if isinstance(stmt, tirx.For):
        return _runs_of_block(stmt.body, name, times * int(stmt.extent))
    if isinstance(stmt, tirx.SeqStmt):
        return sum(_runs_of_block(s, name, times) for s in stmt.seq)
    if isinstance(stmt, SBlockRealize):
        return _runs_of_block(stmt.block, name, times)
    if isinstance(stmt, SBlock):
        return times if stmt.name_hint == name else _runs_of_block(stmt.body, name, times)
    return 0


def test_rms_norm_of_one_static_row_sums_it_once() -> None:
    """A static (1, 1, h) norm: its output loop is over the row's elements, not over rows, so the sum must
    not be computed under it (h times the work; dlight's Reduction does that)."""
    h = 3072
    func = _rms_norm_func((1, 1), h)
    assert _rule_used(func) == "CPURowReduction"
    mod = _schedule(func)
    lanes = cs.simd_lanes_f32(TARGET)
    assert _runs_of_block(mod["main"].body, "sq_sum_rf") == h  # each element's square once, in lanes
    x = RNG.standard_normal((1, 1, h)).astype(np.float32)
    wt = RNG.standard_normal(h).astype(np.float32)
    out = _run(mod, [x, wt], (1, 1, h))
    x64 = x.astype(np.float64)
    ref = x64 * wt / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)  # fp32 sum of 3072 squares, one rsqrt
    assert lanes > 1 and "T.vectorized" in mod["main"].script()


def test_silu_mul_is_elementwise() -> None:
    """silu(gate) * up over a dynamic number of rows: elementwise rule, vectorized and threaded."""
    h = 96
    s = tirx.Var("s", "int64")
    gu = te.placeholder((1, s, 2 * h), "float32", name="gate_up")
    y = te.compute(
        (1, s, h), lambda a, b, c: gu[a, b, c] * te.sigmoid(gu[a, b, c]) * gu[a, b, c + h], name="silu_mul"
    )
    func = te.create_prim_func([gu, y]).with_attr("global_symbol", "main")
    assert _rule_used(func) == "CPUElementwise"
    mod = _schedule(func)
    _assert_parallel_vectorized(mod)
    g = RNG.standard_normal((1, 9, 2 * h)).astype(np.float32)
    out = _run(mod, [g], (1, 9, h))
    g64 = g.astype(np.float64)
    ref = g64[..., :h] / (1 + np.exp(-g64[..., :h])) * g64[..., h:]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)  # a few fp32 ops per element


def test_rules_decline_non_llvm_targets_and_other_kernels() -> None:
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    func = _matmul_func(64, 128, (1, 1), quant=True)
    assert all(rule.apply(func, cuda, False) is None for rule in cs.cpu_schedule_rules(TARGET))
    # a scatter through an index buffer (like the KV-cache append) is left alone
    assert _rule_used(_scatter) is None


@T.prim_func(s_tir=True)
def _scatter(
    src: T.Buffer((64,), "float32"), pos: T.Buffer((64,), "int32"), dst: T.Buffer((128,), "float32")
):
    for i in range(64):
        with T.sblock("scatter"):
            vi = T.axis.spatial(64, i)
            dst[pos[vi]] = src[vi]


def test_simd_lanes_follow_the_cpu() -> None:
    assert cs.simd_lanes_f32(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) == 16
    assert cs.simd_lanes_f32(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) == 8
    assert cs.simd_lanes_f32(tvm.target.Target({"kind": "llvm", "mcpu": "nehalem"})) == 4


@pytest.mark.parametrize(
    "words_per_vector,chains,layout",
    [(1, 1, "word"), (2, 1, "word"), (1, 1, "nibble"), (2, 1, "nibble"), (1, 2, "nibble")],
)
def test_q4_gemv_layouts(words_per_vector, chains, layout) -> None:
    """Both lane layouts, AVX2 (8 lanes) and AVX-512 (16 lanes) widths, and 2 accumulator chains per row
    are exact on any x86 (LLVM splits wide vectors)."""
    n, k = 48, 256
    func = _matmul_func(n, k, (1, 1), quant=True, add=True)
    rule = cs.CPUDequantGEMV(words_per_vector=words_per_vector, chains=chains, layout=layout)
    mod = _schedule(func, [rule])
    assert ("x_scaled_t" in mod["main"].script()) == (layout == "word")
    _assert_parallel_vectorized(mod)
    qw, qs, w = _q4_weights(n, k, "float16")
    x = RNG.standard_normal((1, 1, k)).astype(np.float32)
    res = RNG.standard_normal((1, 1, n)).astype(np.float32)
    _check_matmul(_run(mod, [x, qw, qs, res], (1, 1, n)), x, w, res)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["q4f32_1", "q0f32"])
def test_compiled_tiny_model_equals_unscheduled_build(quantization, tmp_path, monkeypatch) -> None:
    """End to end through the real pipeline (export, fusion, FuseDequantizeMatmul, our rules, VM): logits of
    prefill + decode equal those of the same graph built with no schedule at all, on the same q4 weights.
    Both compute in fp32 and differ only in summation order, so rel. error 1e-4 is generous (measured ~1e-6)
    while a wrong index or a dropped epilogue gives O(1) differences."""
    from engine_util import build_engine, rel_err
    from tiny import make_tiny_checkpoint
    from tiny_tokenizer import write_tiny_tokenizer

    from toolkit.config import load_hf_config

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mini-4k")
    write_tiny_tokenizer(ckpt, load_hf_config(ckpt).vocab_size)  # the q4 converter copies the tokenizer
    prompt = list(range(3, 12))

    def run(tag: str) -> np.ndarray:
        eng = build_engine(ckpt, tmp_path / tag, quantization=quantization)
        sid = eng.add_sequence()
        rows = [eng.prefill(sid, prompt, all_logits=True)]
        for tok in (5, 17, 9):
            rows.append(eng.decode(sid, tok)[None])
        return np.concatenate(rows)

    ours = run("ours")
    monkeypatch.setattr(cs, "cpu_schedule_rules", lambda target, *_: [])
    plain = run("plain")
    assert rel_err(ours, plain) < 1e-4
