"""Benchmark `phi3 export-coreml` at Phi-3-mini size with random weights: time, peak RSS, package size.

    python examples/bench_coreml_phi3_mini.py --layers 4 8 --weights int4

Each export runs in a fresh process (`phi3 export-coreml`) whose peak RSS is sampled every 50 ms. The real
model has 32 layers; runs with fewer layers plus the per-layer slope between two layer counts extrapolate to
32, which is what a shared 24 GB machine allows. The checkpoint is one fp16 safetensors shard per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit.config import PHI3_MINI_4K_HF


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> Path:
    from safetensors.numpy import save_file

    cfg = dict(PHI3_MINI_4K_HF, num_hidden_layers=layers)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    rng = np.random.default_rng(seed)

    def mat(n, k):
        return (rng.standard_normal((n, k), dtype=np.float32) * (1.5 / k**0.5)).astype(np.float16)

    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}

    def layer(i: int) -> dict:
        p = f"model.layers.{i}."
        return {
            p + "input_layernorm.weight": rng.uniform(0.5, 1.5, h).astype(np.float16),
            p + "post_attention_layernorm.weight": rng.uniform(0.5, 1.5, h).astype(np.float16),
            p + "self_attn.qkv_proj.weight": mat(3 * h, h),
            p + "self_attn.o_proj.weight": mat(h, h),
            p + "mlp.gate_up_proj.weight": mat(2 * inter, h),
            p + "mlp.down_proj.weight": mat(h, inter),
        }

    shards = [("embed", lambda: {"model.embed_tokens.weight": mat(v, h)})]
    shards += [(f"layer{i}", lambda i=i: layer(i)) for i in range(layers)]
    shards.append(
        ("head", lambda: {"model.norm.weight": np.ones(h, np.float16), "lm_head.weight": mat(v, h)})
    )
    for tag, make in shards:  # one shard in memory at a time
        tensors = make()
        fname = f"model-{tag}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def run_export(model: Path, package: Path, weights: str, context: int) -> dict:
    """Export in a fresh process; its RSS is sampled every 50 ms (the child's VmHWM dies with it)."""
    import psutil

    cmd = [
        sys.executable,
        "-c",
        "from toolkit.cli import main; main()",
        "export-coreml",
        str(model),
        "-o",
        str(package),
        "--weights",
        weights,
        "--context",
        str(context),
        "--no-tokenizer-files",  # the random checkpoint has no tokenizer
        "--quiet",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, peak, peak_at = psutil.Process(proc.pid), 0, 0.0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
            if rss > peak:
                peak, peak_at = rss, time.perf_counter() - t0
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"export failed:\n{err[-3000:]}")
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_gb": round(peak / 1e9, 2),
        "peak_at_s": round(peak_at, 1),
        "package_mib": round(size / 2**20, 1),
        "stdout": out.strip(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--weights", default="int4", choices=["int4", "int8", "fp16"])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--workdir", default=None, help="Where to write checkpoints and packages (default: tmp).")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_coreml_"))
    results = {}
    for layers in args.layers:
        ckpt = write_checkpoint(work / f"ckpt_L{layers}", layers)
        pkg = work / f"phi3mini_L{layers}_{args.weights}.mlpackage"
        r = run_export(ckpt, pkg, args.weights, args.context)
        results[layers] = r
        print(
            f"layers={layers} weights={args.weights} ctx={args.context}: {r['seconds']} s, "
            f"peak RSS {r['peak_rss_gb']} GB (at {r['peak_at_s']} s), package {r['package_mib']} MiB\n"
            f"  {r['stdout']}",
            flush=True,
        )
        for p in ckpt.iterdir():
            p.unlink()
        ckpt.rmdir()
    if len(results) >= 2:
        (l0, r0), (l1, r1) = sorted(results.items())[0], sorted(results.items())[-1]
        for key in ("seconds", "peak_rss_gb", "package_mib"):
            slope = (r1[key] - r0[key]) / (l1 - l0)
            at32 = r1[key] + slope * (32 - l1)
            print(f"extrapolated to 32 layers: {key} = {at32:.1f} (slope {slope:.3f}/layer)")
    print(f"packages left in {work}" if os.listdir(work) else "")


if __name__ == "__main__":
    main()
