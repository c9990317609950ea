"""Our export-oriented torch Phi-3 (toolkit/coreml/torch_model.py) against transformers' Phi3ForCausalLM.

Same weights (a tiny random checkpoint read through toolkit.checkpoint), a 12-token prefill and 8 single-token
decode steps through our buffer KV cache vs HF's DynamicCache. Tolerance 1e-4 on logits of magnitude ~6: both
sides are fp32 and the measured difference (~1e-5) equals HF-with-cache vs HF-full-forward ordering noise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny import load_hf_model, make_tiny_checkpoint

from toolkit.checkpoint import open_model
from toolkit.coreml.torch_model import Phi3ForExport, causal_mask, generate_logits, mask_input

ATOL = 1e-4
VARIANTS = ["mini-4k", "mini-128k", "medium", "phi4-mini"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml_model")
    return {v: make_tiny_checkpoint(root / v, v) for v in VARIANTS}


def _hf_logits(hf, prompt: list[int], decode: list[int]) -> list[np.ndarray]:
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    out = []
    with torch.no_grad():
        res = hf(torch.tensor([prompt]), cache=cache, use_cache=True)
        out.append(res.logits[0].numpy())
        for t in decode:
            res = hf(torch.tensor([[t]]), cache=cache, use_cache=True)
            out.append(res.logits[0].numpy())
    return out


def _ours(path, context: int = 64, cfg=None) -> Phi3ForExport:
    src = open_model(path)
    model = Phi3ForExport(cfg or src.config, context)
    loaded = model.load_tensors(src.iter_tensors())
    assert loaded == {n for n, _ in model.named_parameters()}
    return model


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 512, n).tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers_prefill_and_decode(checkpoints, variant):
    torch.manual_seed(0)
    prompt, decode = _tokens(12), _tokens(8, seed=1)
    ours = generate_logits(_ours(checkpoints[variant]), prompt, decode)
    ref = _hf_logits(load_hf_model(checkpoints[variant]), prompt, decode)
    assert len(ours) == 9
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape
        assert np.abs(a - b).max() < ATOL, f"{variant} step {step}: {np.abs(a - b).max()}"
    # the sequence is long enough to exercise what the variant is about
    cfg = open_model(checkpoints[variant]).config
    if cfg.sliding_window:
        assert 12 + 8 > cfg.sliding_window


def test_longrope_switches_to_long_factors_when_decode_crosses_original_max(checkpoints):
    path = checkpoints["mini-128k"]
    cfg = open_model(path).config
    orig = cfg.longrope.original_max_position_embeddings
    prompt, decode = _tokens(orig - 2), _tokens(6, seed=3)  # decode positions orig-2 .. orig+3
    ours = generate_logits(_ours(path), prompt, decode)
    ref = _hf_logits(load_hf_model(path), prompt, decode)
    errs = [float(np.abs(a - b).max()) for a, b in zip(ours, ref, strict=True)]
    assert max(errs) < ATOL, errs
    # negative control: a model that never switches (long factors = short factors) must differ after the cross
    lr = dataclasses.replace(cfg.longrope, long_factor=cfg.longrope.short_factor)
    never_long = generate_logits(_ours(path, cfg=dataclasses.replace(cfg, longrope=lr)), prompt, decode)
    # calls with end <= orig are identical, calls with end > orig are not
    before = [float(np.abs(a - b).max()) for a, b in zip(never_long[:2], ref[:2], strict=True)]
    after = [float(np.abs(a - b).max()) for a, b in zip(never_long[3:], ref[3:], strict=True)]
    assert max(before) < ATOL
    assert min(after) > 0.05, after


def test_longrope_prefill_longer_than_original_max(checkpoints):
    path = checkpoints["phi4-mini"]
    prompt, decode = _tokens(24, seed=5), _tokens(3, seed=6)
    ours = generate_logits(_ours(path), prompt, decode)
    ref = _hf_logits(load_hf_model(path), prompt, decode)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours, ref, strict=True)) < ATOL


def test_causal_mask_follows_hf_sliding_window():
    m = causal_mask(past=5, q=3, sliding_window=4)[0, 0]
    assert m.shape == (3, 8)
    allowed = np.isfinite(m)
    # query position 5 sees keys 2..5, position 7 sees 4..7
    assert allowed[0].nonzero()[0].tolist() == [2, 3, 4, 5]
    assert allowed[2].nonzero()[0].tolist() == [4, 5, 6, 7]
    assert np.isfinite(causal_mask(0, 4)[0, 0]).sum() == 10  # plain causal


def test_mask_input_only_adds_to_the_built_in_rule(checkpoints):
    """swift-transformers' zero mask (1 row) and a full HF-rule mask (q rows, -inf) give the same logits: the
    model applies causality and the sliding window itself; an extra -inf column does mask a key."""
    model = _ours(checkpoints["mini-4k"])
    prompt = torch.tensor([_tokens(20)], dtype=torch.int32)
    with torch.no_grad():
        model.reset_cache()
        zeros = model(prompt, torch.from_numpy(mask_input(0, 20)))
        full = np.concatenate([causal_mask(0, 20, sliding_window=16), np.zeros((1, 1, 20, 1))], -1)
        model.reset_cache()
        explicit = model(prompt, torch.from_numpy(full.astype(np.float32)))
        blocked = mask_input(0, 20)
        blocked[..., 5] = -np.inf  # key 5, seen by queries 5..20
        model.reset_cache()
        masked = model(prompt, torch.from_numpy(blocked))
    assert torch.equal(zeros, explicit)
    diff = (masked - zeros).abs().amax(-1)[0]
    assert diff[:5].max() == 0 and diff[5:].min() > 1e-3


def test_cache_overflow_is_an_error(checkpoints):
    model = _ours(checkpoints["mini-4k"], context=8)
    with pytest.raises(RuntimeError):
        generate_logits(model, _tokens(6), _tokens(3))


def test_rms_norm_does_not_overflow_fp16():
    """Real residual streams exceed 256 (SmolLM2 reaches ~500), where a plain x*x overflows fp16 to inf."""
    from toolkit.coreml.torch_model import RMSNorm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 64)) * 600.0
    x[0, 1] *= 1e-4  # and a tiny row, where the eps term matters
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = torch.from_numpy(rng.uniform(0.5, 1.5, 64))
    ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * norm.weight.numpy()
    got = norm.half()(torch.from_numpy(x).half()).double().numpy()
    assert np.isfinite(got).all()
    # fp16 result: relative error a few units of 2^-11 on values of order 1
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()
    plain = torch.from_numpy(x).half()
    assert not torch.isfinite((plain * plain).mean(-1)).all()  # the overflow this guards against
