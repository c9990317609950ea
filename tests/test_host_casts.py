"""The host graph (fp32 activations, fp16 norm weights and KV cache) widens the norm weights inside the norm
kernel and writes q/k/v in the cache's dtype from the RoPE kernel: no standalone cast kernels for them, and
the same numbers, bit for bit, as the separate casts gave."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend import nn  # noqa: E402
from tvm.relax.frontend.nn import op  # noqa: E402

from toolkit.config import Phi3Config  # noqa: E402
from toolkit.model.phi3 import GraphOptions, RMSNorm, export_phi3  # noqa: E402
from toolkit.model.rope import apply_rope_to_qkv  # noqa: E402

DIM, EPS = 96, 1e-5


def _cfg(**overrides) -> Phi3Config:
    """A tiny Phi-3 config: 2 MHA heads of 32, one layer, unless `overrides` say otherwise."""
    base = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
    )
    return Phi3Config(**(base | overrides))


def _run(
    module: nn.Module, spec: dict, inputs: list[np.ndarray], params: dict[str, np.ndarray]
) -> np.ndarray:
    mod, named = module.export_tvm(spec={"forward": spec})
    ex = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in inputs] + [tvm.runtime.tensor(params[n]) for n, _ in named]
    return ex["forward"](*args).numpy()


class _CastThenNorm(nn.Module):
    """The former graph: the fp16 weight cast by its own op, then TVM's rms_norm."""

    def __init__(self) -> None:
        self.weight = nn.Parameter((DIM,), dtype="float16")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return op.rms_norm(x, self.weight.astype("float32"), axes=[-1], epsilon=EPS)


def test_norm_with_widened_weight_equals_tvms_norm_after_a_cast_bit_for_bit():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 5, DIM)) * 3).astype("float32")
    w = {"weight": (rng.standard_normal(DIM) * 0.5).astype("float16")}
    spec = {"x": nn.spec.Tensor([1, 5, DIM], "float32")}
    ours = _run(RMSNorm(DIM, EPS, "float32", "float16"), spec, [x], w)
    ref = _run(_CastThenNorm(), spec, [x], w)
    np.testing.assert_array_equal(ours, ref)
    # and it is an RMS norm (fp64 numpy; fp32 rounding of a 96-term sum and an rsqrt)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + EPS) * w["weight"].astype(np.float64)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)


class _Rope(nn.Module):
    def __init__(self, cfg: Phi3Config, out_dtype: str | None, cast_after: str | None) -> None:
        self.cfg, self.out_dtype, self.cast_after = cfg, out_dtype, cast_after

    def forward(self, qkv: nn.Tensor, rope: nn.Tensor) -> nn.Tensor:
        y = apply_rope_to_qkv(qkv, rope, self.cfg, out_dtype=self.out_dtype)
        return y.astype(self.cast_after) if self.cast_after else y


@pytest.mark.parametrize("partial", [False, True])
def test_rope_writes_the_cache_dtype_as_a_cast_after_it_would(partial):
    # GQA (4 q heads, 2 k/v heads): the v heads that pass through sit after q and k
    cfg = _cfg(hidden_size=128, num_attention_heads=4, partial_rotary_factor=0.5 if partial else 1.0)
    heads, d, half = cfg.num_attention_heads + 2 * cfg.num_key_value_heads, cfg.head_dim, cfg.rotary_dim // 2
    rng = np.random.default_rng(1)
    qkv = (rng.standard_normal((3, heads, d)) * 4).astype("float32")
    rope = rng.uniform(-1, 1, (3, 2, half)).astype("float32")
    spec = {"qkv": nn.spec.Tensor([3, heads, d], "float32"), "rope": nn.spec.Tensor([3, 2, half], "float32")}
    direct = _run(_Rope(cfg, "float16", None), spec, [qkv, rope], {})
    after = _run(_Rope(cfg, None, "float16"), spec, [qkv, rope], {})
    assert direct.dtype == np.float16
    np.testing.assert_array_equal(direct, after)


def _astype_count(func: relax.Function) -> int:
    return sum(
        1
        for b in func.body.blocks
        for binding in b.bindings
        if isinstance(binding.value, relax.Call) and getattr(binding.value.op, "name", "") == "relax.astype"
    )


def test_host_decode_graph_casts_only_the_attention_output():
    cfg = _cfg(num_hidden_layers=3)
    opts = GraphOptions(quantization="q4f16_1", dtype="float32", kv_dtype="float16")
    mod, _ = export_phi3(cfg, opts, tvm.target.Target("llvm"))
    # per layer one cast: the cache's fp16 attention output back to fp32 (the cache builtin's dtype); none
    # for the 2 x 3 + 1 norm weights or for q/k/v
    assert _astype_count(mod["decode"]) == cfg.num_hidden_layers
    assert _astype_count(mod["prefill"]) == cfg.num_hidden_layers
