"""Standalone, unscheduled PrimFuncs shaped like the Phi-3 hot kernels, for checking schedules and GPU APIs.

They use the q4 layout of the toolkit (MLC q4f*_1, `quantization.MLC_Q4_LAYOUT`): `q_weight uint32 [N, K/8]`
(element k of row n in word k/8, bits 4*(k%8)), `q_scale [N, K/32]`, value = (nibble - 7) * scale, built by
the model's own `te_dequantize`; a separate dequantize block feeding the matmul,
which is the form dlight's GEMV/Matmul rules recognise after dequant fusion (shared/notes/tvm-0.27-facts.md
2).
All shapes are int64 like Relax-legalized functions.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from ..quantization import MLC_Q4_LAYOUT
from ..quantization.tvm_layers import te_dequantize

_Q4 = MLC_Q4_LAYOUT


def dequant_matmul(
    n_out: int, k: int, dtype: str, seq_len: int | str = 1, scale: str | None = None, index: str = "int64"
) -> tirx.PrimFunc:
    """x [1, seq, K] @ dequant(W)^T -> [1, seq, N]; seq_len an int (decode GEMV) or a name (dynamic
    prefill). `scale`: the scales' dtype (default `dtype`); `index`: the shapes' integer dtype (int64 as
    Relax legalizes; int32 as `te.var` gives)."""
    i = lambda v: tirx.const(v, index)  # noqa: E731
    seq = tirx.Var(seq_len, index) if isinstance(seq_len, str) else i(seq_len)
    (qw_rows, qw_cols), (qs_rows, qs_cols) = _Q4.quantized_shapes((n_out, k))
    q_weight = te.placeholder((i(qw_rows), i(qw_cols)), _Q4.storage, name="q_weight")
    q_scale = te.placeholder((i(qs_rows), i(qs_cols)), scale or dtype, name="q_scale")
    x = te.placeholder((i(1), seq, i(k)), dtype, name="x")
    w = te_dequantize(q_weight, q_scale, i(k), dtype, _Q4)
    r = te.reduce_axis((i(0), i(k)), name="k")
    y = te.compute(
        (i(1), seq, i(n_out)), lambda b, s, j: te.sum(x[b, s, r] * w[j, r], axis=r), name="NT_matmul"
    )
    return te.create_prim_func([q_weight, q_scale, x, y])


def _legalized(build, dtype: str, name: str) -> tirx.PrimFunc:
    bb = relax.BlockBuilder()
    with bb.function("main"):
        params, out = build(bb)
        bb.emit_func_output(out, params)
    mod = relax.transform.LegalizeOps()(bb.get())
    funcs = [f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(funcs) == 1, f"{name}: expected one legalized PrimFunc"
    return funcs[0]


def rms_norm(hidden: int, dtype: str, seq_len: str = "n") -> tirx.PrimFunc:
    """relax.op.nn.rms_norm legalized (what the model's RMSNorm becomes): x [1, n, H], weight [H]."""

    def build(bb):
        x = relax.Var("x", relax.TensorType([1, tirx.Var(seq_len, "int64"), hidden], dtype))
        w = relax.Var("weight", relax.TensorType([hidden], dtype))
        return [x, w], bb.emit(relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=1e-5))

    return _legalized(build, dtype, "rms_norm")


def softmax(vocab: int, dtype: str, rows: str = "b") -> tirx.PrimFunc:
    """relax.op.nn.softmax over the last axis (sampling's logits softmax): x [b, V]."""

    def build(bb):
        x = relax.Var("x", relax.TensorType([tirx.Var(rows, "int64"), vocab], dtype))
        return [x], bb.emit(relax.op.nn.softmax(x, axis=-1))

    return _legalized(build, dtype, "softmax")


def standalone_module(dtype: str, k: int = 512, n_out: int = 256, hidden: int = 256, vocab: int = 1000):
    """An IRModule with the four hot kernels: decode GEMV, dynamic-seq prefill matmul, RMSNorm and softmax."""
    funcs = {
        "dequant_gemv": dequant_matmul(n_out, k, dtype, 1),
        "dequant_matmul": dequant_matmul(n_out, k, dtype, "seq_len"),
        "rms_norm": rms_norm(hidden, dtype),
        "softmax": softmax(vocab, dtype),
    }
    return tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})


def silu_mul(i: int = 512, dtype: str = "float32") -> tirx.PrimFunc:
    """The MLP's SiLU(gate) * up over the fused gate_up output: x [1, seq_len, 2I] -> [1, seq_len, I]."""
    m = te.var("seq_len")
    x = te.placeholder((1, m, 2 * i), dtype, name="x")
    y = te.compute(
        (1, m, i), lambda b, s, j: x[b, s, j] * tirx.sigmoid(x[b, s, j]) * x[b, s, j + i], name="silu"
    )
    return te.create_prim_func([x, y])


def add_tanh(dtype: str = "float32") -> tirx.PrimFunc:
    """Elementwise with a fully dynamic shape and math intrinsics (tanh, exp)."""
    n = te.var("n")
    a = te.placeholder((n,), dtype, name="a")
    b = te.placeholder((n,), dtype, name="b")
    y = te.compute((n,), lambda i: tirx.tanh(a[i]) + tirx.exp(b[i] * tirx.const(0.5, dtype)), name="y")
    return te.create_prim_func([a, b, y])
