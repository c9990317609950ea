"""Serving throughput and time to first token: `phi3 serve` vs llama-cpp-python's own OpenAI server
(`python -m llama_cpp.server`) on the same GGUF (default: the embedded SmolLM2-135M Q4_1) and thread count,
side by side in one run, both driven by the same streaming client (`toolkit/bench/serve.py`).

    python examples/bench_serve.py --threads 2 --streams 1,4,16 --max-tokens 128 --rounds 3 \\
        --json bench_serve.json --plot bench_serve.png

Needs llama-cpp-python (`python -m toolkit.bench.llama_cpp install`) and its server's extras (the error
says which); matplotlib for --plot. Writes the numbers as JSON and the chart as PNG; prints a table.
Any failure (a server that does not start, a request that errors) exits 1 with one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from toolkit.bench.serve import ServeBenchSettings, format_table, plot, run_serve_bench, write_json
from toolkit.errors import UserError


def _ints(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="GGUF for both servers (default: the embedded model's)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="both servers")
    ap.add_argument("--streams", type=_ints, default=[1, 4, 16], help="concurrency levels (default 1,4,16)")
    ap.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="requests per stream, one after another")
    ap.add_argument("--context-window", type=int, default=1024, help="per sequence (both servers)")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="ours: phi3 serve --prefill-chunk")
    ap.add_argument(
        "--json", type=Path, default=Path("bench_serve.json"), help="numbers (default %(default)s)"
    )
    ap.add_argument("--plot", type=Path, help="PNG chart")
    a = ap.parse_args(argv)
    try:
        from toolkit.default_model import default_model_path
        from toolkit.outputs import check_output_file

        gguf = a.gguf or default_model_path()
        check_output_file(a.json, inputs=[gguf], what="a JSON file")
        if a.plot:
            check_output_file(a.plot, inputs=[gguf], magic=b"\x89PNG\r\n\x1a\n", what="a PNG image")
        st = ServeBenchSettings(
            gguf=gguf,
            threads=a.threads,
            streams=a.streams,
            max_tokens=a.max_tokens,
            rounds=a.rounds,
            context_window=a.context_window,
            prefill_chunk=a.prefill_chunk,
        )
        result = run_serve_bench(st, log=lambda m: print(m, file=sys.stderr))
        print(format_table(result))
        print(f"wrote {write_json(result, a.json)}", file=sys.stderr)
        if a.plot:
            print(f"wrote {plot(result, a.plot)}", file=sys.stderr)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
