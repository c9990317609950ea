"""Tune the top kernels of a Phi-3-mini-shaped q4 model on the `host` CPU and report default vs tuned.

Prints the kernel table (calls per decode / prefill step, traffic share), then per tuned kernel the default
(hand / dlight rule) and tuned time, and an end-to-end decode estimate: sum over the tuned kernels of
calls-per-token x time, default vs with the kept records. Records that beat the default are written to
--schedules-dir (default: a temp folder, so a casual run does not change the repo's schedules/; pass
`schedules` to commit them).

    python examples/tune_host.py --trials 16 --kernels 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

from toolkit.config import Phi3Config
from toolkit.targets import load_preset
from toolkit.tune.tuner import format_results, tune_model

PHI3_MINI = Phi3Config(
    vocab_size=32064,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=96,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    partial_rotary_factor=1.0,
    longrope=None,
    sliding_window=2047,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_ids=(32000,),
    pad_token_id=32000,
    source_arch="phi3",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--kernels", type=int, default=2)
    ap.add_argument("--quantization", default="q4f16_1")
    ap.add_argument("--cost-model", default="random", choices=["random", "xgb"])
    ap.add_argument("--schedules-dir", default=None)
    args = ap.parse_args()
    preset = load_preset("host")
    root = args.schedules_dir or tempfile.mkdtemp(prefix="phi3-tune-")
    t0 = time.time()
    _, results = tune_model(
        PHI3_MINI,
        args.quantization,
        preset,
        args.trials,
        kernels=args.kernels,
        schedules_root=root,
        progress=print,
        cost_model=args.cost_model,
    )
    print(format_results(results))
    measured = [r for r in results if r.default_ms is not None]
    default = sum(r.decode_calls * r.default_ms for r in measured)
    tuned = sum(r.decode_calls * (r.tuned_ms if r.kept else r.default_ms) for r in measured)
    if default:
        print(
            f"decode time in these {len(measured)} kernel(s) per token: default {default:.1f} ms, "
            f"with kept records {tuned:.1f} ms ({default / tuned:.2f}x)"
        )
    print(f"records: {root}/host ({time.time() - t0:.0f} s total)")


if __name__ == "__main__":
    main()
