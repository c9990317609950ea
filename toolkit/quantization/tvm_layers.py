"""TVM `relax.frontend.nn` layers for the quantization schemes: Linear and Embedding, plain or q4 (MLC).

Parameters keep the Hugging Face names the converter writes: a plain layer has `weight`; a q4 layer has
`q_weight` (storage words (N, G * words per group)) and `q_scale` ((N, G), model dtype), G = ceil(K / group
size); every layout number is read from the scheme's `GroupLayout`.

The q4 Linear is written the way MLC-LLM writes it, because that is what TVM's GPU schedules (dlight GEMV /
Matmul) recognise: a separate TE op named "dequantize" followed by `matmul(x, permute_dims(w))`.
`toolkit.compile.fuse_dequant.FuseDequantizeMatmul` then fuses the two into one PrimFunc, so the dequantized
weight never exists as a tensor. The q4 Embedding gathers and dequantizes the selected rows in one TE op
(`take_dequantize`): only the rows looked up are ever dequantized.
Every Parameter gets its dtype here. `Module.to(dtype)` would recast the uint32 codes, so the q4 layers
accept only `to()` with their own model dtype (a no-op) and raise otherwise.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from . import MLC_Q4_LAYOUT, GroupLayout, QuantScheme, get_scheme


def _code_to_float(word: tirx.PrimExpr, j: tirx.PrimExpr, dtype: str, layout: GroupLayout) -> tirx.PrimExpr:
    """Code of element j (of its row) inside its packed storage word, minus max_int, as `dtype`."""
    shift = ((j % layout.elems_per_word) * layout.bits).astype(layout.storage)
    code = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(layout.code_mask, layout.storage))
    return code.astype(dtype) - tirx.const(layout.max_int, dtype)


def _scale(q_scale: te.Tensor, i, g, dtype: str) -> tirx.PrimExpr:
    s = q_scale[i, g]
    return s if q_scale.dtype == dtype else s.astype(dtype)


def te_dequantize(
    q_weight: te.Tensor,
    q_scale: te.Tensor,
    k: int | tirx.PrimExpr,
    dtype: str | None = None,
    layout: GroupLayout = MLC_Q4_LAYOUT,
) -> te.Tensor:
    """(N, G * words per group) codes + (N, G) scales -> (N, k) weights in `dtype` (default: the scale
    dtype); `k` may be an int64 PrimExpr (then so is the column index).

    fp16 scales dequantized into fp32 are exact, which is how the host CPU runs q4f16_1 (fp32 activations)."""
    n = q_weight.shape[0]
    dtype = dtype or q_scale.dtype
    return te.compute(
        (n, k),
        lambda i, j: (
            _code_to_float(q_weight[i, j // layout.elems_per_word], j, dtype, layout)
            * _scale(q_scale, i, j // layout.group_size, dtype)
        ),
        name="dequantize",
    )


def te_take_dequantize(
    q_weight: te.Tensor,
    q_scale: te.Tensor,
    ids: te.Tensor,
    k: int,
    dtype: str | None = None,
    layout: GroupLayout = MLC_Q4_LAYOUT,
) -> te.Tensor:
    """Rows `ids` (T,) of the quantized table, dequantized: (T, k). Reads only the packed words it needs."""
    dtype = dtype or q_scale.dtype
    return te.compute(
        (ids.shape[0], k),
        lambda t, j: (
            _code_to_float(q_weight[ids[t], j // layout.elems_per_word], j, dtype, layout)
            * _scale(q_scale, ids[t], j // layout.group_size, dtype)
        ),
        name="take_dequantize",
    )


def _guard_to(module: nn.Module, dtype: str | None) -> None:
    """`Module.to(dtype)` would recast the uint32 codes; allow only the dtype the scales already have."""
    if dtype is not None and dtype != module.q_scale.dtype:
        raise ValueError(f"{type(module).__name__} computes in {module.q_scale.dtype}, not {dtype}")


class QuantizedLinear(nn.Module):
    """y = x @ dequantize(q_weight, q_scale).T, no bias (Phi-3 has none)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        out_dtype: str | None = None,
        dtype: str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = out_dtype
        self.dtype = dtype or scheme.scale_dtype  # compute dtype of the dequantized weight
        self.layout = scheme.layout
        qw_shape, qs_shape = scheme.layout.quantized_shapes((out_features, in_features))
        self.q_weight = nn.Parameter(qw_shape, dtype=scheme.storage)
        self.q_scale = nn.Parameter(qs_shape, dtype=scheme.scale_dtype)

    def dequantized_weight(self) -> nn.Tensor:
        k, dt, lay = self.in_features, self.dtype, self.layout
        return op.tensor_expr_op(
            lambda qw, qs: te_dequantize(qw, qs, k, dt, lay), "dequantize", [self.q_weight, self.q_scale]
        )

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return op.matmul(x, op.permute_dims(self.dequantized_weight()), out_dtype=self.out_dtype)

    def to(self, dtype: str | None = None) -> None:
        _guard_to(self, dtype)


