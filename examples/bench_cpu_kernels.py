"""Per-kernel speed of the CPU schedule rules (toolkit/compile/cpu_schedule.py) at Phi-3-mini and SmolLM2-135M
shapes, against the machine's memory bandwidth (numpy read-only sum) and, optionally, against dlight's
in-tree `cpu.GEMV` and no schedule at all.

Decode kernels are q4 dequant-GEMVs (uint32 words + scales, x of 1 row), each timed twice: `ours-int8` (the
host preset: int8 activations, AVX2 integer dot products) and `ours-float32` (host-exact). Each timed call
reads a different copy of the weights, cycling through enough copies to overflow the last-level cache, so
the numbers are cold-cache like a real decode step (`--hot` times one copy repeatedly instead).

    python examples/bench_cpu_kernels.py                      # 1 and 2 threads, both models, decode
    python examples/bench_cpu_kernels.py --threads 2 --model phi3 --prefill 128 --baselines --json out.json

Thread counts are set with TVM_NUM_THREADS, so every count runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

SHAPES = {  # name -> (N, K) of the Linear, y = x @ W^T
    "phi3": {
        "qkv": (9216, 3072),
        "o": (3072, 3072),
        "gate_up": (16384, 3072),
        "down": (3072, 8192),
        "lm_head": (32064, 3072),
    },
    "smollm2": {  # hidden 576, 9 query / 3 kv heads of 64, intermediate 1536, vocab 49152
        "qkv": (960, 576),
        "o": (576, 576),
        "gate_up": (3072, 576),
        "down": (576, 1536),
        "lm_head": (49152, 576),
    },
}
LAYERS = {"phi3": 32, "smollm2": 30}
COLD_BYTES = 256 << 20  # weights cycled per timing: well above any L3 here (32 MB; 480 MB on some VMs)


def read_bandwidth(threads: int, nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """GB/s of a read-only numpy sum over `nbytes`, split over `threads` threads (np.sum drops the GIL)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def _q4_func(n: int, k: int, rows: tuple):
    from tvm import te, tirx

    from toolkit.quantization import MLC_Q4_LAYOUT as Q4
    from toolkit.quantization.tvm_layers import te_dequantize

    dims = [tirx.Var(d, "int64") if isinstance(d, str) else d for d in rows]
    x = te.placeholder((*dims, k), "float32", name="x")
    qw_shape, qs_shape = Q4.quantized_shapes((n, k))
    qw = te.placeholder(qw_shape, Q4.storage, name="q_weight")
    qs = te.placeholder(qs_shape, "float16", name="q_scale")
    w = te_dequantize(qw, qs, k, "float32", Q4)
    r = te.reduce_axis((0, k), "k")
    y = te.compute((*dims, n), lambda *i: te.sum(x[(*i[:-1], r)] * w[i[-1], r], axis=r), name="NT_matmul")
    return te.create_prim_func([x, qw, qs, y]).with_attr("global_symbol", "main")


def _build(func, target, schedule: str):
    import tvm
    from tvm.s_tir import dlight as dl

    from toolkit.compile.cpu_schedule import cpu_schedule_rules

    mod = tvm.IRModule({"main": func})
    with target:
        if schedule.startswith("ours-"):  # ours-int8 (the host preset), ours-float32 (host-exact)
            mod = dl.ApplyDefaultSchedule(*cpu_schedule_rules(target, schedule[len("ours-") :]))(mod)
        elif schedule == "dlight.cpu.GEMV":
            mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV())(mod)
    t0 = time.perf_counter()
    ex = tvm.compile(mod, target=target)
    return ex, time.perf_counter() - t0


