"""The int8 q4 decode GEMV's instruction-set paths (`toolkit/compile/cpu_isa.py`) side by side, interleaved.

Every path the host CPU has is built for each Phi-3-mini shape, then timed in rounds A B C, B C A, ... so a
change in machine load hits all of them alike; per path the median ms per call is reported, and the
median over rounds of its time divided by the AVX2 path's in the same round (the figure to trust on a
shared machine). Each call reads a different weight copy (cold caches, as in decode) unless --hot.

    python examples/bench_isa_gemv.py --threads 1,2
    python examples/bench_isa_gemv.py --threads 1 --hot --rounds 30

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


def run_child(args) -> dict:
    import tvm

    from toolkit.compile.cpu_isa import q8_dot_isas

    target = tvm.target.Target({"kind": "llvm", "mcpu": args.mcpu, "num-cores": 2})
    isas = [i for i in args.isas.split(",") if i in q8_dot_isas(target)]
    dev, rng = tvm.cpu(), np.random.default_rng(0)
    out = {"threads": int(os.environ.get("TVM_NUM_THREADS", "0")), "mcpu": args.mcpu, "kernels": []}
    for name in args.kernels.split(","):
        n, k = SHAPES[name]
        fns = {isa: _build(n, k, isa, target)["main"] for isa in isas}
        wbytes = n * k // 2 + n * k // 32 * 2
        copies = 1 if args.hot else max(2, -(-COLD_BYTES // wbytes))
        qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
        qs = (rng.random((n, k // 32)) * 0.02).astype(np.float16)
        weights = [(tvm.runtime.tensor(qw, dev), tvm.runtime.tensor(qs, dev)) for _ in range(copies)]
        x = tvm.runtime.tensor(rng.standard_normal((1, 1, k)).astype(np.float32), dev)
        y = tvm.runtime.empty((1, 1, n), "float32", dev)
        results = {}
        for isa, f in fns.items():  # warm-up, and every path must agree with AVX2 to fp32 summation order
            for w in weights[:4]:
                f(x, *w, y)
            results[isa] = y.numpy().copy()
        ref = results[isas[-1]]
        for isa in isas:
            assert np.abs(results[isa] - ref).max() <= 1e-4 * np.abs(ref).max(), isa
        calls = max(1, min(copies, 16))
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
        base = np.array(samples["avx2"]) if "avx2" in samples else None
        for isa in isas:
            ms = np.array(samples[isa])
            row = {
                "kernel": name,
                "n": n,
                "k": k,
                "isa": isa,
                "median_ms": float(np.median(ms)),
                "weight_gb_s": wbytes / float(np.median(ms)) / 1e6,
                "ratio_vs_avx2": float(np.median(ms / base)) if base is not None else None,
            }
            out["kernels"].append(row)
            print(
                f"[{out['threads']}t] {name:8s} {isa:11s} median {row['median_ms']:8.3f} ms "
                f"{row['weight_gb_s']:6.2f} GB/s  time/avx2 {row['ratio_vs_avx2']:.3f}",
                flush=True,
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--kernels", default=",".join(SHAPES))
    p.add_argument("--isas", default="avx2,avxvnni,avx512vnni")
    p.add_argument("--mcpu", default=None, help="LLVM CPU name (default: the host's)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--hot", action="store_true", help="one weight copy (hot cache) instead of cycling")
    p.add_argument("--json", default=None)
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mcpu is None:
        import tvm

        args.mcpu = tvm.target.codegen.llvm_get_system_cpu()
    if args._child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    results = []
    for t in args.threads.split(","):
        cmd = [sys.executable, __file__, "--_child", "--kernels", args.kernels, "--isas", args.isas]
        cmd += ["--mcpu", args.mcpu, "--rounds", str(args.rounds)] + (["--hot"] if args.hot else [])
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
