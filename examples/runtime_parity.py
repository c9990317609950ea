"""Whole tiny models under TVM's own Vulkan (lavapipe) and OpenCL (PoCL) runtimes vs `host-exact`.

Needs the runtime plugins (`phi3 runtime build --tvm-source DIR`). For every variant: compile the tiny
checkpoint for host-exact and for the device preset, run the scenario of toolkit/bench/device_parity.py
(chunked prefill, decode, two sequences in one batch decode, teacher-forced) and print max |Δlogit|, its
ratio to max |logit|, and token agreement. OpenCL runs fp32 activations only (PoCL has no cl_khr_fp16).

    PYTHONPATH=. python examples/runtime_parity.py [--work DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# (variant, quantization, scenario sizes: prompt A, prompt B, decode steps)
VARIANTS = [
    (
        "mini-4k",
        "q4f32_1",
        (11, 5, 4),
    ),  # sliding window 16: A stays inside it (GPU presets attend everything)
    ("mini-4k", "q4f16_1", (11, 5, 4)),
    ("mini-4k", "q0f32", (11, 5, 4)),
    ("mini-128k", "q4f32_1", (12, 5, 7)),  # LongRoPE, original_max 16: A crosses it while decoding
    ("mini-128k", "q4f16_1", (12, 5, 7)),
    ("medium", "q4f32_1", (20, 7, 4)),  # GQA 8/2, prefill in three chunks
    ("medium", "q4f16_1", (20, 7, 4)),
]
DEVICES = ("vulkan", "opencl")


def engine_for(ckpt: Path, quantization: str, preset: str, out: Path):
    import tvm

    from toolkit.checkpoint import open_model
    from toolkit.compile.compile_model import compile_model
    from toolkit.runtime.engine import CacheOptions, Engine, open_device
    from toolkit.runtime.weights import load_params
    from toolkit.targets import load_preset

    src = open_model(ckpt)
    t = time.perf_counter()
    compiled = compile_model(src.config, quantization, preset, out)
    compile_s = time.perf_counter() - t
    dev = open_device(load_preset(preset))
    lib = tvm.runtime.load_module(str(compiled.library))
    eng = Engine(
        lib,
        load_params(src, compiled, dev),
        src.config,
        dtype=compiled.manifest["dtype"],
        device=dev,
        cache=CacheOptions(prefill_chunk=8),
    )
    return eng, compile_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/phi3-runtime-parity")
    ap.add_argument("--json")
    ap.add_argument("--devices", default=",".join(DEVICES))
    args = ap.parse_args()
    from tiny import make_tiny_checkpoint

    from toolkit.bench import device_parity as dp
    from toolkit.runtime.plugins import load_plugins

    print("plugins:", load_plugins(), file=sys.stderr)
    work = Path(args.work)
    rows = []
    for variant, quant, (la, lb, steps) in VARIANTS:
        ckpt = work / f"ckpt-{variant}"
        if not ckpt.exists():
            make_tiny_checkpoint(ckpt, variant)
        ref_eng, _ = engine_for(ckpt, quant, "host-exact", work / f"{variant}-{quant}-host-exact")
        sc = dp.scenario_for(ref_eng.cfg.vocab_size, la, lb, steps)
        ref, forced = dp.run(ref_eng, sc)
        for device in args.devices.split(","):
            if device == "opencl" and "f16" in quant:
                continue  # PoCL: no cl_khr_fp16
            eng, compile_s = engine_for(ckpt, quant, device, work / f"{variant}-{quant}-{device}")
            try:
                got, _ = dp.run(eng, sc, forced)
                p = dp.compare(ref, got)
                row = dict(
                    variant=variant,
                    quantization=quant,
                    device=device,
                    max_abs_diff=p.max_abs_diff,
                    rel=p.rel,
                    agreement=p.agreement,
                    rows=p.rows,
                    worst=p.worst_row,
                    compile_s=round(compile_s, 1),
                )
            except Exception as e:  # a failing runtime is a result of this table
                row = dict(variant=variant, quantization=quant, device=device, error=str(e).splitlines()[0])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| variant | quant | device | max abs dlogit | / max abs logit | tokens agree | worst row |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['quantization']} | {r['device']} | error: {r['error']} | | | |")
        else:
            print(
                f"| {r['variant']} | {r['quantization']} | {r['device']} | {r['max_abs_diff']:.2e} | "
                f"{r['rel']:.1e} | {r['agreement'] * r['rows']:.0f}/{r['rows']} | {r['worst']} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