def _time_kernel(ex, n: int, k: int, m: int, hot: bool, min_seconds: float) -> tuple[float, float, float]:
    """(median ms per call, best ms per call, max relative error vs numpy) for x of m rows. On a shared
    machine the best sample is the closer estimate of the kernel alone; both are reported."""
    import tvm

    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    wbytes = n * k // 2 + n * k // 32 * 2
    copies = 1 if hot else max(2, min(256, -(-COLD_BYTES // wbytes)))
    base_qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    base_qs = (rng.random((n, k // 32)) * 0.02).astype(np.float16)
    x = rng.standard_normal((1, m, k)).astype(np.float32)
    xs = tvm.runtime.tensor(x, dev)
    out = tvm.runtime.empty((1, m, n), "float32", dev)
    weights = [(tvm.runtime.tensor(base_qw, dev), tvm.runtime.tensor(base_qs, dev)) for _ in range(copies)]
    f = ex["main"]
    f(xs, *weights[0], out)
    codes = ((base_qw[..., None] >> (np.arange(8, dtype=np.uint32) * 4)) & 15).reshape(n, k)
    w = (codes.astype(np.float32) - 7) * np.repeat(base_qs.astype(np.float32), 32, axis=1)
    ref = x @ w.T
    err = float(np.abs(out.numpy() - ref).max() / np.abs(ref).max())
    del codes, w
    for qw, qs in weights[: min(copies, 8)]:  # warm-up (page faults, thread pool)
        f(xs, qw, qs, out)
    samples = []
    t_end = time.perf_counter() + min_seconds
    i = 0
    while time.perf_counter() < t_end or len(samples) < 5:
        calls = max(1, min(copies, 32))
        t0 = time.perf_counter()
        for _ in range(calls):
            qw, qs = weights[i % copies]
            f(xs, qw, qs, out)
            i += 1
        samples.append((time.perf_counter() - t0) / calls * 1e3)
    return float(np.median(samples)), float(np.min(samples)), err


def run_one_thread_count(args) -> dict:
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mcpu": args.mcpu, "num-cores": 2})
    threads = int(os.environ.get("TVM_NUM_THREADS", "0"))
    bw = read_bandwidth(threads)
    result = {"threads": threads, "mcpu": args.mcpu, "read_bandwidth_gbs": bw, "kernels": []}
    models = [args.model] if args.model != "all" else list(SHAPES)
    for model in models:
        for name, (n, k) in SHAPES[model].items():
            wbytes = n * k // 2 + n * k // 32 * 2
            schedules = ["ours-int8", "ours-float32"] + (
                ["dlight.cpu.GEMV", "none"] if args.baselines and name in args.baseline_kernels else []
            )
            for schedule in schedules:
                ex, build_s = _build(_q4_func(n, k, (1, 1)), target, schedule)
                min_s = args.seconds if schedule.startswith("ours") else min(args.seconds, 1.0)
                ms, best, err = _time_kernel(ex, n, k, 1, args.hot, min_s)
                gbs = wbytes / best / 1e6
                row = {
                    "model": model,
                    "kernel": name,
                    "phase": "decode",
                    "n": n,
                    "k": k,
                    "schedule": schedule,
                    "ms": ms,
                    "best_ms": best,
                    "weight_gb_s": gbs,
                    "roofline_pct": 100 * gbs / bw,
                    "rel_err": err,
                    "compile_s": build_s,
                }
                result["kernels"].append(row)
                print(
                    f"[{threads}t] {model:8s} {name:8s} decode  {schedule:16s} median {ms:8.3f} ms "
                    f"best {best:8.3f} ms {gbs:6.2f} GB/s {100 * gbs / bw:5.1f}% roofline  err {err:.1e}  "
                    f"(compile {build_s:.1f}s)",
                    flush=True,
                )
            if args.prefill:
                m = args.prefill
                ex, build_s = _build(_q4_func(n, k, (1, "s")), target, "ours-float32")
                ms, best, err = _time_kernel(ex, n, k, m, True, args.seconds)
                gflops = 2 * m * n * k / best / 1e6
                result["kernels"].append(
                    {
                        "model": model,
                        "kernel": name,
                        "phase": f"prefill{m}",
                        "n": n,
                        "k": k,
                        "schedule": "ours-float32",
                        "ms": ms,
                        "best_ms": best,
                        "gflop_s": gflops,
                        "rel_err": err,
                        "compile_s": build_s,
                    }
                )
                print(
                    f"[{threads}t] {model:8s} {name:8s} prefill {m:<4d} ours-float32    median {ms:8.3f} ms "
                    f"best {best:8.3f} ms {gflops:6.1f} GFLOP/s  err {err:.1e}",
                    flush=True,
                )
        # decode step from these kernels alone (attention, norms and VM overhead not included)
        total_bytes = sum(
            (n * k // 2 + n * k // 32 * 2) * (1 if kn == "lm_head" else LAYERS[model])
            for kn, (n, k) in SHAPES[model].items()
        )
        estimate = {"weight_bytes": total_bytes, "roofline_tok_s": bw * 1e9 / total_bytes}
        for sched in ("ours-int8", "ours-float32"):
            for key in ("ms", "best_ms"):
                t = {
                    r["kernel"]: r[key]
                    for r in result["kernels"]
                    if r["model"] == model and r["schedule"] == sched and r["phase"] == "decode"
                }
                step = LAYERS[model] * (t["qkv"] + t["o"] + t["gate_up"] + t["down"]) + t["lm_head"]
                estimate[f"{sched}_gemv_{key}_per_token"] = step
                estimate[f"{sched}_tok_s_from_{key}"] = 1e3 / step
                estimate[f"{sched}_roofline_pct_from_{key}"] = 100 * total_bytes / (step / 1e3) / 1e9 / bw
                print(
                    f"[{threads}t] {model} {sched}: GEMVs of one decode step ({key}) {step:.1f} ms -> "
                    f"<= {1e3 / step:.2f} tok/s; roofline {bw * 1e9 / total_bytes:.2f} tok/s "
                    f"({100 * total_bytes / (step / 1e3) / 1e9 / bw:.0f}%)",
                    flush=True,
                )
        result.setdefault("decode_estimate", {})[model] = estimate
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated TVM_NUM_THREADS values")
    p.add_argument("--model", default="all", choices=["all", *SHAPES])
    p.add_argument("--mcpu", default=None, help="LLVM CPU name (default: the host's, from LLVM)")
    p.add_argument("--prefill", type=int, default=0, help="also time the prefill GEMM at this many rows")
    p.add_argument("--baselines", action="store_true", help="also time dlight cpu.GEMV and no schedule")
    p.add_argument("--baseline-kernels", default="o", help="kernels the baselines run on (they are slow)")
    p.add_argument("--hot", action="store_true", help="reuse one weight copy (hot cache) instead of cycling")
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timing per kernel")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mcpu is None:
        import tvm

        args.mcpu = tvm.target.codegen.llvm_get_system_cpu()
    args.baseline_kernels = set(args.baseline_kernels.split(","))
    if args._child:
        print("RESULT " + json.dumps(run_one_thread_count(args)), flush=True)
        return
    results = []
    for t in args.threads.split(","):
        env = dict(os.environ, TVM_NUM_THREADS=t)
        cmd = [
            sys.executable,
            __file__,
            "--_child",
            "--model",
            args.model,
            "--mcpu",
            args.mcpu,
            "--prefill",
            str(args.prefill),
            "--seconds",
            str(args.seconds),
            "--baseline-kernels",
            ",".join(args.baseline_kernels),
        ]
        cmd += ["--baselines"] if args.baselines else []
        cmd += ["--hot"] if args.hot else []
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    results.append(json.loads(line[len("RESULT ") :]))
                else:
                    print(line, end="", flush=True)
        if proc.returncode:
            raise SystemExit(f"benchmark child for {t} threads failed (exit {proc.returncode})")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    summary = {"results": results, "loadavg": load, "cpu_count": os.cpu_count()}
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, args.json)
    print(f"load average {load}")


if __name__ == "__main__":
    main()
