"""The host kernels' instruction-set paths (`toolkit/compile/cpu_isa.py`): chosen from the target CPU's
features, each numerically equal to the int8 reference on this machine where it can run, and compiled for
CPUs this machine isn't, with their object code checked for the instructions each path stands for.

Reference and tolerance: `test_cpu_q8_gemv._q8_reference` (numpy int8 x code dot products, exact integers,
then the scales in float64; bound = the kernel's fp32 accumulation over K/32 scaled group sums)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from cases import covering
from test_cpu_q8_gemv import _build, _q8_reference, _q8_reference_with_min
from test_cpu_schedule import _check_matmul, _matmul_func, _q4_weights

from toolkit.compile import cpu_schedule as cs
from toolkit.compile.cpu_isa import (
    Q8_DOT_ISAS,
    host_kernel_isas,
    q4_gemm_isa,
    q8_dot_isa,
    q8_dot_isas,
    q8_gemm_isa,
)
from toolkit.errors import UserError
from toolkit.hostinfo import cpu_flags
from toolkit.targets import load_preset

# this machine as the host preset targets it: LLVM's CPU name, plus AMX where the name leaves it out
HOST = tvm.target.Target({**load_preset("host").target_dict, "num-cores": 2})
HOST_ISAS = q8_dot_isas(HOST)
# the same without AMX: the prefill GEMM's vpdpbusd path, which AMX CPUs would otherwise never build
HOST_VNNI = tvm.target.Target(
    {**HOST.export(), "mattr": [*HOST.attrs.get("mattr", []), "-amx-tile", "-amx-int8"]}
)
RNG = np.random.default_rng(7)
OBJDUMP = next((t for t in ("llvm-objdump-15", "llvm-objdump", "objdump") if shutil.which(t)), None)


def int8_builds(func, gemm: bool) -> list:
    """`func` built by each int8 kernel path this CPU has: the decode GEMV in every dot-product path, or
    (`gemm`) the prefill GEMM in its VNNI, AMX and AVX2 forms; skipping the test where the CPU has none."""
    if not gemm:  # every path this CPU has that takes the layout (8-bit codes: not avx512bw)
        isas = [i for i in HOST_ISAS if cs.CPUQ8DotGEMV(isa=i).apply(func, HOST, False) is not None]
        return [_build(func, HOST, [cs.CPUQ8DotGEMV(isa=isa)]) for isa in isas]
    builds = []
    if q8_gemm_isa(HOST_VNNI) in ("avx512vnni", "avxvnni"):
        builds.append(_build(func, HOST_VNNI, [cs.CPUQ8VNNIGEMM()]))
    if q8_gemm_isa(HOST) == "amx":
        builds.append(_build(func, HOST, [cs.CPUQ8VNNIGEMM()]))
    # the vpmaddubsw forms as built for CPUs without VNNI (Haswell / Zen 3, Skylake-SP), where they take the
    # codes (not Q8_0)
    for cpu in ("haswell", "skylake-avx512"):
        if _runs_here(cpu) and cs.CPUQ8VNNIGEMM().apply(func, _cpu(cpu), False) is not None:
            builds.append(_build(func, _cpu(cpu), [cs.CPUQ8VNNIGEMM()]))
    if not builds:
        pytest.skip("this CPU has no integer dot products: no int8 GEMM")
    return builds


def _runs_here(mcpu: str) -> bool:
    """Whether code built for `mcpu` runs on this machine (the check of `--device host:CPU`)."""
    try:
        return load_preset(f"host:{mcpu}").runs_here
    except UserError:  # not an x86-64 machine
        return False


def _cpu(mcpu: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": 2})


@pytest.mark.parametrize(
    "mcpu,isas,gemm,gemm8",
    [
        ("znver3", ["avx2"], "avx2", "avx2"),  # Zen 3: AVX2 only (vpmaddubsw)
        ("skylake-avx512", ["avx512bw", "avx2"], "avx512", "avx512bw"),  # no VNNI: 512-bit vpmaddubsw
        # AVX-512 VNNI (+VL: 256-bit EVEX)
        ("cascadelake", ["avx512vnni", "avxvnni", "avx512bw", "avx2"], "avx512", "avx512vnni"),
        ("alderlake", ["avxvnni", "avx2"], "avx2", "avxvnni"),  # AVX-VNNI (VEX) without AVX-512
        ("znver4", ["avx512vnni", "avxvnni", "avx512bw", "avx2"], "avx512", "avx512vnni"),
        ("sapphirerapids", ["avx512vnni", "avxvnni", "avx512bw", "avx2"], "avx512", "amx"),  # AMX prefill
        ("x86-64", [], "avx2", None),  # baseline x86-64: no AVX2, the fp32-activation kernel
    ],
)
def test_isa_choice_follows_the_target_cpu(mcpu: str, isas: list[str], gemm: str, gemm8: str | None) -> None:
    target = _cpu(mcpu)
    assert q8_dot_isas(target) == isas
    assert q8_dot_isa(target) == (isas[0] if isas else None)
    assert q4_gemm_isa(target) == gemm
    gemv = f"int8-{isas[0]}" if isas else "fp32"
    int8_gemm = f"int8-{gemm8}" if gemm8 else f"fp32-{gemm}"
    assert q8_gemm_isa(target) == gemm8
    assert host_kernel_isas(target, "int8") == {"q4_gemv": gemv, "q4_gemm": int8_gemm}
    assert host_kernel_isas(target, "float32") == {"q4_gemv": "fp32", "q4_gemm": f"fp32-{gemm}"}


def test_non_x86_targets_have_no_x86_paths() -> None:
    # arm64 paths: tests/test_arm64_paths.py
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"})
    assert q8_dot_isas(arm) == ["neon-dotprod", "neon"]
    assert q8_dot_isas(tvm.target.Target("cuda")) == []
    assert q8_gemm_isa(tvm.target.Target("cuda")) is None


# (n, k, rows as compiled, rows at run time, residual add, scale dtype)
# the first case of each table runs by default; the other shapes run with --runslow
CASES = [
    (64, 256, (1, 1), (1, 1), True, "float16"),
    # K an odd number of 64-chunks (SmolLM2's 576 is 9): 512-bit paths end with a 256-bit half step
    (32, 320, (1, 1), (1, 1), True, "float16"),
    (32, 192, ("b", 1), (5, 1), False, "float32"),  # batched: a block of 4 rows of x, then one row alone
    pytest.param(48, 384, ("b", 1), (3, 1), False, "float32", marks=pytest.mark.slow),  # dynamic batch of 3
    pytest.param(32, 1024, (1, 2), (1, 2), True, "float16", marks=pytest.mark.slow),  # two static rows
]


X86_DOT_ISAS = [i for i in Q8_DOT_ISAS if not i.startswith("neon")]  # arm64 ones: test_arm64_paths (qemu)


@pytest.mark.parametrize("isa", X86_DOT_ISAS)
@pytest.mark.parametrize("n,k,rows,real_rows,add,scale_dtype", CASES)
def test_each_path_matches_int8_reference(isa, n, k, rows, real_rows, add, scale_dtype) -> None:
    if isa not in HOST_ISAS:
        pytest.skip(f"this CPU has no {isa}")
    func = _matmul_func(n, k, rows, quant=True, scale_dtype=scale_dtype, add=add)
    ex = _build(func, HOST, [cs.CPUQ8DotGEMV(isa=isa)])
    qw, qs, _ = _q4_weights(n, k, scale_dtype)
    x = RNG.standard_normal((*real_rows, k)).astype(np.float32)
    x[..., 64:96] = 0  # an all-zero group: scale 0, no division by zero
    x[..., 0] = 1e3  # one group dominated by one value: most of its codes round to 0
    res = RNG.standard_normal((*real_rows, n)).astype(np.float32) if add else None
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in [x, qw, qs] + ([res] if add else [])]
    out = tvm.runtime.empty((*real_rows, n), "float32", dev)
    ex["main"](*args, out)
    ref, bound = _q8_reference(x, qw, qs)
    if add:
        ref, bound = ref + res, bound + 1e-7 * np.abs(ref + res)
    err = np.abs(out.numpy() - ref)
    assert np.all(err <= bound), (err.max(), bound.min())


def test_512_bit_paths_take_an_odd_number_of_chunks_and_decline_k_they_cannot_step() -> None:
    odd = _matmul_func(32, 576, (1, 1), quant=True)  # SmolLM2's K: 9 chunks of 64, not pairs
    cascadelake = _cpu("cascadelake")
    assert cs.CPUQ8DotGEMV(isa="avx512vnni").apply(odd, cascadelake, False) is not None
    assert cs.CPUQ8DotGEMV(isa="avx512bw").apply(odd, cascadelake, False) is not None
    assert cs.CPUQ8DotGEMV(isa="avxvnni").apply(odd, cascadelake, False) is not None
    # a K of 32 x an odd number (not whole 64-chunks) takes no int8 path at all
    assert cs.CPUQ8DotGEMV().apply(_matmul_func(32, 96, (1, 1), quant=True), cascadelake, False) is None
    # a path the CPU lacks is declined even when asked for
    assert cs.CPUQ8DotGEMV(isa="avx512vnni").apply(odd, _cpu("alderlake"), False) is None
    assert cs.CPUQ8DotGEMV(isa="avxvnni").apply(odd, _cpu("znver3"), False) is None


# prefill GEMM tiles: (N, rows at run time); N picks the tile: 2 vectors of rows, 1, or 8-lane vectors
GEMM_CASES = [(64, 13), *(pytest.param(*c, marks=pytest.mark.slow) for c in [(48, 7), (72, 6)]), (96, 1)]


@pytest.mark.parametrize("gemm", ["avx512", "avx2"])
@pytest.mark.parametrize("n,m", GEMM_CASES)
def test_each_gemm_path_matches_numpy(gemm: str, n: int, m: int) -> None:
    # the path follows the target: the host's CPU for AVX-512, Haswell (runs on any AVX2 CPU) for AVX2
    target = HOST if gemm == "avx512" else _cpu("haswell")
    runs_here = {"avx512": q4_gemm_isa(HOST) == "avx512", "avx2": "avx2" in HOST_ISAS}
    if not runs_here[gemm]:
        pytest.skip(f"this CPU can't run the {gemm} tiles")
    assert q4_gemm_isa(target) == gemm
    k = 160
    func = _matmul_func(n, k, (1, "s"), quant=True, add=True)
    ex = _build(func, target, [cs.CPUQ4OuterGEMM()])
    qw, qs, w = _q4_weights(n, k, "float16")
    x = RNG.standard_normal((1, m, k)).astype(np.float32)
    res = RNG.standard_normal((1, m, n)).astype(np.float32)
    dev = tvm.cpu()
    out = tvm.runtime.empty((1, m, n), "float32", dev)
    ex["main"](*[tvm.runtime.tensor(a, dev) for a in (x, qw, qs, res)], out)
    _check_matmul(out.numpy(), x, w, res)


# int8 prefill GEMM: (N, K, rows at run time, residual add)
Q8_GEMM_CASES = [
    (64, 256, 13, True),
    *(pytest.param(*c, marks=pytest.mark.slow) for c in [(48, 160, 1, False), (32, 1024, 25, True)]),
]


def _build_q8_gemm_256(func, target):
    """`func` with the 256-bit int8 GEMM tiles (6 rows of x by 8 weight rows) for `target`."""
    from toolkit.compile.cpu_q8_gemm import q8_vnni_gemm

    class Rule256(cs.CPUQ8VNNIGEMM):
        def apply(self, f, t, _tunable):
            q = cs._match_q4_matmul(f)
            return None if q is None else tvm.s_tir.Schedule(q8_vnni_gemm(f, q, mr=6, lanes=8))

    return _build(func, target, [Rule256()])


@pytest.mark.parametrize("isa", ["amx", "avx512vnni", "avxvnni", "avx512bw", "avx2"])
@pytest.mark.parametrize("n,k,m,add", Q8_GEMM_CASES)
def test_vnni_gemm_matches_int8_reference(isa: str, n: int, k: int, m: int, add: bool) -> None:
    if isa not in [*HOST_ISAS, q8_gemm_isa(HOST), "avx512bw"]:
        pytest.skip(f"this CPU has no {isa}")
    func = _matmul_func(n, k, (1, "s"), quant=True, add=add)
    if isa in ("avx2", "avx512bw"):  # as built for a CPU without VNNI: Haswell / Zen 3, Skylake-SP
        cpu = "haswell" if isa == "avx2" else "skylake-avx512"
        if not _runs_here(cpu):
            pytest.skip(f"this CPU can't run a {cpu} build")
        assert q8_gemm_isa(_cpu(cpu)) == isa
        ex = _build(func, _cpu(cpu), [cs.CPUQ8VNNIGEMM()])
    elif isa == "amx":  # 13 and 25 rows: one and two blocks of 16, the last padded with zeros
        ex = _build(func, HOST, [cs.CPUQ8VNNIGEMM()])
    elif isa == "avx512vnni":
        ex = _build(func, HOST_VNNI, [cs.CPUQ8VNNIGEMM()])
    elif "avx_vnni" in cpu_flags():
        # the 256-bit path as built for an AVX-VNNI CPU without AVX-512 (VEX, 16 vector registers)
        assert q8_gemm_isa(_cpu("alderlake")) == isa
        ex = _build(func, _cpu("alderlake"), [cs.CPUQ8VNNIGEMM()])
    else:
        # AVX-512 VNNI without VEX AVX-VNNI (Zen 4, Cascade Lake): the alderlake build would not run here
        # (SIGILL), so the same 256-bit tiles are built for this CPU, EVEX-encoded
        ex = _build_q8_gemm_256(func, HOST)
    qw, qs, _ = _q4_weights(n, k, "float16")
    x = RNG.standard_normal((1, m, k)).astype(np.float32)
    x[..., 32:64] = 0  # an all-zero group
    res = RNG.standard_normal((1, m, n)).astype(np.float32) if add else None
    dev = tvm.cpu()
    out = tvm.runtime.empty((1, m, n), "float32", dev)
    ex["main"](*[tvm.runtime.tensor(a, dev) for a in [x, qw, qs] + ([res] if add else [])], out)
    ref, bound = _q8_reference(x, qw, qs)
    if add:
        ref, bound = ref + res, bound + 1e-7 * np.abs(ref + res)
    err = np.abs(out.numpy() - ref)
    assert np.all(err <= bound), (err.max(), bound.min())


def test_prefill_rule_follows_activations_and_cpu() -> None:
    prefill = _matmul_func(64, 256, (1, "s"), quant=True)

    def first(target, acts):
        return next(r for r in cs.cpu_schedule_rules(target, acts) if r.apply(prefill, target, False))

    assert isinstance(first(_cpu("cascadelake"), "int8"), cs.CPUQ8VNNIGEMM)
    assert isinstance(first(_cpu("cascadelake"), "float32"), cs.CPUQ4OuterGEMM)  # host-exact
    assert isinstance(first(_cpu("alderlake"), "int8"), cs.CPUQ8VNNIGEMM)  # 256-bit AVX-VNNI
    assert isinstance(first(_cpu("znver3"), "int8"), cs.CPUQ8VNNIGEMM)  # no VNNI: AVX2's vpmaddubsw
    assert isinstance(first(_cpu("znver3"), "float32"), cs.CPUQ4OuterGEMM)
    # GGUF Q8_0's 8-bit codes would saturate vpmaddubsw's int16 pairs: fp32 tiles there, VNNI elsewhere
    q8_0 = _matmul_func(64, 256, (1, "s"), quant=True, bits=8, zero_point=128.0)
    assert cs.CPUQ8VNNIGEMM().apply(q8_0, _cpu("znver3"), False) is None
    assert cs.CPUQ8VNNIGEMM().apply(q8_0, _cpu("cascadelake"), False) is not None
    decode = _matmul_func(64, 256, (1, 1), quant=True)
    assert cs.CPUQ8VNNIGEMM().apply(decode, _cpu("cascadelake"), False) is None


def _disassemble(func, target, activations: str = "int8") -> str:
    """The object code of `func` built by our rules for `target` (not necessarily runnable here)."""
    import tempfile
    from pathlib import Path

    ex = _build(func, target, cs.cpu_schedule_rules(target, activations))
    with tempfile.TemporaryDirectory() as d:
        lib = Path(d) / "k.so"
        ex.export_library(str(lib))
        return subprocess.run([OBJDUMP, "-d", str(lib)], capture_output=True, text=True, check=True).stdout


def _count(asm: str, pattern: str) -> int:
    return len(re.findall(pattern, asm, flags=re.MULTILINE))


# (mcpu, K, instruction lines that must appear, that must not): the rules choose the path by themselves.
# Per step: two dot-product instructions (low and high nibbles), and for AVX2 one vpmaddwd after them.
VNNI_512, VNNI_256 = r"vpdpbusd\s.*%zmm", r"vpdpbusd\s.*%ymm"
AVX_VNNI = r"\{vex\}\s+vpdpbusd\s.*%ymm"
AVX2 = [r"vpmaddubsw\s.*%ymm", r"vpmaddubsw\s.*%ymm", r"vpmaddwd\s.*%ymm"]
AVX512BW = [r"vpmaddubsw\s.*%zmm", r"vpmaddubsw\s.*%zmm", r"vpmaddwd\s.*%zmm"]
# one CPU per path by default (512-bit VNNI, AVX-VNNI, AVX-512BW, AVX2); the other cases with --runslow
DISASM = [
    ("cascadelake", 3072, [VNNI_512] * 2, [r"vpmaddubsw", VNNI_256]),
    pytest.param("znver4", 3072, [VNNI_512] * 2, [r"vpmaddubsw"], marks=pytest.mark.slow),
    # SmolLM2's K (576): 4 steps of 128 and a half step of 64, the last on 256-bit registers
    ("cascadelake", 576, [VNNI_512] * 2 + [VNNI_256] * 2, [r"vpmaddubsw"]),
    ("alderlake", 3072, [AVX_VNNI] * 2, [r"%zmm", r"vpmaddubsw"]),  # AVX-VNNI
    ("znver3", 3072, AVX2, [r"vpdpbusd", r"%zmm"]),
    ("skylake-avx512", 3072, AVX512BW, [r"vpdpbusd"]),
    pytest.param("skylake-avx512", 576, AVX512BW + AVX2, [r"vpdpbusd"], marks=pytest.mark.slow),
]


@pytest.mark.skipif(OBJDUMP is None, reason="no objdump / llvm-objdump to disassemble with")
@pytest.mark.parametrize(
    "mcpu,present,absent", [("skylake-avx512", r"%zmm", None), ("znver3", r"%ymm", r"%zmm")]
)
def test_gemm_object_code_has_the_paths_vector_width(mcpu, present, absent) -> None:
    # the fp32 tiles: fp32 activations (host-exact), or a CPU without integer products
    asm = _disassemble(_matmul_func(64, 256, (1, "s"), quant=True), _cpu(mcpu), "float32")
    # the register block: 6 rows of x by 2 vectors of weight rows, one FMA each per k
    assert _count(asm, rf"vfmadd\d+ps\s.*{present}") >= 12, mcpu
    assert absent is None or _count(asm, absent) == 0, mcpu
    assert _count(asm, r"vpdpbusd") == 0  # no AVX-512 VNNI on either


@pytest.mark.skipif(OBJDUMP is None, reason="no objdump / llvm-objdump to disassemble with")
@pytest.mark.parametrize(
    "mcpu,dot,rows",
    [
        ("cascadelake", VNNI_512, 12),
        ("znver4", VNNI_512, 12),
        ("alderlake", AVX_VNNI, 6),
        ("znver3", r"vpmaddubsw\s.*%ymm", 3),
        ("skylake-avx512", r"vpmaddubsw\s.*%zmm", 3),
    ],
)
def test_vnni_gemm_object_code(mcpu: str, dot: str, rows: int) -> None:
    asm = _disassemble(_matmul_func(64, 256, (1, "s"), quant=True), _cpu(mcpu))
    # the register block: `rows` rows of x, 8 steps of 4 k per group, one vpdpbusd (or vpmaddubsw) each
    assert _count(asm, dot) >= rows * 8, mcpu
    assert _count(asm, r"vfmadd\d+ps") < rows * 8  # the fp32 tiles are not what runs
    if "vpmaddubsw" in dot:  # a group's 8 int16 products per row widen once, by one vpmaddwd
        reg = dot[-4:]
        assert rows <= _count(asm, rf"vpmaddwd\s.*{reg}") < rows * 8, mcpu
        assert reg == "%zmm" or _count(asm, r"%zmm") == 0  # AVX2: no 512-bit register anywhere


@pytest.mark.skipif(OBJDUMP is None, reason="no objdump / llvm-objdump to disassemble with")
def test_amx_gemm_object_code() -> None:
    asm = _disassemble(_matmul_func(64, 256, (1, "s"), quant=True), _cpu("sapphirerapids"))
    # per task: its own tile configuration, released at the end; per weight group one tile product
    for pat in (r"ldtilecfg", r"tdpbssd\s", r"tilestored", r"tilerelease", r"call.*syscall"):
        assert _count(asm, pat) >= 1, pat
    assert _count(asm, r"vpdpbusd") == 0  # not the VNNI tiles


@pytest.mark.skipif(OBJDUMP is None, reason="no objdump / llvm-objdump to disassemble with")
@pytest.mark.parametrize("mcpu,k,present,absent", DISASM)
def test_object_code_has_the_paths_instructions(mcpu, k, present, absent) -> None:
    asm = _disassemble(_matmul_func(64, k, ("b", 1), quant=True), _cpu(mcpu))
    for pat in set(present):
        assert _count(asm, pat) >= present.count(pat), (mcpu, pat)
    for pat in absent:
        assert _count(asm, pat) == 0, (mcpu, pat)


@pytest.mark.parametrize("kernel", ["gemv", "gemm", "fp32-gemv", "fp32-gemm"])
def test_gguf_q4_0_takes_the_host_kernels_with_its_zero_point(kernel: str) -> None:
    """GGUF's Q4_0, repacked like MLC's q4 but with codes - 8, runs in the same hand kernels (the decode
    GEMV in every dot-product path this CPU has, the prefill VNNI GEMM, the fp32-activation GEMV and GEMM),
    which must subtract 8: within the int8 reference's bound (fp32 kernels: the exact product's) with zero
    point 8, and off by far more with MLC's 7."""
    from toolkit.quantization import GGUF_BLOCK_LAYOUTS

    n, k = 64, 512
    decode = kernel.endswith("gemv")
    func = _matmul_func(n, k, (1, 1) if decode else (1, "s"), quant=True, zero_point=8.0)
    assert cs._match_q4_matmul(func).layout == GGUF_BLOCK_LAYOUTS["q4_0"]
    qw, qs, w = _q4_weights(n, k, "float16", zero_point=8)
    m = 1 if decode else 9
    x = RNG.standard_normal((1, m, k)).astype(np.float32)
    dev = tvm.cpu()
    if kernel in ("gemv", "gemm"):
        builds = int8_builds(func, gemm=kernel == "gemm")
    else:
        # the first rule the fp32-activation host pipeline tries that takes it: the hand kernel
        rule = next(r for r in cs.cpu_schedule_rules(HOST) if r.apply(func, HOST, False) is not None)
        assert type(rule) is (cs.CPUDequantGEMV if decode else cs.CPUQ4OuterGEMM)
        builds = [_build(func, HOST, [rule])]
    assert builds, "no kernel for this CPU"
    for ex in builds:
        out = tvm.runtime.empty((1, m, n), "float32", dev)
        ex["main"](*[tvm.runtime.tensor(a, dev) for a in (x, qw, qs)], out)
        got = out.numpy()
        if kernel.startswith("fp32"):
            _check_matmul(got, x, w, None)
            continue
        ref, bound = _q8_reference(x, qw, qs, zero_point=8)
        assert np.all(np.abs(got - ref) <= bound), np.abs(got - ref).max()
        ref7, _ = _q8_reference(x, qw, qs, zero_point=7)
        assert np.abs(got - ref7).max() > 100 * bound.max()