class Embedding(nn.Module):
    """Unquantized token embedding with `weight` (vocab, dim); `lm_head_forward` reuses it for tied heads."""

    def __init__(self, vocab_size: int, dim: int, dtype: str):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.weight = nn.Parameter((vocab_size, dim), dtype=dtype)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        flat = ids if ids.ndim == 1 else op.reshape(ids, [-1])
        rows = op.take(self.weight, flat, axis=0)
        return rows if ids.ndim == 1 else op.reshape(rows, [*ids.shape, self.dim])

    def lm_head_forward(self, x: nn.Tensor, out_dtype: str | None = "float32") -> nn.Tensor:
        return op.matmul(x, op.permute_dims(self.weight), out_dtype=out_dtype)


class QuantizedEmbedding(nn.Module):
    """q4 token embedding (`q_weight`, `q_scale`); rows are dequantized as they are gathered."""

    def __init__(self, vocab_size: int, dim: int, scheme: QuantScheme, dtype: str | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.layout = scheme.layout
        qw_shape, qs_shape = scheme.layout.quantized_shapes((vocab_size, dim))
        self.q_weight = nn.Parameter(qw_shape, dtype=scheme.storage)
        self.q_scale = nn.Parameter(qs_shape, dtype=scheme.scale_dtype)
        self.dtype = dtype or scheme.scale_dtype  # compute dtype of the gathered rows

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        flat = ids if ids.ndim == 1 else op.reshape(ids, [-1])
        dim, dt, lay = self.dim, self.dtype, self.layout
        rows = op.tensor_expr_op(
            lambda qw, qs, i: te_take_dequantize(qw, qs, i, dim, dt, lay),
            "take_dequantize",
            [self.q_weight, self.q_scale, flat],
        )
        return rows if ids.ndim == 1 else op.reshape(rows, [*ids.shape, self.dim])

    def to(self, dtype: str | None = None) -> None:
        _guard_to(self, dtype)

    def lm_head_forward(self, x: nn.Tensor, out_dtype: str | None = "float32") -> nn.Tensor:
        """Tied lm_head: the same quantized table, dequantized inside the (fused) matmul."""
        dim, dt, lay = self.dim, self.dtype, self.layout
        w = op.tensor_expr_op(
            lambda qw, qs: te_dequantize(qw, qs, dim, dt, lay), "dequantize", [self.q_weight, self.q_scale]
        )
        return op.matmul(x, op.permute_dims(w), out_dtype=out_dtype)


def make_linear(
    in_features: int,
    out_features: int,
    scheme: QuantScheme | str,
    dtype: str | None = None,
    out_dtype: str | None = None,
) -> nn.Module:
    """A bias-free Linear for `scheme`: `nn.Linear` (param `weight`) for q0*, `QuantizedLinear` for q4*.

    `dtype` defaults to the scheme's model dtype; `out_dtype` (e.g. "float32" for the lm_head) sets the
    matmul output dtype.
    """
    scheme = get_scheme(scheme)
    dtype = dtype or scheme.model_dtype
    if not scheme.is_quantized:
        return nn.Linear(in_features, out_features, bias=False, dtype=dtype, out_dtype=out_dtype)
    return QuantizedLinear(in_features, out_features, scheme, out_dtype=out_dtype, dtype=dtype)


def make_embedding(
    vocab_size: int, dim: int, scheme: QuantScheme | str, dtype: str | None = None
) -> nn.Module:
    """Token embedding for `scheme` with `forward(ids)` and `lm_head_forward(x)` (tied lm_head)."""
    scheme = get_scheme(scheme)
    dtype = dtype or scheme.model_dtype
    if not scheme.is_quantized or not scheme.quantize_embedding:
        return Embedding(vocab_size, dim, dtype)
    return QuantizedEmbedding(vocab_size, dim, scheme, dtype=dtype)
