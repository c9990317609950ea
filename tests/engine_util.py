"""Build an Engine for a tiny checkpoint without the JIT cache (tests compile into tmp folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import tvm

from toolkit.checkpoint import open_model
from toolkit.compile.compile_model import compile_model, compiled_for
from toolkit.runtime.engine import CacheOptions, Engine
from toolkit.runtime.weights import load_params
from toolkit.targets import Preset


def build_engine(
    ckpt: Path,
    out: Path,
    quantization: str = "q0f32",
    dtype: str | None = None,
    cache: CacheOptions | None = None,
    device: str | Preset = "host-exact",
) -> Engine:
    """Default preset `host-exact` (fp32 activations): parity tests compare against fp32 references.

    Without a `dtype` override the library comes from the session's JIT cache (`compiled_for`, see
    conftest): a library depends on the config, scheme and preset only, so tests of the same tiny variant
    share one compile. `out` then goes unused; with `dtype` the library is built into it."""
    src = open_model(ckpt)
    if dtype is None:
        compiled = compiled_for(src.config, quantization, device)
    else:
        compiled = compile_model(src.config, quantization, device, out, dtype=dtype)
    lib = tvm.runtime.load_module(str(compiled.library))
    eng = Engine(
        lib, load_params(src, compiled, tvm.cpu()), src.config, dtype=compiled.manifest["dtype"], cache=cache
    )
    eng.compiled = compiled
    return eng


def hf_incremental(hf, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """transformers' logits for `prompt` (every position) then one row per continuation token, fed one at a
    time through HF's own KV cache the way `generate()` feeds them: when a LongRoPE sequence first grows past
    original_max_position_embeddings, the cache is dropped and the whole sequence re-encoded (the rule of
    Phi3ForCausalLM.prepare_inputs_for_generation). `test_generate_tokens_match_transformers` checks this
    against `generate()` itself."""
    lr = getattr(hf.config, "rope_scaling", None) or getattr(hf.config, "rope_parameters", None) or {}
    orig = hf.config.original_max_position_embeddings if lr.get("rope_type") == "longrope" else None
    seq = list(prompt)
    with torch.no_grad():
        out = hf(torch.tensor([seq]), use_cache=True)
        rows, cache = [out.logits[0].numpy()], out.past_key_values
        for t in continuation:
            seq.append(t)
            if orig is not None and len(seq) >= orig + 1 and len(seq) - 1 <= orig:
                out = hf(torch.tensor([seq]), use_cache=True)
                rows.append(out.logits[0, -1:].numpy())
            else:
                out = hf(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
                rows.append(out.logits[0].numpy())
            cache = out.past_key_values
    return np.concatenate(rows)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|: the issue's parity metric."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def greedy_vs_transformers(eng, hf, prompt: list[int], steps: int):
    """-> (prefill logits, decode logits, transformers' logits for every position) for a greedy run."""
    sid = eng.add_sequence()
    pre = eng.prefill(sid, prompt, all_logits=True)
    toks, rows = [], []
    for _ in range(steps):
        toks.append(int(np.argmax((rows[-1] if rows else pre)[-1])))
        rows.append(eng.decode(sid, toks[-1])[None])
    return pre, np.concatenate(rows), hf_incremental(hf, prompt, toks)


def assert_greedy_agrees_where_clear(ours: np.ndarray, ref: np.ndarray) -> None:
    """Greedy choices equal wherever the reference's top two logits are further apart than twice that
    row's error (tiny random models have near ties, which int8 activation rounding may flip), and at least
    half the rows are that clear (so the check is not vacuous)."""
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(ours - ref).max(-1)
    assert clear.sum() >= len(ref) // 2, (clear.sum(), len(ref))
    assert (ours.argmax(-1) == ref.argmax(-1))[clear].all()
