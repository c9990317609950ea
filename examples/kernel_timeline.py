"""Where a host decode step goes, kernel by kernel: builds a timeline library of the model
(compile/kernel_timeline.py: a tick after every kernel call), decodes --steps tokens after a --prompt-token
prompt with --threads pool threads, and prints each kernel's time per step (median over steps, summed over
its calls in a step) and its share of the step.

    python examples/kernel_timeline.py /path/to/model.gguf --threads 2 --steps 16

Each interval also holds one tick's own cost (a call back into Python, printed below the table), so the
small kernels read high by that much per call. The build goes to a temporary folder, never the cache."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import tvm

from toolkit.checkpoint import open_model
from toolkit.compile.compile_model import compile_model
from toolkit.compile.kernel_timeline import START, TICK
from toolkit.cpu_threads import size_thread_pool
from toolkit.errors import UserError
from toolkit.hugepages import in_huge_pages
from toolkit.quantization import quantization_for
from toolkit.runtime.engine import Engine
from toolkit.runtime.weights import load_params
from toolkit.targets import load_preset


def step_times(ticks: list[tuple[int, str]]) -> dict[str, float]:
    """Seconds per kernel name within one step: each tick closes the interval since the one before it in
    the same function call (a START tick opens a call)."""
    out: dict[str, float] = defaultdict(float)
    prev = None
    for t, name in ticks:
        if name != START and prev is not None:
            out[name] += (t - prev) / 1e9
        prev = t
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="HF folder or GGUF (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=None, help="pool threads (default: one per core)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before the timed steps")
    ap.add_argument("--top", type=int, default=20, help="kernels listed (the rest are summed)")
    args = ap.parse_args()
    if args.steps < 1 or args.prompt < 1 or (args.threads is not None and args.threads < 1):
        print("error: --steps, --prompt and --threads must be >= 1", file=sys.stderr)
        return 2

    try:
        source = open_model(args.model)
        quant = quantization_for(source, None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    preset = load_preset("host")
    ticks: list[tuple[int, str]] = []
    tvm.register_global_func(
        TICK, lambda name: ticks.append((time.perf_counter_ns(), str(name))), override=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"building a timeline library of {source.path or 'the default model'} ({quant}) ...",
            file=sys.stderr,
        )
        compiled = compile_model(source.config, quant, preset, Path(tmp) / "lib", kernel_timeline=True)
        threads = size_thread_pool(args.threads)
        dev = tvm.cpu()
        lib = tvm.runtime.load_module(str(compiled.library))
        params = in_huge_pages(load_params(source, compiled, dev), dev)
        eng = Engine(lib, params, source.config, dtype=compiled.manifest["dtype"], device=dev)
        sid = eng.add_sequence()
        prompt = [int(t) % source.config.vocab_size for t in range(100, 100 + args.prompt)]
        tok = int(np.argmax(eng.prefill(sid, prompt)))
        per_step: dict[str, list[float]] = defaultdict(list)
        calls: Counter[str] = Counter()
        walls, gaps, outside = [], [], []
        for _ in range(args.steps):
            ticks.clear()
            t0 = time.perf_counter_ns()
            tok = int(np.argmax(eng.decode(sid, tok)))
            t1 = time.perf_counter_ns()
            walls.append((t1 - t0) / 1e9)
            between = [b[0] - a[0] for a, b in zip(ticks, ticks[1:], strict=False) if b[1] == START]
            gaps.append(((ticks[0][0] - t0) / 1e9, sum(between) / 1e9, (t1 - ticks[-1][0]) / 1e9))
            times = step_times(ticks)
            outside.append(walls[-1] - sum(times.values()))
            for name, s in times.items():
                per_step[name].append(s)
            calls = Counter(m for _, m in ticks if m != START)
        # one tick's own cost: the registered function called back to back through TVM's FFI
        f = tvm.get_global_func(TICK)
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            f("calibrate")
        tick_s = (time.perf_counter() - t0) / n

    wall = statistics.median(walls)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    rows = sorted(med.items(), key=lambda kv: -kv[1])
    print(
        f"decode step: median {wall * 1e3:.2f} ms over {args.steps} steps, {threads} thread(s), "
        f"{sum(calls.values())} kernel calls"
    )
    print(f"{'ms/step':>9} {'share':>6} {'calls':>5}  kernel")
    for name, s in rows[: args.top]:
        print(f"{s * 1e3:9.3f} {s / wall:6.1%} {calls.get(name, 0):5d}  {name}")
    rest = sum(s for _, s in rows[args.top :])
    if rest:
        print(f"{rest * 1e3:9.3f} {rest / wall:6.1%} {'':>5}  ({len(rows) - args.top} other kernels)")
    out_s = statistics.median(outside)
    before, between, after = (statistics.median(g[i] for g in gaps) for i in range(3))
    print(f"{out_s * 1e3:9.3f} {out_s / wall:6.1%} {'':>5}  (outside the kernels' spans, median step)")
    print(
        f"  of which {before * 1e3:.3f} ms before the first tick, {between * 1e3:.3f} ms between the VM "
        f"functions, {after * 1e3:.3f} ms after the last: the engine's Python, the VM's calls and returns"
    )
    print(f"one tick costs ~{tick_s * 1e6:.1f} us ({tick_s * sum(calls.values()) / wall:.1%} of the step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
