"""The host q4 kernels' instruction-set paths (`toolkit/compile/cpu_isa.py`) side by side, interleaved.

Every path the host CPU has is built for each Phi-3-mini shape, then timed in rounds A B C, B C A, ... so a
change in machine load hits all of them alike; per path the median ms per call is reported, and the
median over rounds of its time divided by the first path's in the same round (the figure to trust on a
shared machine). Decode GEMV paths: avx2, avxvnni, avx512vnni; each call reads a different weight copy
(cold caches, as in decode) unless --hot. With --prefill M, the prefill GEMM paths at M rows (hot):
fp32-avx2 (8-lane tiles), fp32-avx512 (16-lane tiles), int8-avxvnni, int8-avx512vnni, int8-amx (AMX tiles).

    python examples/bench_isa_gemv.py --threads 1,2
    python examples/bench_isa_gemv.py --threads 1 --hot --rounds 30
    python examples/bench_isa_gemv.py --threads 1,2 --prefill 128 --rounds 7

Thread counts are set with TVM_NUM_THREADS, so every count runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from bench_cpu_kernels import COLD_BYTES, _q4_func

SHAPES = {"qkv": (9216, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)}  # (N, K), Phi-3-mini


def _build(n: int, k: int, isa: str, target):
    import tvm
    from tvm.s_tir import dlight as dl

    from toolkit.compile.cpu_schedule import CPUQ8DotGEMV

    mod = tvm.IRModule({"main": _q4_func(n, k, (1, 1))})
    with target:
        mod = dl.ApplyDefaultSchedule(CPUQ8DotGEMV(isa=isa))(mod)
    return tvm.compile(mod, target=target)


def _build_gemm(n: int, k: int, path: str, target):
    """A prefill GEMM path built directly (the rules pick only one per target)."""
    import tvm

    from toolkit.compile.cpu_amx_gemm import q8_amx_gemm
    from toolkit.compile.cpu_q4_gemm import q4_outer_gemm
    from toolkit.compile.cpu_q8_gemm import q8_vnni_gemm
    from toolkit.compile.cpu_schedule import _match_q4_matmul

    func = _q4_func(n, k, (1, "s"))
    q = _match_q4_matmul(func)
    if path == "int8-amx":
        kernel = q8_amx_gemm(func, q)
    elif path == "int8-avx512vnni":
        kernel = q8_vnni_gemm(func, q, mr=12, lanes=16)
    elif path == "int8-avxvnni":
        kernel = q8_vnni_gemm(func, q, mr=6, lanes=8)
    else:
        lanes = 16 if path == "fp32-avx512" else 8
        kernel = q4_outer_gemm(func, q, mr=6, nr=2 * lanes, lanes=lanes)
    return tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target)


def _gemm_paths(target) -> list[str]:
    from toolkit.compile.cpu_isa import q4_gemm_isa, q8_dot_isas, q8_gemm_isa

    vnni = [f"int8-{i}" for i in ("avxvnni", "avx512vnni") if i in q8_dot_isas(target)]
    amx = ["int8-amx"] if q8_gemm_isa(target) == "amx" else []
    return ["fp32-avx2"] + (["fp32-avx512"] if q4_gemm_isa(target) == "avx512" else []) + vnni + amx


def run_child(args) -> dict:
    import tvm

    from toolkit.compile.cpu_isa import q8_dot_isas

    if args.mcpu == "host":  # as the host preset targets this machine (its mattr adds AMX a VM's name hides)
        from toolkit.targets import load_preset

        target = tvm.target.Target({**load_preset("host").target_dict, "num-cores": 2})
    else:
        target = tvm.target.Target({"kind": "llvm", "mcpu": args.mcpu, "num-cores": 2})
    m = args.prefill or 1
    if args.prefill:
        isas = _gemm_paths(target)
    else:
        isas = [i for i in args.isas.split(",") if i in q8_dot_isas(target)]
    dev, rng = tvm.cpu(), np.random.default_rng(0)
    out = {"threads": int(os.environ.get("TVM_NUM_THREADS", "0")), "mcpu": args.mcpu, "kernels": []}
    for name in args.kernels.split(","):
        n, k = SHAPES[name]
        build = _build_gemm if args.prefill else _build
        fns = {isa: build(n, k, isa, target)["main"] for isa in isas}
        wbytes = n * k // 2 + n * k // 32 * 2
        copies = 1 if args.hot or args.prefill else max(2, -(-COLD_BYTES // wbytes))
        qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
        qs = (rng.random((n, k // 32)) * 0.02).astype(np.float16)
        weights = [(tvm.runtime.tensor(qw, dev), tvm.runtime.tensor(qs, dev)) for _ in range(copies)]
        x = tvm.runtime.tensor(rng.standard_normal((1, m, k)).astype(np.float32), dev)
        y = tvm.runtime.empty((1, m, n), "float32", dev)
        results = {}
        for isa, f in fns.items():  # warm-up; the paths agree up to activation rounding (int8 vs fp32)
            for w in weights[:4]:
                f(x, *w, y)
            results[isa] = y.numpy().copy()
        ref = results[isas[0]]
        for isa in isas:
            assert np.abs(results[isa] - ref).max() <= 2e-2 * np.abs(ref).max(), isa
        calls = max(1, min(copies, 16 if m == 1 else 1))
        samples: dict[str, list[float]] = {isa: [] for isa in isas}
        i = 0
        for rnd in range(args.rounds):
            order = isas[rnd % len(isas) :] + isas[: rnd % len(isas)]
            for isa in order:
                f = fns[isa]
                t0 = time.perf_counter()
                for _ in range(calls):
                    f(x, *weights[i % copies], y)
                    i += 1
                samples[isa].append((time.perf_counter() - t0) / calls * 1e3)
        base = np.array(samples[isas[0]])
        for isa in isas:
            ms = np.array(samples[isa])
            row = {
                "kernel": name,
                "n": n,
                "k": k,
                "m": m,
                "isa": isa,
                "median_ms": float(np.median(ms)),
                "weight_gb_s": wbytes / float(np.median(ms)) / 1e6,
                "gflop_s": 2 * m * n * k / float(np.median(ms)) / 1e6,
                f"ratio_vs_{isas[0]}": float(np.median(ms / base)),
            }
            out["kernels"].append(row)
            rate = f"{row['gflop_s']:6.1f} GFLOP/s" if args.prefill else f"{row['weight_gb_s']:6.2f} GB/s"
            print(
                f"[{out['threads']}t] {name:8s} M={m:<4d} {isa:16s} median {row['median_ms']:8.3f} ms "
                f"{rate}  time/{isas[0]} {row[f'ratio_vs_{isas[0]}']:.3f}",
                flush=True,
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--kernels", default=",".join(SHAPES))
    p.add_argument("--isas", default="avx2,avxvnni,avx512vnni")
    p.add_argument("--mcpu", default="host", help="LLVM CPU name (default: the host preset's target)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--hot", action="store_true", help="one weight copy (hot cache) instead of cycling")
    p.add_argument("--prefill", type=int, default=0, help="time the prefill GEMM paths at this many rows")
    p.add_argument("--json", default=None)
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    results = []
    for t in args.threads.split(","):
        cmd = [sys.executable, __file__, "--_child", "--kernels", args.kernels, "--isas", args.isas]
        cmd += ["--mcpu", args.mcpu, "--rounds", str(args.rounds), "--prefill", str(args.prefill)]
        cmd += ["--hot"] if args.hot else []
        print(f"load average before {t}t: {os.getloadavg()}", flush=True)
        with subprocess.Popen(
            cmd, env=dict(os.environ, TVM_NUM_THREADS=t), stdout=subprocess.PIPE, text=True
        ) as proc:
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    results.append(json.loads(line[len("RESULT ") :]))
                else:
                    print(line, end="", flush=True)
        if proc.returncode:
            raise SystemExit(f"benchmark child for {t} threads failed (exit {proc.returncode})")
    load = os.getloadavg()
    print(f"load average after: {load}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "loadavg": load, "hot": args.hot}, f, indent=1)


if __name__ == "__main__":
    main()
