"""Compile cost of the full Phi-3-mini-4k configuration for each device preset (no weights needed).

Each preset compiles in a fresh subprocess (so peak RSS is that compile's alone): wall time and peak resident
memory are printed as one JSON line per preset. Goal: under 2 minutes per preset on a 2-core machine.

    python examples/bench_compile_presets.py                       # all presets, q4f16_1
    python examples/bench_compile_presets.py webgpu cuda-sm80 --quantization q4f32_1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from toolkit.config import PHI3_MINI_4K_HF

CHILD = """
import json, resource, sys, time
from toolkit.config import parse_hf_config
from toolkit.targets import load_preset
from toolkit.compile.compile_model import compile_model
cfg = parse_hf_config(json.loads(sys.argv[1]), "phi3-mini-4k")
t = time.perf_counter()
m = compile_model(cfg, sys.argv[2], load_preset(sys.argv[3]), sys.argv[4]).manifest
print(json.dumps({"compile_s": round(time.perf_counter() - t, 1), "kernels": len(m["kernels"]), "build":
m["build"],
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def main() -> None:
    from toolkit.targets import list_presets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="*", default=None)
    ap.add_argument("--quantization", default="q4f16_1")
    args = ap.parse_args()
    for name in args.presets or list_presets():
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    json.dumps(PHI3_MINI_4K_HF),
                    args.quantization,
                    name,
                    f"{out}/model",
                ],
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - start
            row = {
                "preset": name,
                "quantization": args.quantization,
                "wall_s": round(wall, 1),
                "ok": proc.returncode == 0,
            }
            if proc.returncode == 0:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                row["error"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "?"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
