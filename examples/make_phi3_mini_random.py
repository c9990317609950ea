"""A random-weight model with Phi-3-mini's shapes, for speed measurements where the values do not matter.

    python examples/make_phi3_mini_random.py --gguf phi3-mini-random-q4_0.gguf [--config-dir DIR] [--layers N]

`--gguf` writes a llama.cpp `phi3` GGUF with every 2-D weight Q4_0 (about 2.15 GB for 32 layers), streamed
one tensor at a time: the Q4_0 blocks are drawn directly (random 4-bit codes, scales chosen so each output
has unit-ish variance) instead of quantizing float weights, so writing takes seconds of CPU and one tensor
of memory. `--config-dir` writes the matching Hugging Face config.json (no weights) for engines that
generate their own random parameters from a config."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from toolkit.checkpoint import expected_tensor_shapes
from toolkit.checkpoint.gguf_export import PlannedTensor, placeholder_vocab, plan_tensors, write_gguf
from toolkit.config import PHI3_MINI_4K_HF, Phi3Config, parse_hf_config

PHI3_MINI_CONFIG = {**PHI3_MINI_4K_HF, "torch_dtype": "bfloat16"}


def phi3_mini_config(layers: int | None = None) -> tuple[dict, Phi3Config]:
    raw = dict(PHI3_MINI_CONFIG)
    if layers is not None:
        raw["num_hidden_layers"] = layers
    return raw, parse_hf_config(raw, Path("<phi3-mini>"))


def random_q4_0(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Q4_0 bytes for a random [rows, cols] weight: per 32 values an f16 scale then 16 bytes of 4-bit codes.

    Codes are uniform in 0..15 (value d*(q-8), std about 4.6*d); d = 1/(4.6*sqrt(cols)) keeps each output's
    variance near its input's, so activations stay finite through 32 layers.
    """
    rows, cols = shape
    nblocks = cols // 32
    blocks = np.empty((rows, nblocks, 18), dtype=np.uint8)
    d = (1.0 / (4.6 * np.sqrt(cols))) * rng.uniform(0.75, 1.25, size=(rows, nblocks))
    blocks[:, :, :2] = d.astype("<f2")[..., None].view(np.uint8)
    blocks[:, :, 2:] = rng.integers(0, 256, size=(rows, nblocks, 16), dtype=np.uint8)
    return blocks.reshape(rows, nblocks * 18)


def random_tensors(plan: list[PlannedTensor], seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for t in plan:
        if len(t.shape) == 1:
            yield rng.uniform(0.8, 1.2, size=t.shape).astype(np.float32)  # norm weights near 1
        else:
            yield random_q4_0(t.shape, rng)


def write_random_gguf(out: Path, layers: int | None = None, seed: int = 0) -> int:
    _, cfg = phi3_mini_config(layers)
    shapes = expected_tensor_shapes(cfg)
    plan = plan_tensors(cfg, list(shapes), shapes.__getitem__, "q4_0")
    return write_gguf(
        out,
        cfg,
        placeholder_vocab(cfg),
        plan,
        random_tensors(plan, seed),
        qtype="q4_0",
        name="phi3-mini-random",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="write a random Q4_0 phi3 GGUF here")
    ap.add_argument("--config-dir", type=Path, help="write the matching config.json into this folder")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for quick checks (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.gguf and not args.config_dir:
        ap.error("give --gguf and/or --config-dir")
    if args.config_dir:
        raw, _ = phi3_mini_config(args.layers)
        args.config_dir.mkdir(parents=True, exist_ok=True)
        (args.config_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        print(f"wrote {args.config_dir / 'config.json'}")
    if args.gguf:
        t0 = time.perf_counter()
        size = write_random_gguf(args.gguf, args.layers, args.seed)
        print(f"wrote {args.gguf}: {size:,} bytes in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
