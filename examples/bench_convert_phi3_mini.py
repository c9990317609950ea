"""Time `phi3 convert` on a Phi-3-mini-sized checkpoint and measure its peak memory (goal: < 2 GB RSS).

    python examples/bench_convert_phi3_mini.py WORK_DIR [--clip rtn|search|weighted|gptq] [--layers N]
        [--keep]

Writes a random bf16 Hugging Face checkpoint with Phi-3-mini's shapes (3.82B parameters, 7.6 GB, two
safetensors files + index, a placeholder tokenizer) into WORK_DIR/phi3-mini-bf16, streamed tensor by tensor
in 64 MiB chunks (the generator itself stays small), then runs `phi3 convert` on it as a child process under
/usr/bin/time -v (peak RSS of the converter, exact) with a psutil sampler as a cross-check, and prints time,
peak RSS, shard count and sizes. Both folders are deleted afterwards unless --keep.
`--clip gptq` takes hours at 32 layers: measure it with --layers 1 and 2 (the peak must not grow with layers;
the difference of the two times is one layer's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from make_phi3_mini_random import PHI3_MINI_CONFIG  # noqa: E402

from toolkit.checkpoint import expected_tensor_shapes  # noqa: E402
from toolkit.config import parse_hf_config  # noqa: E402

_CHUNK = 1 << 25  # values per generated chunk (64 MiB of bf16)


def _bf16_bytes(n: int, std: float, rng: np.random.Generator) -> bytes:
    """n random normal(0, std) values as bfloat16 (truncated float32: the top 16 bits)."""
    x = rng.standard_normal(n, dtype=np.float32)
    x *= np.float32(std)
    return (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16).tobytes()


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> int:
    """A bf16 safetensors file written tensor by tensor (header first: the format is header + raw bytes)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for shape in shapes.values():
            n = int(np.prod(shape))
            if len(shape) == 1:
                f.write((np.ones(n, np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes())
                continue
            std = 1.0 / np.sqrt(shape[1])
            for start in range(0, n, _CHUNK):
                f.write(_bf16_bytes(min(_CHUNK, n - start), std, rng))
    return 8 + len(head) + offset


def write_placeholder_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def make_checkpoint(out: Path, layers: int | None, seed: int = 0) -> tuple[int, float]:
    raw = dict(PHI3_MINI_CONFIG)
    if layers:
        raw["num_hidden_layers"] = layers
    cfg = parse_hf_config(raw, out / "config.json")
    shapes = expected_tensor_shapes(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    write_placeholder_tokenizer(out, cfg.vocab_size)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    weight_map, total = {}, 0
    for i, part in enumerate(halves):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        total += write_safetensors(out / fname, {n: shapes[n] for n in part}, rng)
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return cfg.num_params(), time.perf_counter() - t0


class RssSampler(threading.Thread):
    """Peak RSS of a process and its children, sampled every 50 ms (a cross-check of /usr/bin/time)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.05)


def run_convert(ckpt: Path, out: Path, quantization: str, clip: str) -> dict:
    phi3 = shutil.which("phi3") or sys.exit("phi3 is not on PATH (pip install -e .)")
    cmd = [
        "/usr/bin/time",
        "-v",
        phi3,
        "convert",
        str(ckpt),
        "-q",
        quantization,
        "-o",
        str(out),
        "--clip",
        clip,
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = RssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.done.set()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"convert failed ({proc.returncode}):\n{stdout}\n{stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    user = re.search(r"User time \(seconds\): ([\d.]+)", stderr)
    return {
        "wall_s": wall,
        "peak_rss_bytes": int(m.group(1)) * 1024 if m else None,
        "sampled_peak_rss_bytes": sampler.peak,
        "user_cpu_s": float(user.group(1)) if user else None,
        "stdout": stdout.strip(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work_dir", type=Path, help="folder for the generated checkpoint and the output")
    ap.add_argument("--quantization", default="q4f16_1")
    ap.add_argument("--clip", default="rtn", choices=["rtn", "search", "weighted", "gptq", "auto"])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check (default 32)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    args = ap.parse_args(argv)
    ckpt, out = args.work_dir / "phi3-mini-bf16", args.work_dir / f"phi3-mini-{args.quantization}"
    try:
        if not (ckpt / "model.safetensors.index.json").is_file():
            n_params, gen_s = make_checkpoint(ckpt, args.layers)
            size = sum(p.stat().st_size for p in ckpt.iterdir())
            print(
                f"checkpoint: {n_params / 1e9:.2f}B params, {size / 1e9:.2f} GB bf16, "
                f"generated in {gen_s:.0f} s"
            )
        res = run_convert(ckpt, out, args.quantization, args.clip)
        cache = json.loads((out / "tensor-cache.json").read_text())
        sizes = [s["nbytes"] for s in cache["records"]]
        print(res["stdout"])
        print(
            f"convert --clip {args.clip}: wall {res['wall_s']:.1f} s (user CPU {res['user_cpu_s']} s, "
            f"machine load {os.getloadavg()[0]:.1f})"
        )
        print(
            f"peak RSS: {res['peak_rss_bytes'] / 2**20:.0f} MiB (/usr/bin/time), "
            f"{res['sampled_peak_rss_bytes'] / 2**20:.0f} MiB (sampled)"
        )
        print(
            f"shards: {len(sizes)}, {sum(sizes) / 2**30:.2f} GiB, min {min(sizes) / 2**20:.1f} MiB, "
            f"max {max(sizes) / 2**20:.1f} MiB, median {sorted(sizes)[len(sizes) // 2] / 2**20:.1f} MiB; "
            f"BitsPerParam {cache['metadata']['BitsPerParam']:.3f}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
