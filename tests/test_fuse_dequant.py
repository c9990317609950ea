"""q4 layers + FuseDequantizeMatmul: one kernel per quantized Linear (checked in the IR) and right numbers."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend import nn  # noqa: E402

from toolkit.compile.fuse_dequant import (  # noqa: E402
    FuseDequantizeMatmul,
    fused_dequant_kernels,
    unfused_dequant_kernels,
)
from toolkit.quantization import get_scheme  # noqa: E402
from toolkit.quantization import group_quant as gq  # noqa: E402
from toolkit.quantization.tvm_layers import QuantizedEmbedding, QuantizedLinear, make_embedding, make_linear  # noqa: E402

VOCAB, HIDDEN, INTER = 64, 96, 80  # 80 is not a multiple of 32: exercises MLC's padded last group


class TinyBlock(nn.Module):
    """embedding -> Linear -> Linear + residual, plus a tied lm_head: a decoder's quantized parts in small."""

    def __init__(self, scheme: str):
        dt = get_scheme(scheme).model_dtype
        self.embed = make_embedding(VOCAB, HIDDEN, scheme)
        self.up = make_linear(HIDDEN, INTER, scheme)
        self.down = make_linear(INTER, HIDDEN, scheme)
        self.dtype = dt

    def forward(self, ids: nn.Tensor):
        h = self.embed(ids)  # (1, n, HIDDEN)
        h = self.down(self.up(h)) + h
        return h, self.embed.lm_head_forward(h)


def _export(scheme: str):
    model = TinyBlock(scheme)
    spec = {"forward": {"ids": nn.spec.Tensor([1, "n"], "int32")}}
    return model.export_tvm(spec=spec)


def _fuse(mod: tvm.IRModule, transpose_matmul: bool = True) -> tvm.IRModule:
    passes = [relax.transform.FuseTransposeMatmul()] if transpose_matmul else []
    passes += [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        FuseDequantizeMatmul(),
        relax.transform.DeadCodeElimination(),
    ]
    return tvm.transform.Sequential(passes)(mod)


def _relax_call_shapes(func: relax.Function) -> list[tuple[str, tuple]]:
    """(callee, output shape) of every call_tir binding in a Relax function."""
    out = []

    def visit(expr):
        if (
            isinstance(expr, tvm.ir.Call)
            and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == "relax.call_tir"
        ):
            dims = expr.ty.shape.values
            shape = tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in dims)
            out.append((expr.args[0].name_hint, shape))

    relax.analysis.post_order_visit(func.body, visit)
    return out


def test_layers_have_mlc_param_names_and_dtypes() -> None:
    _, params = _export("q4f16_1")
    got = {name: (tuple(int(d) for d in p.shape), p.dtype) for name, p in params}
    assert got == {
        "embed.q_weight": ((VOCAB, 12), "uint32"),
        "embed.q_scale": ((VOCAB, 3), "float16"),
        "up.q_weight": ((INTER, 12), "uint32"),
        "up.q_scale": ((INTER, 3), "float16"),
        "down.q_weight": ((HIDDEN, 12), "uint32"),  # K=80 -> 3 groups (padded) -> 12 words
        "down.q_scale": ((HIDDEN, 3), "float16"),
    }
    assert isinstance(make_linear(8, 32, "q4f32_1"), QuantizedLinear)
    assert isinstance(make_linear(8, 32, "q0f16"), nn.Linear)
    assert isinstance(make_embedding(8, 32, "q4f16_1"), QuantizedEmbedding)
    assert make_linear(32, 8, "q0f32").weight.dtype == "float32"
    lin = make_linear(64, 8, "q4f16_1")
    lin.to("float16")  # the model dtype: a no-op that must not touch the uint32 codes
    assert lin.q_weight.dtype == "uint32" and lin.q_scale.dtype == "float16"
    with pytest.raises(ValueError):
        lin.to("float32")


def test_unfused_pipeline_materialises_dequantized_weights() -> None:
    """The premise of the pass: without it dequantized weights are separate tensors (if this starts to fail,
    TVM fuses by itself and the pass may be unnecessary)."""
    mod, _ = _export("q4f32_1")
    passes = [
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    mod = tvm.transform.Sequential(passes)(mod)
    assert fused_dequant_kernels(mod) == []
    shapes = [s for _, s in _relax_call_shapes(mod["forward"])]
    assert (INTER, HIDDEN) in shapes


@pytest.mark.parametrize("transpose_matmul", [True, False])
def test_dequantize_fused_into_matmul(transpose_matmul: bool) -> None:
    mod = _fuse(_export("q4f16_1")[0], transpose_matmul)
    fused = fused_dequant_kernels(mod)
    # up, down (+ residual add), tied lm_head: three fused kernels, none left dequantizing on its own
    assert len(fused) == 3, fused
    assert any("add" in name for name in fused)  # the residual epilogue went in too
    assert unfused_dequant_kernels(mod) == []
    calls = _relax_call_shapes(mod["forward"])
    callees = {c for c, _ in calls}
    assert set(fused) <= callees
    # no Relax-level tensor has the shape of a (dequantized) weight, in either orientation
    weight_shapes = {(INTER, HIDDEN), (HIDDEN, INTER), (VOCAB, HIDDEN), (HIDDEN, VOCAB)}
    assert not [c for c in calls if c[1] in weight_shapes], calls


def _run(scheme: str, ids: np.ndarray, weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    mod, params = _export(scheme)
    mod = _fuse(mod)
    ex = relax.build(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(weights[name]) for name, _ in params]
    h, logits = vm["forward"](tvm.runtime.tensor(ids), *args)
    return h.numpy(), logits.numpy()


def _reference(ids: np.ndarray, weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy forward with the dequantized weights (so it measures the compiler, not quantization)."""
    deq = {
        layer: gq.dequantize(weights[f"{layer}.q_weight"], weights[f"{layer}.q_scale"], k).astype(np.float64)
        for layer, k in (("embed", HIDDEN), ("up", HIDDEN), ("down", INTER))
    }
    h = deq["embed"][ids]
    h = (h @ deq["up"].T) @ deq["down"].T + h
    return h, h @ deq["embed"].T


@pytest.mark.parametrize("scheme", ["q4f32_1", "q4f16_1"])
def test_fused_kernels_compute_the_dequantized_matmul(scheme: str) -> None:
    rng = np.random.default_rng(0)
    weights = {}
    for layer, (n, k) in {"embed": (VOCAB, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}.items():
        w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
        weights[f"{layer}.q_weight"], weights[f"{layer}.q_scale"] = gq.quantize(w, scheme)
    ids = rng.integers(0, VOCAB, size=(1, 7)).astype(np.int32)
    h, logits = _run(scheme, ids, weights)
    ref_h, ref_logits = _reference(ids, weights)
    for got, ref in ((h, ref_h), (logits, ref_logits)):
        rel = np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max()
        # fp32: K <= 96 float32 products summed, error ~ K * 2**-24 relative -> 1e-5 leaves 20x headroom.
        # fp16 activations: the residual stream and the fp16 matmul outputs are rounded to fp16 (2**-11 =
        # 4.9e-4) at each of ~4 steps, plus fp16 accumulation over K <= 96 -> 1e-2 (measured ~1e-3).
        assert rel < (1e-5 if scheme == "q4f32_1" else 1e-2), rel