@pytest.mark.parametrize("add,kernel", covering([False, True], ["gemv", "gemm"]))
def test_gguf_q4_1_takes_the_int8_kernels_with_its_min(kernel: str, add: bool) -> None:
    """GGUF's Q4_1 (code * scale + min, no zero point) in the int8 decode GEMV (every dot-product path this
    CPU has) and the VNNI prefill GEMM: the codes' part within the int8 reference's bound, the mins' part
    (min x the group's sum of x as rounded for the codes) within fp32 summation of at most K/8 + 8 terms;
    without the min term the result is off by far more. The fp32-activation kernels decline it (generic
    schedules)."""
    decode = kernel == "gemv"
    n, k = 64, 576 if decode else 512  # decode: 512-bit paths end with a half step, its mins too
    func = _matmul_func(n, k, (1, 1) if decode else (1, "s"), quant=True, with_min=True, add=add)
    assert cs._match_q4_matmul(func) is None  # not for the fp32-activation kernels
    assert cs.CPUDequantGEMV().apply(func, HOST, False) is None
    assert cs.CPUQ4OuterGEMM().apply(func, HOST, False) is None
    qw, qs, _ = _q4_weights(n, k, "float16", zero_point=0)
    qm = (RNG.standard_normal((n, k // 32)) * 0.2).astype("float16")
    m = 1 if decode else 9
    x = RNG.standard_normal((1, m, k)).astype(np.float32)
    res = RNG.standard_normal((1, m, n)).astype(np.float32)
    dev = tvm.cpu()
    builds = int8_builds(func, gemm=not decode)
    assert builds, "no kernel for this CPU"
    ref, bound = _q8_reference_with_min(x, qw, qs, qm)
    without_mins, _ = _q8_reference(x, qw, qs, zero_point=0)
    ref = ref + (res if add else 0)
    for ex in builds:
        out = tvm.runtime.empty((1, m, n), "float32", dev)
        args = [x, qw, qs, qm, *([res] if add else [])]
        ex["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
        got = out.numpy()
        assert np.all(np.abs(got - ref) <= bound), np.abs(got - ref).max()
        assert np.abs(got - without_mins - (res if add else 0)).max() > 100 * bound.max()


@pytest.mark.parametrize("add,kernel", covering([False, True], ["gemv", "gemm"]))
def test_gguf_q8_0_takes_the_x86_int8_kernels(kernel: str, add: bool) -> None:
    """GGUF's Q8_0 (8-bit codes - 128, 4 per uint32) in the x86 int8 decode GEMV (every dot-product path
    this CPU has: VNNI on u8 codes from a -128 x sum(x) term, AVX2 on |w| and sign-moved x) and the VNNI
    prefill GEMM: within the int8 reference's bound (exact integer dots, fp32 scale sums); off by far
    more with zero point 127. The fp32-activation kernels decline it (generic schedules); arm64:
    tests/test_arm64_paths.py."""
    n, k = 64, 512
    decode = kernel == "gemv"
    func = _matmul_func(n, k, (1, 1) if decode else (1, "s"), quant=True, bits=8, zero_point=128.0, add=add)
    assert cs._match_q4_matmul(func) is None  # not for the fp32-activation kernels
    assert cs.CPUDequantGEMV().apply(func, HOST, False) is None
    qw = RNG.integers(0, 2**32, (n, k // 4), dtype=np.uint32)
    qw[0, :8] = 0  # codes 0: weight -128 x scale, the extreme |w| of the AVX2 path
    qs = (RNG.random((n, k // 32)) * 0.01 + 0.001).astype("float16")
    m = 1 if decode else 9
    x = RNG.standard_normal((1, m, k)).astype(np.float32)
    res = RNG.standard_normal((1, m, n)).astype(np.float32)
    dev = tvm.cpu()
    if decode:  # every path but AVX-512BW's (no 512-bit vpsignb), which declines
        for isa in HOST_ISAS:
            applies = cs.CPUQ8DotGEMV(isa=isa).apply(func, HOST, False) is not None
            assert applies == (isa != "avx512bw"), isa
    builds = int8_builds(func, gemm=not decode)
    assert builds, "no kernel for this CPU"
    ref, bound = _q8_reference(x, qw, qs, zero_point=128, bits=8)
    ref127, _ = _q8_reference(x, qw, qs, zero_point=127, bits=8)
    for ex in builds:
        out = tvm.runtime.empty((1, m, n), "float32", dev)
        ex["main"](*[tvm.runtime.tensor(a, dev) for a in [x, qw, qs, *([res] if add else [])]], out)
        got = out.numpy() - (res if add else 0)
        assert np.all(np.abs(got - ref) <= bound + 1e-6 * np.abs(res if add else 0)), np.abs(got - ref).max()
        assert np.abs(got - ref127).max() > 100 * bound.max()
