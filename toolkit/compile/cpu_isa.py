"""Which instruction set the host kernels are built for, decided from the target's CPU features.

The target's `mcpu` (host detection for the `host` preset, or whatever a preset names) is asked through
LLVM's feature table, so a build for another CPU (`-mcpu=znver3`) picks that CPU's path, not this machine's.
On x86 the int8 dot-product GEMV has four paths, widest first:

- `avx512vnni`: `vpdpbusd` on 512-bit registers (128 weights per instruction pair);
- `avxvnni`: `vpdpbusd` on 256-bit registers, VEX (AVX-VNNI) or EVEX (AVX-512 VNNI + VL) encoded;
- `avx512bw`: `vpmaddubsw` + `vpmaddwd` on 512-bit registers, for AVX-512 without VNNI (Skylake-SP); not
  for 8-bit codes (GGUF Q8_0), whose sign trick (`vpsignb`) has no 512-bit form;
- `avx2`: `vpmaddubsw` + `vpmaddwd`, the fallback every x86-64-v3 CPU has.

The prefill GEMM, with int8 activations, runs on AMX tiles (`tdpbssd`, `cpu_amx_gemm`) where the CPU has
them (Sapphire Rapids and later), else the widest `vpdpbusd` (512- or 256-bit, `cpu_q8_gemm`), else
`vpmaddubsw` in the same kernel (512-bit with AVX-512BW, else AVX2's); with fp32 activations (or GGUF Q8_0
codes without VNNI) fp32 FMA tiles 16 lanes wide with AVX-512F, else 8 (`cpu_q4_gemm`).

On arm64 (`cpu_arm_dot`) the GEMV has two paths: `neon-dotprod` (`sdot`, Armv8.2 DotProd) and `neon`
(`smull`/`saddlp`/`addp`, every Armv8 CPU); the prefill GEMM runs `smmla` 2x2 int8 blocks where the CPU
has i8mm (`neon-i8mm`), else `sdot` (`neon-dotprod`), else the fp32 tiles (`fp32-neon`, 8 lanes: two
128-bit registers per vector).
"""

from __future__ import annotations

from tvm.target import Target, codegen

# widest first; each entry: the LLVM features it needs (any one tuple of the list suffices)
Q8_DOT_ISAS: dict[str, list[tuple[str, ...]]] = {
    "avx512vnni": [("avx512vnni", "avx512bw")],
    "avxvnni": [("avxvnni",), ("avx512vnni", "avx512vl")],
    "avx512bw": [("avx512bw",)],  # `vpmaddubsw` on 512-bit registers (Skylake-SP: AVX-512 without VNNI)
    "avx2": [("avx2",)],
    "neon-dotprod": [("neon", "dotprod")],
    "neon": [("neon",)],
}
# fp32 lanes of a vector register per GEMV path (the accumulators' width; 8 on arm64 = two 128-bit
# registers, one 64-weight chunk per step as on AVX2)
Q8_DOT_LANES = {"avx512vnni": 16, "avxvnni": 8, "avx512bw": 16, "avx2": 8, "neon-dotprod": 8, "neon": 8}
# the int8-activation prefill GEMM's paths, widest first (features as in Q8_DOT_ISAS)
Q8_GEMM_ISAS: dict[str, list[tuple[str, ...]]] = {
    "amx": [("amx-int8", "amx-tile", "avx512bw")],  # the tiles' sums are scaled on 512-bit vectors
    "avx512vnni": Q8_DOT_ISAS["avx512vnni"],
    "avxvnni": Q8_DOT_ISAS["avxvnni"],
    # `vpmaddubsw` + `vpmaddwd` where there is no VNNI: codes of up to 6 bits (not Q8_0)
    "avx512bw": Q8_DOT_ISAS["avx512bw"],
    "avx2": Q8_DOT_ISAS["avx2"],
    "neon-i8mm": [("neon", "i8mm")],
    "neon-dotprod": Q8_DOT_ISAS["neon-dotprod"],
}
# the paths (GEMV and GEMM) that run `vpmaddubsw` in place of `vpdpbusd` where there is no VNNI
MADDUBS_ISAS = ("avx512bw", "avx2")
# int32 lanes of the x86 int8 GEMM's registers, also the weight rows per tile (arm64's: cpu_arm_dot)
Q8_GEMM_LANES = {"amx": 16, "avx512vnni": 16, "avxvnni": 8, "avx512bw": 16, "avx2": 8}
# the prefill GEMM's fp32 FMA tiles: vector width per path (`avx2` also serves x86 CPUs without AVX2, where
# LLVM splits the 8-lane vectors; `neon` the same on arm64's 128-bit registers)
Q4_GEMM_LANES = {"avx512": 16, "avx2": 8, "neon": 8}


def has_features(target: Target, features: tuple[str, ...]) -> bool:
    """Whether the target's CPU has all `features` (LLVM names); False on triples that don't know them."""
    try:
        return all(bool(codegen.llvm_cpu_has_features([f], target)) for f in features)
    except Exception:  # noqa: BLE001 - non-x86 triples: the feature names don't exist there
        return False


def q8_dot_isas(target: Target) -> list[str]:
    """The int8 dot-product GEMV paths the target's CPU can run, widest first (empty: none)."""
    if target.kind.name != "llvm":
        return []
    return [isa for isa, alts in Q8_DOT_ISAS.items() if any(has_features(target, f) for f in alts)]


def q8_dot_isa(target: Target) -> str | None:
    """The preferred int8 dot-product GEMV path for the target (None: no integer dot products)."""
    isas = q8_dot_isas(target)
    return isas[0] if isas else None


def q4_gemm_isa(target: Target) -> str:
    """The prefill GEMM's fp32 tile path (a `Q4_GEMM_LANES` key): 512-bit FMA tiles where AVX-512F is."""
    if has_features(target, ("avx512f",)):
        return "avx512"
    return "neon" if has_features(target, ("neon",)) else "avx2"


def q8_gemm_isa(target: Target) -> str | None:
    """The int8-activation prefill GEMM's path (a `Q8_GEMM_ISAS` key): AMX tiles (`cpu_amx_gemm`), else the
    widest `vpdpbusd` the CPU has (`cpu_q8_gemm`), else `smmla` or `sdot` on arm64 (`cpu_arm_dot`); None
    without any (the fp32 tiles serve those CPUs)."""
    if target.kind.name != "llvm":
        return None
    return next(
        (isa for isa, alts in Q8_GEMM_ISAS.items() if any(has_features(target, f) for f in alts)), None
    )


def host_kernel_isas(target: Target, q4_activations: str) -> dict[str, str]:
    """The manifest's record of the host matmul kernels' instruction-set paths, per kernel family:
    `q4_gemv` (decode) is `int8-<Q8_DOT_ISAS key>` or `fp32` (fp32 activations, or no integer dot
    products on this CPU; a shape the widest path can't step through takes the next narrower one);
    `q4_gemm` (prefill) is `int8-<Q8_GEMM_ISAS key>` or `fp32-<Q4_GEMM_LANES key>`."""
    int8 = q4_activations == "int8"
    gemv, gemm = (q8_dot_isa(target), q8_gemm_isa(target)) if int8 else (None, None)
    return {
        "q4_gemv": f"int8-{gemv}" if gemv else "fp32",
        "q4_gemm": f"int8-{gemm}" if gemm else f"fp32-{q4_gemm_isa(target)}",
    }
