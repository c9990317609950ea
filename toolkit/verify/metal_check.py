"""Metal without a Mac: parse TVM's MSL with clang's C++ front end against a minimal `metal_stdlib` stub.

What this proves: every kernel is well-formed C++-family code with declared identifiers, matching types and
argument counts for the Metal built-ins TVM uses (barriers, simd shuffles, simdgroup matrices, math).
What it does not prove: Metal address-space rules (device/threadgroup/thread become empty here), attribute
semantics ([[buffer(i)]], thread-position attributes), resource limits, or that Apple's compiler accepts it.
MSL spells vector construction and conversion like function calls (`uint4(a, b, c, d)`, `(half4)(v)`), which
C++ vector extensions do not accept, so those two forms are rewritten to helper calls before parsing.
The runtime behaviour of the same schedule is checked separately by running the metal-scheduled TIR as WGSL
(toolkit/verify/verify.py, backend "webgpu").
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

METAL_STDLIB_STUB = r"""
#pragma once
#include <type_traits>
#define kernel extern "C"
#define device
#define threadgroup
#define thread
#define constant const
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __bf16 bfloat;
constexpr half operator""h(long double v) { return (half)v; }
constexpr half operator""h(unsigned long long v) { return (half)v; }
#define TVM_VEC(T, N) typedef T N##2 __attribute__((ext_vector_type(2))); \
  typedef T N##3 __attribute__((ext_vector_type(3))); typedef T N##4 __attribute__((ext_vector_type(4)));
TVM_VEC(float, float) TVM_VEC(half, half) TVM_VEC(bfloat, bfloat) TVM_VEC(int, int) TVM_VEC(uint, uint)
TVM_VEC(short, short) TVM_VEC(ushort, ushort) TVM_VEC(char, char) TVM_VEC(uchar, uchar) TVM_VEC(long, long)
TVM_VEC(ulong, ulong)
template <class V> using __tvm_elem = std::remove_reference_t<decltype(V{}[0])>;
template <class V, class... A> V __tvm_make(A... a) {
  if constexpr (sizeof...(A) == 1) { return V((__tvm_elem<V>)(a)...); }
  else { return V{(__tvm_elem<V>)(a)...}; }
}
template <class V, class U> V __tvm_convert(U u) {
  if constexpr (std::is_arithmetic_v<U> || std::is_same_v<U, half>) { return (V)(__tvm_elem<V>)u; }
  else { return __builtin_convertvector(u, V); }
}
namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);
template <class T> T simd_shuffle(T, ushort);
template <class T> T simd_shuffle_down(T, ushort);
template <class T> T simd_shuffle_up(T, ushort);
template <class T> T simd_shuffle_xor(T, ushort);
template <class T> T simd_broadcast(T, ushort);
template <class T> T simd_sum(T);
template <class T> T simd_max(T);
template <class T> T simd_min(T);
template <class T, int R, int C> struct simdgroup_matrix { T e[R * C / 32 + 1]; };
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
template <class T, int R, int C> simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T);
template <class T, int R, int C, class P>
void simdgroup_load(simdgroup_matrix<T, R, C>&, const P*, ulong elements_per_row = C, long origin = 0,
                    bool transpose = false);
template <class T, int R, int C, class P>
void simdgroup_store(simdgroup_matrix<T, R, C>, P*, ulong elements_per_row = C, long origin = 0,
                     bool transpose = false);
template <class T, int R, int C, class U, class V>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, R, C>&, simdgroup_matrix<U, R, C>,
                                   simdgroup_matrix<V, R, C>, simdgroup_matrix<T, R, C>);
template <class T, class U> T as_type(U);
#define TVM_MATH1(f) template <class T> T f(T);
TVM_MATH1(exp) TVM_MATH1(exp2) TVM_MATH1(log) TVM_MATH1(log2) TVM_MATH1(sqrt) TVM_MATH1(rsqrt) TVM_MATH1(fabs)
TVM_MATH1(abs) TVM_MATH1(tanh) TVM_MATH1(erf) TVM_MATH1(sin) TVM_MATH1(cos) TVM_MATH1(floor) TVM_MATH1(ceil)
TVM_MATH1(round) TVM_MATH1(trunc) TVM_MATH1(sigmoid)
template <class T> T max(T, T);
template <class T> T min(T, T);
template <class T> T pow(T, T);
template <class T> T fmod(T, T);
template <class T> T fma(T, T, T);
template <class T> T clamp(T, T, T);
template <class T, class C> T select(T, T, C);
template <class T> bool isnan(T);
template <class T> bool isinf(T);
}  // namespace metal
"""

_FUNC_HEADER = re.compile(r"// Function: (\S+)\n")
_VEC_TYPES = r"(?:u?int|u?short|u?char|u?long|half|float|bfloat)[234]"
_CONVERT = re.compile(r"\((" + _VEC_TYPES + r")\)\(")
_CONSTRUCT = re.compile(r"(?<![\w.>)])(" + _VEC_TYPES + r")\(")


@dataclass
class MetalCheck:
    kernels: list[str]
    ok: bool
    diagnostics: str


def find_clang() -> str | None:
    for name in ("clang++-15", "clang++", "clang++-16", "clang++-17", "clang++-14"):
        path = shutil.which(name)
        if path:
            return path
    return None


def rewrite_vector_syntax(msl: str) -> str:
    """MSL vector conversion / construction -> helper calls valid in C++ with clang vector extensions."""
    msl = _CONVERT.sub(r"__tvm_convert<\1>(", msl)
    return _CONSTRUCT.sub(r"__tvm_make<\1>(", msl)


def kernel_names(msl: str) -> list[str]:
    return re.findall(r"kernel void (\w+)\(", msl)


def check_msl(msl: str) -> MetalCheck:
    """Parse MSL source (one or many kernels) with clang++ -fsyntax-only against the stub header."""
    clang = find_clang()
    if clang is None:
        raise RuntimeError("clang++ not found (Debian: apt-get install clang-15)")
    with tempfile.TemporaryDirectory(prefix="phi3-msl-") as tmp:
        Path(tmp, "metal_stdlib").write_text(METAL_STDLIB_STUB)
        # TVM repeats the include and helper union per kernel; one translation unit per kernel keeps them
        # legal
        units = _split_units(msl)
        diagnostics, ok = [], True
        for i, unit in enumerate(units):
            src = Path(tmp, f"k{i}.metal")
            src.write_text(rewrite_vector_syntax(unit))
            cmd = [
                clang,
                "-fsyntax-only",
                "-std=c++17",
                "-x",
                "c++",
                "-I",
                tmp,
                "-Wno-unknown-attributes",
                "-Wno-user-defined-literals",
                "-Wno-reserved-user-defined-literal",
                "-ferror-limit=20",
                str(src),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                ok = False
                diagnostics.append(proc.stderr.strip())
    return MetalCheck(kernel_names(msl), ok, "\n".join(diagnostics))


def _split_units(msl: str) -> list[str]:
    parts = [p for p in _FUNC_HEADER.split(msl)]
    # [prefix, name1, body1, ...]: keep bodies that contain a kernel
    bodies = [b for b in parts[2::2] if "kernel void" in b] if len(parts) > 1 else [msl]
    return bodies or [msl]
