"""The arm64 host kernels' instruction-set paths (`cpu_isa`, `cpu_arm_dot`): chosen from the target CPU's
features, built for aarch64 and run under qemu-user on the emulated CPU each path is for (this machine has
no arm64 CPU), numerically equal to the exact int8 reference; and their object code holds the
instructions each path stands for.

qemu CPUs: `cortex-a53` (Armv8.0: NEON only), `cortex-a76` (DotProd, no i8mm), `max` (everything, i8mm
included). qemu enforces them, so a build that used an instruction its CPU lacks dies with SIGILL
(checked below: the emulation really runs the instructions the path names).

Reference and tolerance as in `test_isa_paths` (`_q8_reference`: numpy int8 x code dot products, exact
integers, scales in float64; bound = fp32 accumulation of K / 32 scaled group sums); the fp32-activation
GEMM against the float64 product (`_check_matmul`). Speed: none measured here; qemu timings are not speed."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import arm64_qemu
import numpy as np
import pytest
import tvm
from cases import covering
from test_cpu_q8_gemv import _build, _q8_reference, _q8_reference_with_min
from test_cpu_schedule import _check_matmul, _matmul_func, _q4_weights

from toolkit.compile import cpu_schedule as cs
from toolkit.compile.cpu_isa import host_kernel_isas, q8_dot_isas, q8_gemm_isa

RNG = np.random.default_rng(11)
QEMU_MISSING = arm64_qemu.missing()
OBJDUMP = next(
    (t for t in ("llvm-objdump-15", "llvm-objdump", "aarch64-linux-gnu-objdump") if shutil.which(t)), None
)
# each path: the target it is built for and the qemu CPU that runs it
PATHS = {
    "neon": ({"mcpu": "cortex-a53"}, "cortex-a53"),
    "neon-dotprod": ({"mcpu": "cortex-a76"}, "cortex-a76"),
    "neon-i8mm": ({"mcpu": "cortex-a76", "mattr": ["+i8mm"]}, "max"),
}


def _arm(mcpu: str, mtriple: str = "aarch64-linux-gnu", **extra) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mtriple": mtriple, "mcpu": mcpu, "num-cores": 2, **extra})


def _path_target(path: str) -> tvm.target.Target:
    return _arm(**PATHS[path][0])


@pytest.mark.parametrize(
    "mcpu,extra,gemv,gemm",
    [
        ("cortex-a53", {}, "neon", "fp32-neon"),  # Armv8.0 (Raspberry Pi 3, older phones' little cores)
        ("cortex-a55", {}, "neon-dotprod", "int8-neon-dotprod"),  # Armv8.2 + DotProd
        ("cortex-a76", {}, "neon-dotprod", "int8-neon-dotprod"),
        ("neoverse-n1", {}, "neon-dotprod", "int8-neon-dotprod"),  # Graviton 2
        ("apple-m1", {}, "neon-dotprod", "int8-neon-dotprod"),  # no i8mm before M2
        ("neoverse-v1", {}, "neon-dotprod", "int8-neon-i8mm"),  # Graviton 3
        ("apple-m4", {}, "neon-dotprod", "int8-neon-i8mm"),
        ("cortex-a53", {"mattr": ["+dotprod", "+i8mm"]}, "neon-dotprod", "int8-neon-i8mm"),  # mattr counts
        ("apple-a16", {"mtriple": "arm64-apple-ios"}, "neon-dotprod", "int8-neon-i8mm"),  # iphone-a16 host
        ("generic", {"mtriple": "aarch64-linux-android"}, "neon", "fp32-neon"),  # android presets' host
    ],
)
def test_arm64_path_follows_the_target_cpu(mcpu: str, extra: dict, gemv: str, gemm: str) -> None:
    target = _arm(mcpu, **extra)
    assert q8_dot_isas(target)[0] == gemv
    assert not {"avx2", "avxvnni", "avx512vnni"} & set(q8_dot_isas(target))
    assert host_kernel_isas(target, "int8") == {"q4_gemv": f"int8-{gemv}", "q4_gemm": gemm}
    assert host_kernel_isas(target, "float32") == {"q4_gemv": "fp32", "q4_gemm": "fp32-neon"}
    assert q8_gemm_isa(target) == (gemm[5:] if gemm.startswith("int8-") else None)


def test_arm64_rules_take_the_shapes_their_paths_fit() -> None:
    v1, a53 = _arm("neoverse-v1"), _arm("cortex-a53")

    def first(func, target, acts="int8"):
        return next(r for r in cs.cpu_schedule_rules(target, acts) if r.apply(func, target, False))

    prefill = _matmul_func(64, 256, (1, "s"), quant=True)
    assert isinstance(first(prefill, v1), cs.CPUQ8VNNIGEMM)
    assert isinstance(first(prefill, v1, "float32"), cs.CPUQ4OuterGEMM)  # host-exact
    assert isinstance(first(prefill, a53), cs.CPUQ4OuterGEMM)  # no DotProd: fp32 tiles
    # weight rows not a whole tile of 8: the int8 GEMM declines, an fp32 rule takes it
    assert not isinstance(first(_matmul_func(36, 256, (1, "s"), quant=True), v1), cs.CPUQ8VNNIGEMM)
    decode = _matmul_func(64, 576, ("b", 1), quant=True)
    assert isinstance(first(decode, v1), cs.CPUQ8DotGEMV) and isinstance(first(decode, a53), cs.CPUQ8DotGEMV)
    # K not a whole number of 64-weight steps: the fp32-activation GEMV
    assert isinstance(first(_matmul_func(64, 96, ("b", 1), quant=True), v1), cs.CPUDequantGEMV)


def _build_arm(func, target, workdir: Path) -> Path:
    """`func` built by our int8 rules for the arm64 `target`, linked with the qemu harness."""
    ex = _build(func, target, cs.cpu_schedule_rules(target, "int8"))
    obj, exe = workdir / "kernel.o", workdir / "kernel"
    ex.mod.write_to_file(str(obj))
    arm64_qemu.link(obj, exe)
    return exe


def _run(func, path: str, arrays: list[np.ndarray]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        exe = _build_arm(func, _path_target(path), Path(d))
        return arm64_qemu.run(exe, arrays, PATHS[path][1])[-1]


def _check_q8(got: np.ndarray, x, qw, qs, res) -> None:
    ref, bound = _q8_reference(x, qw, qs)
    if res is not None:
        ref, bound = ref + res, bound + 1e-7 * np.abs(ref + res)
    err = np.abs(got - ref)
    assert np.all(err <= bound), (err.max(), bound.min())


def _inputs(n: int, k: int, rows: tuple, add: bool, scale_dtype: str = "float16"):
    qw, qs, w = _q4_weights(n, k, scale_dtype)
    x = RNG.standard_normal((*rows, k)).astype(np.float32)
    x[..., 32:64] = 0  # an all-zero group: scale 0, no division by zero
    x[..., 0] = 1e3  # one group dominated by one value: most of its codes round to 0
    res = RNG.standard_normal((*rows, n)).astype(np.float32) if add else None
    out = np.zeros((*rows, n), np.float32)
    return qw, qs, w, x, res, [x, qw, qs] + ([res] if add else []) + [out]


# decode: (n, k, rows as compiled, rows at run time, residual add, scale dtype)
GEMV_CASES = [
    (64, 256, ("b", 1), (3, 1), True, "float16"),  # decode's dynamic batch of 3
    (32, 576, (1, 1), (1, 1), False, "float32"),  # SmolLM2's K: 9 chunks of 64
    pytest.param(48, 1024, (1, 2), (1, 2), True, "float16", marks=pytest.mark.slow),  # two static rows
    (32, 8192, ("b", 1), (1, 1), True, "float16"),  # Phi-3-mini's down-projection K
]


@pytest.mark.skipif(QEMU_MISSING is not None, reason=str(QEMU_MISSING))
@pytest.mark.parametrize(
    "n,k,rows,real_rows,add,scale_dtype,path", covering(GEMV_CASES, ["neon", "neon-dotprod"])
)
def test_gemv_path_under_qemu_matches_int8_reference(path, n, k, rows, real_rows, add, scale_dtype) -> None:
    func = _matmul_func(n, k, rows, quant=True, scale_dtype=scale_dtype, add=add)
    assert host_kernel_isas(_path_target(path), "int8")["q4_gemv"] == f"int8-{path}"
    qw, qs, _, x, res, arrays = _inputs(n, k, real_rows, add, scale_dtype)
    _check_q8(_run(func, path, arrays), x, qw, qs, res)


@pytest.mark.skipif(QEMU_MISSING is not None, reason=str(QEMU_MISSING))
@pytest.mark.parametrize("path", ["neon", "neon-dotprod"])
def test_gemv_path_with_gguf_q4_1_mins_under_qemu(path) -> None:
    """GGUF's Q4_1 (code * scale + min) in the arm64 decode GEMV: the min term is shared with x86
    (`cpu_q8_gemv`), the dot products are arm64's."""
    n, k, rows = 64, 256, (3, 1)
    func = _matmul_func(n, k, ("b", 1), quant=True, add=True, with_min=True)
    qw, qs, _, x, res, arrays = _inputs(n, k, rows, True)
    qm = (RNG.standard_normal((n, k // 32)) * 0.2).astype("float16")
    ref, bound = _q8_reference_with_min(x, qw, qs, qm)
    got = _run(func, path, [x, qw, qs, qm, res, arrays[-1]])
    assert np.all(np.abs(got - ref - res) <= bound + 1e-7 * np.abs(ref + res)), np.abs(got - ref - res).max()


@pytest.mark.skipif(QEMU_MISSING is not None, reason=str(QEMU_MISSING))
@pytest.mark.parametrize("path", ["neon-dotprod", "neon-i8mm"])
def test_int8_gemm_path_with_gguf_q4_1_mins_under_qemu(path) -> None:
    """GGUF's Q4_1 in the arm64 prefill GEMM (`sdot` and `smmla` register blocks, 13 rows: a partial block
    and an odd row): min x the group's sum of x added per group, within the int8 reference's bound."""
    n, k, m = 64, 256, 13
    assert host_kernel_isas(_path_target(path), "int8")["q4_gemm"] == f"int8-{path}"
    func = _matmul_func(n, k, (1, "s"), quant=True, add=True, with_min=True)
    qw, qs, _, x, res, arrays = _inputs(n, k, (1, m), True)
    qm = (RNG.standard_normal((n, k // 32)) * 0.2).astype("float16")
    ref, bound = _q8_reference_with_min(x, qw, qs, qm)
    got = _run(func, path, [x, qw, qs, qm, res, arrays[-1]])
    assert np.all(np.abs(got - ref - res) <= bound + 1e-7 * np.abs(ref + res)), np.abs(got - ref - res).max()


@pytest.mark.skipif(QEMU_MISSING is not None, reason=str(QEMU_MISSING))
@pytest.mark.parametrize("path", ["neon", "neon-dotprod"])
def test_gemv_path_with_gguf_q8_0_codes_under_qemu(path) -> None:
    """GGUF's Q8_0 (8-bit codes - 128, 4 per uint32) in the arm64 decode GEMV: code - 128 as a signed byte
    times x (`sdot`, or int16 products), within the int8 reference's bound; prefill declines it (the arm64
    GEMM reads nibbles): generic schedules."""
    n, k, rows = 64, 256, (3, 1)
    func = _matmul_func(n, k, ("b", 1), quant=True, add=True, bits=8, zero_point=128.0)
    prefill = _matmul_func(n, k, (1, "s"), quant=True, bits=8, zero_point=128.0)
    assert cs.CPUQ8VNNIGEMM().apply(prefill, _path_target("neon-dotprod"), False) is None
    qw = RNG.integers(0, 2**32, (n, k // 4), dtype=np.uint32)
    qw[0, :8] = 0  # codes 0: weight -128 x scale
    qs = (RNG.random((n, k // 32)) * 0.01 + 0.001).astype("float16")
    x = RNG.standard_normal((*rows, k)).astype(np.float32)
    res = RNG.standard_normal((*rows, n)).astype(np.float32)
    got = _run(func, path, [x, qw, qs, res, np.zeros((*rows, n), np.float32)])
    ref, bound = _q8_reference(x, qw, qs, zero_point=128, bits=8)
    assert np.all(np.abs(got - ref - res) <= bound + 1e-7 * np.abs(ref + res)), np.abs(got - ref - res).max()


@pytest.mark.skipif(QEMU_MISSING is not None, reason=str(QEMU_MISSING))
@pytest.mark.parametrize("path,block", covering(["neon", "neon-dotprod"], ["q4_k", "q5_k", "q6_k"]))
def test_gemv_path_with_gguf_k_quants_under_qemu(path, block) -> None:
    """GGUF's Q4_K / Q5_K / Q6_K in the arm64 decode GEMV: the sub-block scales (and mins) derived from the
    super-block values and the codes' high bits (shared with x86, `cpu_q8_gemv`), the dot products arm64's."""
    from test_gguf_kquants import k_quant_reference, q4_k_matmul

    n, k = 64, 512
    func, arrays, qs_eff, qm_eff = q4_k_matmul(n, k, "b", RNG, block)
    x = RNG.standard_normal((3, 1, k)).astype(np.float32)  # decode's batch of 3
    got = _run(func, path, [x, *arrays.values(), np.zeros((3, 1, n), np.float32)])
    ref, bound, wrong = k_quant_reference(x, arrays, block, qs_eff, qm_eff)
    assert np.all(np.abs(got - ref) <= bound), np.abs(got - ref).max()
    assert np.abs(got - wrong).max() > 100 * bound.max()


@pytest.mark.skipif(QEMU_MISSING is not None, reason=str(QEMU_MISSING))
@pytest.mark.parametrize("path,block", covering(["neon-dotprod", "neon-i8mm"], ["q4_k", "q5_k", "q6_k"]))
def test_int8_gemm_path_with_gguf_k_quants_under_qemu(path, block) -> None:
    """GGUF's K-quants in the arm64 prefill GEMM (`sdot` and `smmla` blocks, 13 rows: a partial block and an
    odd row): scales (and mins) derived per tile from the super-block, high bits put in while repacking,
    Q6_K's scales per 16 weights; within the int8 reference's bound and far from it without the high bits
    or mins."""
    from test_gguf_kquants import k_quant_reference, q4_k_matmul

    n, k, m = 16, 512, 13
    func, arrays, qs_eff, qm_eff = q4_k_matmul(n, k, "s", RNG, block)
    assert cs.CPUQ8VNNIGEMM().apply(func, _path_target(path), False) is not None
    x = RNG.standard_normal((1, m, k)).astype(np.float32)
    got = _run(func, path, [x, *arrays.values(), np.zeros((1, m, n), np.float32)])
    ref, bound, wrong = k_quant_reference(x, arrays, block, qs_eff, qm_eff)
    assert np.all(np.abs(got - ref) <= bound), np.abs(got - ref).max()
    assert np.abs(got - wrong).max() > 100 * bound.max()


# prefill: (n, k, rows at run time, residual add, scale dtype); 13 and 25 rows end in a partial register
# block (4 rows) and an odd row (smmla's row pairs)
GEMM_CASES = [
    (64, 256, 13, True, "float16"),
    (48, 160, 1, False, "float32"),  # q4f32_1's scales
    pytest.param(32, 1024, 25, True, "float16", marks=pytest.mark.slow),
    (16, 8192, 6, True, "float16"),  # Phi-3-mini's down-projection K
]


@pytest.mark.skipif(QEMU_MISSING is not None, reason=str(QEMU_MISSING))
@pytest.mark.parametrize("n,k,m,add,scale_dtype,path", covering(GEMM_CASES, ["neon-dotprod", "neon-i8mm"]))
def test_int8_gemm_path_under_qemu_matches_int8_reference(path, n, k, m, add, scale_dtype) -> None:
    assert host_kernel_isas(_path_target(path), "int8")["q4_gemm"] == f"int8-{path}"
    func = _matmul_func(n, k, (1, "s"), quant=True, scale_dtype=scale_dtype, add=add)
    qw, qs, _, x, res, arrays = _inputs(n, k, (1, m), add, scale_dtype)
    _check_q8(_run(func, path, arrays), x, qw, qs, res)


@pytest.mark.skipif(QEMU_MISSING is not None, reason=str(QEMU_MISSING))
def test_fp32_gemm_fallback_under_qemu_matches_numpy() -> None:
    # Armv8.0 without DotProd: prefill keeps fp32 activations in 8-lane FMA tiles
    assert host_kernel_isas(_path_target("neon"), "int8")["q4_gemm"] == "fp32-neon"
    n, k, m = 64, 160, 7
    func = _matmul_func(n, k, (1, "s"), quant=True, add=True)
    _, _, w, x, res, arrays = _inputs(n, k, (1, m), True)
    _check_matmul(_run(func, "neon", arrays), x, w, res)


@pytest.mark.skipif(QEMU_MISSING is not None, reason=str(QEMU_MISSING))
@pytest.mark.parametrize(
    "base,extension,rows,cpus",
    [
        ("cortex-a53", "dotprod", ("b", 1), ("cortex-a76", "cortex-a53")),  # decode GEMV: sdot
        ("cortex-a76", "i8mm", (1, "s"), ("max", "cortex-a76")),  # prefill GEMM: smmla
    ],
)
def test_build_runs_with_its_extension_and_faults_without(base, extension, rows, cpus) -> None:
    # one build that differs from its base CPU by one extension: right on a CPU with it, an illegal
    # instruction on one without (qemu runs what the object holds), so the paths' instructions do execute
    target = _arm(base, mattr=[f"+{extension}"])
    path = q8_gemm_isa(target) if rows[1] == "s" else q8_dot_isas(target)[0]
    assert target.mcpu == base and path == f"neon-{extension}"
    func = _matmul_func(32, 128, rows, quant=True)
    qw, qs, _, x, _, arrays = _inputs(32, 128, (1, 5) if rows[1] == "s" else (1, 1), False)
    with tempfile.TemporaryDirectory() as d:
        exe = _build_arm(func, target, Path(d))
        _check_q8(arm64_qemu.run(exe, arrays, cpus[0])[-1], x, qw, qs, None)
        with pytest.raises(subprocess.CalledProcessError) as e:
            arm64_qemu.run(exe, arrays, cpus[1])
    assert e.value.returncode == -4 or b"Illegal instruction" in e.value.stderr, e.value.stderr


def _disassemble(func, target) -> str:
    with tempfile.TemporaryDirectory() as d:
        obj = Path(d) / "k.o"
        _build(func, target, cs.cpu_schedule_rules(target, "int8")).mod.write_to_file(str(obj))
        return subprocess.run([OBJDUMP, "-d", str(obj)], capture_output=True, text=True, check=True).stdout


def _count(asm: str, mnemonic: str) -> int:
    # llvm-objdump 15 prints Mach-O arm64 dot products without operands
    return len(re.findall(rf"\t{mnemonic}(?:\t|$)", asm, flags=re.M))


DOTS = ("sdot", "udot", "smmla", "ummla", "usmmla", "usdot")


@pytest.mark.skipif(OBJDUMP is None, reason="no llvm-objdump / aarch64 objdump to disassemble with")
@pytest.mark.parametrize(
    "target,gemv,gemm",
    [
        # plain NEON: no dot-product instructions anywhere; the GEMV's int16 products and pairwise adds
        (_arm("cortex-a53"), {"smull": 1, "saddlp": 4, "addp": 2}, {"fmla": 12}),
        # DotProd: 4 sdot per 64-weight GEMV step; the GEMM block 4 rows x 2 quads x 8 steps per group
        (_arm("neoverse-n1"), {"sdot": 4}, {"sdot": 64}),
        (_arm("apple-m1", "arm64-apple-darwin"), {"sdot": 4}, {"sdot": 64}),
        # i8mm: the GEMM block 2 x 4 row pairs x 4 steps of 8 k per group
        (_arm("neoverse-v1"), {"sdot": 4}, {"smmla": 32}),
        (_arm("apple-a16", "arm64-apple-ios"), {"sdot": 4}, {"smmla": 32}),
    ],
    ids=["cortex-a53", "neoverse-n1", "apple-m1", "neoverse-v1", "apple-a16"],
)
def test_object_code_has_the_paths_instructions(target, gemv: dict, gemm: dict) -> None:
    for func, want in [
        (_matmul_func(64, 256, ("b", 1), quant=True), gemv),
        (_matmul_func(64, 256, (1, "s"), quant=True), gemm),
    ]:
        asm = _disassemble(func, target)
        for mnemonic, at_least in want.items():
            assert _count(asm, mnemonic) >= at_least, (mnemonic, _count(asm, mnemonic))
        for mnemonic in DOTS:
            if mnemonic not in want:
                assert _count(asm, mnemonic) == 0, mnemonic


@pytest.fixture(scope="module")
def tiny_cfg():
    from tiny import make_tiny_checkpoint

    from toolkit.config import load_hf_config

    with tempfile.TemporaryDirectory() as d:
        make_tiny_checkpoint(d, "mini-4k")
        yield load_hf_config(d)


# the 4 q4 linears of a layer (qkv, o, gate_up, down) are each a decode GEMV (4 sdot, or 4 saddlp, per step)
# and a prefill GEMM (32 smmla or 64 sdot per group in the register block); the kernels are not separate
# symbols in the library, so the counts are over all of its code
@pytest.mark.slow
@pytest.mark.skipif(OBJDUMP is None, reason="no llvm-objdump / aarch64 objdump to disassemble with")
@pytest.mark.parametrize(
    "mcpu,gemv,gemm,at_least",
    [
        ("neoverse-v1", "int8-neon-dotprod", "int8-neon-i8mm", {"sdot": 4 * 4, "smmla": 4 * 32}),
        ("neoverse-n1", "int8-neon-dotprod", "int8-neon-dotprod", {"sdot": 4 * 4 + 4 * 64}),
        ("cortex-a53", "int8-neon", "fp32-neon", {"saddlp": 4 * 4}),
    ],
)
def test_tiny_model_library_for_arm64_hosts(tiny_cfg, tmp_path, mcpu, gemv, gemm, at_least) -> None:
    # the whole model through the pipeline for an arm64 CPU: every q4 matmul shape of the model takes the
    # path its CPU has (the manifest says which), and the library's code holds those instructions. A .tar of
    # aarch64 objects: a .so would need a cross linker the pipeline doesn't set up (not a targets/ preset).
    import tarfile

    from toolkit.compile.compile_model import compile_model
    from toolkit.targets import Preset

    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "num-cores": 4}
    preset = Preset("arm64-test", "arm64 host", target, ".tar", True, q4_activations="int8")
    manifest = compile_model(tiny_cfg, "q4f16_1", preset, tmp_path / "out").manifest
    assert manifest["cpu_isa"] == {"q4_gemv": gemv, "q4_gemm": gemm}
    with tarfile.open(tmp_path / "out" / manifest["library"]) as tar:
        tar.extractall(tmp_path / "objs", filter="data")
    asm = "".join(
        subprocess.run([OBJDUMP, "-d", str(o)], capture_output=True, text=True, check=True).stdout
        for o in sorted((tmp_path / "objs").glob("*.o"))
    )
    for mnemonic, count in at_least.items():
        assert _count(asm, mnemonic) >= count, (mnemonic, _count(asm, mnemonic))
    for mnemonic in DOTS:
        if mnemonic not in at_least:
            assert _count(asm, mnemonic) == 0, mnemonic
