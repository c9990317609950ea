"""Shared pieces of the bad-input suite: a tiny checkpoint written with numpy (no torch, no transformers),
an in-process CLI runner, and the one assertion every case makes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result

from toolkit.cli import main

# small enough to write in milliseconds, large enough for q4 (hidden, intermediate multiples of 32) and for
# a byte-level tokenizer (vocab > 256 + specials)
TINY_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "original_max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "sliding_window": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    from toolkit.checkpoint import expected_tensor_shapes
    from toolkit.config import parse_hf_config

    shapes = expected_tensor_shapes(parse_hf_config(cfg, Path("config.json")))
    rng = np.random.default_rng(seed)
    return {
        n: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
        if len(s) == 2
        else np.ones(s, np.float32)
        for n, s in shapes.items()
    }


def write_checkpoint(folder: Path, cfg: dict | None = None, tensors: dict | None = None) -> Path:
    """config.json + model.safetensors + tokenizer.json, the layout of a Hugging Face checkpoint."""
    from safetensors.numpy import save_file
    from tiny_tokenizer import write_tiny_tokenizer

    cfg = dict(TINY_CONFIG if cfg is None else cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(tensors if tensors is not None else tiny_tensors(cfg), str(folder / "model.safetensors"))
    write_tiny_tokenizer(folder, cfg["vocab_size"])
    return folder


# PHI3_BADINPUT_CLASSIFY=FILE: record each case's outcome class instead of asserting (to measure a toolkit
# version that predates the fixes, e.g. `scripts/bad_inputs_table.py`); the heavy steps (TVM build, Core ML
# trace) are stubbed then, and a case that reaches one counts as "accepted".
CLASSIFY = os.environ.get("PHI3_BADINPUT_CLASSIFY")


class HeavyStep(Exception):
    """Raised by the stubbed TVM build / Core ML export in classify mode: the bad input was accepted."""


def run(args: list[str], input: str | bytes | None = None) -> Result:
    if not CLASSIFY:
        return CliRunner().invoke(main, [str(a) for a in args], input=input)
    from unittest import mock

    with (
        mock.patch("toolkit.compile.pipeline.build", side_effect=HeavyStep),
        mock.patch("toolkit.coreml.export._build_placeholder_model", side_effect=HeavyStep),
    ):
        return CliRunner().invoke(main, [str(a) for a in args], input=input)


def classify(r: Result, names: list[str], before: dict[str, str], roots: tuple[Path, ...]) -> str:
    after = snapshot(*roots)
    if any(after.get(k) != v for k, v in before.items()):
        return "data-loss"  # a file that was there changed or vanished
    if isinstance(r.exception, HeavyStep):
        return "accepted"
    if r.exception is not None and not isinstance(r.exception, SystemExit) or "Traceback" in r.output:
        return "traceback"
    if r.exit_code == 0:
        return "wrong-success"
    if set(after) != set(before):
        return "partial-output"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if len(lines) == 1 and any(str(n) in lines[0] for n in names):
        return "clear"
    return "unclear"  # refused, but not one line naming the file or flag


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and every folder's presence) under `roots`: equal before and after a refused
    command means nothing was changed, deleted or added (no partial output)."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        if not root.exists():
            out[str(root)] = "absent"
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            out[dirpath] = "dir"
            for d in dirnames:  # os.walk does not enter a symlinked folder: record the link itself
                if (Path(dirpath) / d).is_symlink():
                    out[str(Path(dirpath) / d)] = "link"
            for f in filenames:
                p = Path(dirpath) / f
                out[str(p)] = "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_clean_failure(r: Result, names: list[str] | str, before: dict[str, str], *roots: Path) -> str:
    """Non-zero exit, exactly one line on stderr naming one of `names` (file or flag), no traceback, and
    every file under `roots` as it was."""
    names = [names] if isinstance(names, str) else names
    if CLASSIFY:
        with open(CLASSIFY, "a") as f:
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
            f.write(json.dumps({"case": test, "class": classify(r, names, before, roots)}) + "\n")
        return ""
    detail = f"exit {r.exit_code}, stderr {r.stderr!r}, stdout {r.stdout[-300:]!r}, exception {r.exception!r}"
    assert r.exit_code != 0, detail
    # an exception that escaped the CLI (CliRunner catches it) would have been a traceback for the user
    assert r.exception is None or isinstance(r.exception, SystemExit), detail
    assert "Traceback" not in r.output and "Traceback" not in r.stderr, detail
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, detail
    assert any(str(n) in lines[0] for n in names), f"none of {names} in {lines[0]!r}"
    assert snapshot(*roots) == before, f"files changed: {detail}"
    return lines[0]
