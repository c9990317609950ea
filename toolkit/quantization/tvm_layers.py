"""TVM `relax.frontend.nn` layers for the quantization schemes: Linear and Embedding, plain or q4 (MLC).

Parameters keep the Hugging Face names the converter writes: a plain layer has `weight`; a q4 layer has
`q_weight` (storage words (N, G * words per group)) and `q_scale` ((N, G), the scheme's scale dtype), G =
ceil(K / group size), plus `q_min` ((N, G)) for a layout with a min (GGUF Q4_1); every layout number is read
from the `GroupLayout` the scheme gives the layer's role (Linears, embedding, lm_head).

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
    """Code of element j (of its row) inside its packed storage word, minus the zero point, as `dtype`."""
    shift = ((j % layout.elems_per_word) * layout.bits).astype(layout.storage)
    code = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(layout.code_mask, layout.storage))
    code = code.astype(dtype)
    return code - tirx.const(layout.zero_point, dtype) if layout.zero_point else code


def _scale(q_scale: te.Tensor, i, g, dtype: str) -> tirx.PrimExpr:
    s = q_scale[i, g]
    return s if q_scale.dtype == dtype else s.astype(dtype)


def _value(q_weight, q_scale, q_min, row, j, dtype: str, layout: GroupLayout) -> tirx.PrimExpr:
    """Dequantized element j of `row`: (code - zero_point) * scale (+ min)."""
    g = j // layout.group_size
    v = _code_to_float(q_weight[row, j // layout.elems_per_word], j, dtype, layout) * _scale(
        q_scale, row, g, dtype
    )
    return v + _scale(q_min, row, g, dtype) if q_min is not None else v


def te_dequantize(
    q_weight: te.Tensor,
    q_scale: te.Tensor,
    k: int | tirx.PrimExpr,
    dtype: str | None = None,
    layout: GroupLayout = MLC_Q4_LAYOUT,
    q_min: te.Tensor | None = None,
) -> te.Tensor:
    """(N, G * words per group) codes + (N, G) scales (+ (N, G) mins) -> (N, k) weights in `dtype` (default:
    the scale dtype); `k` may be an int64 PrimExpr (then so is the column index).

    fp16 scales dequantized into fp32 are exact, which is how the host CPU runs q4f16_1 (fp32 activations)."""
    n = q_weight.shape[0]
    dtype = dtype or q_scale.dtype
    return te.compute(
        (n, k), lambda i, j: _value(q_weight, q_scale, q_min, i, j, dtype, layout), name="dequantize"
    )


def te_take_dequantize(
    q_weight: te.Tensor,
    q_scale: te.Tensor,
    ids: te.Tensor,
    k: int,
    dtype: str | None = None,
    layout: GroupLayout = MLC_Q4_LAYOUT,
    q_min: te.Tensor | None = None,
) -> te.Tensor:
    """Rows `ids` (T,) of the quantized table, dequantized: (T, k). Reads only the packed words it needs."""
    dtype = dtype or q_scale.dtype
    return te.compute(
        (ids.shape[0], k),
        lambda t, j: _value(q_weight, q_scale, q_min, ids[t], j, dtype, layout),
        name="take_dequantize",
    )


def _quant_params(module: nn.Module, n: int, k: int, scheme: QuantScheme, layout: GroupLayout) -> None:
    """q_weight / q_scale (/ q_min) Parameters of an (n, k) weight stored in `layout`."""
    qw_shape, qs_shape = layout.quantized_shapes((n, k))
    module.layout = layout
    module.q_weight = nn.Parameter(qw_shape, dtype=layout.storage)
    module.q_scale = nn.Parameter(qs_shape, dtype=scheme.scale_dtype)
    module.q_min = nn.Parameter(qs_shape, dtype=scheme.scale_dtype) if layout.has_min else None


def _dequant_op(module: nn.Module, k: int, dtype: str, name: str, ids: nn.Tensor | None = None) -> nn.Tensor:
    """The TE dequantize (or, with `ids`, take_dequantize) of a quantized module's parameters."""
    lay, has_min = module.layout, module.q_min is not None
    args = [module.q_weight, module.q_scale] + ([module.q_min] if has_min else [])

    def compute(qw, qs, *rest):
        qm = rest[0] if has_min else None
        if ids is None:
            return te_dequantize(qw, qs, k, dtype, lay, q_min=qm)
        return te_take_dequantize(qw, qs, rest[-1], k, dtype, lay, q_min=qm)

    return op.tensor_expr_op(compute, name, args + ([ids] if ids is not None else []))


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
        layout: GroupLayout | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = out_dtype
        self.dtype = dtype or scheme.model_dtype  # compute dtype of the dequantized weight
        _quant_params(self, out_features, in_features, scheme, layout or scheme.layout)

    def dequantized_weight(self) -> nn.Tensor:
        return _dequant_op(self, self.in_features, self.dtype, "dequantize")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return op.matmul(x, op.permute_dims(self.dequantized_weight()), out_dtype=self.out_dtype)

    def to(self, dtype: str | None = None) -> None:
        _guard_to(self, dtype)


def _widened(w: nn.Tensor, dtype: str) -> nn.Tensor:
    """`w` in `dtype`, as a TE op named "dequantize" so that FuseDequantizeMatmul fuses the cast into the
    matmul that reads it (no widened copy of the weight per call)."""
    if w.dtype == dtype:
        return w

    def cast(t: te.Tensor) -> te.Tensor:
        return te.compute(t.shape, lambda i, j: t[i, j].astype(dtype), name="dequantize")

    return op.tensor_expr_op(cast, "dequantize", [w])


class Embedding(nn.Module):
    """Unquantized token embedding with `weight` (vocab, dim); `lm_head_forward` reuses it for tied heads.
    The weight is stored in `weight_dtype` (default `dtype`) and used in `dtype`."""

    def __init__(self, vocab_size: int, dim: int, dtype: str, weight_dtype: str | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.dtype = dtype
        self.weight = nn.Parameter((vocab_size, dim), dtype=weight_dtype or dtype)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        flat = ids if ids.ndim == 1 else op.reshape(ids, [-1])
        rows = op.take(self.weight, flat, axis=0)
        if rows.dtype != self.dtype:
            rows = rows.astype(self.dtype)
        return rows if ids.ndim == 1 else op.reshape(rows, [*ids.shape, self.dim])

    def lm_head_forward(self, x: nn.Tensor, out_dtype: str | None = "float32") -> nn.Tensor:
        return op.matmul(x, op.permute_dims(_widened(self.weight, self.dtype)), out_dtype=out_dtype)


class StoredLinear(nn.Module):
    """A bias-free Linear whose `weight` is stored in `weight_dtype` and used in `dtype`: the unquantized
    roles of a quantized scheme (e.g. a gguf scheme's f16 lm_head), stored in the scheme's model dtype like
    the norms, so a library computing in fp32 (the host) loads the folder as converted."""

    def __init__(self, in_features: int, out_features: int, dtype: str, weight_dtype: str, out_dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.out_dtype = dtype, out_dtype
        self.weight = nn.Parameter((out_features, in_features), dtype=weight_dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        w = _widened(self.weight, self.dtype)
        return op.matmul(x, op.permute_dims(w), out_dtype=self.out_dtype)


class QuantizedEmbedding(nn.Module):
    """q4 token embedding (`q_weight`, `q_scale`); rows are dequantized as they are gathered."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        scheme: QuantScheme,
        dtype: str | None = None,
        layout: GroupLayout | None = None,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        _quant_params(self, vocab_size, dim, scheme, layout or scheme.layout)
        self.dtype = dtype or scheme.model_dtype  # compute dtype of the gathered rows

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        flat = ids if ids.ndim == 1 else op.reshape(ids, [-1])
        rows = _dequant_op(self, self.dim, self.dtype, "take_dequantize", ids=flat)
        return rows if ids.ndim == 1 else op.reshape(rows, [*ids.shape, self.dim])

    def to(self, dtype: str | None = None) -> None:
        _guard_to(self, dtype)

    def lm_head_forward(self, x: nn.Tensor, out_dtype: str | None = "float32") -> nn.Tensor:
        """Tied lm_head: the same quantized table, dequantized inside the (fused) matmul."""
        w = _dequant_op(self, self.dim, self.dtype, "dequantize")
        return op.matmul(x, op.permute_dims(w), out_dtype=out_dtype)


def make_linear(
    in_features: int,
    out_features: int,
    scheme: QuantScheme | str,
    dtype: str | None = None,
    out_dtype: str | None = None,
    role: str = "linear",
) -> nn.Module:
    """A bias-free Linear for `scheme`: `nn.Linear` (param `weight`) where the scheme keeps `role` ("linear",
    or "head" for an untied lm_head) unquantized, else `QuantizedLinear` in that role's layout.

    `dtype` defaults to the scheme's model dtype; `out_dtype` (e.g. "float32" for the lm_head) sets the
    matmul output dtype.
    """
    scheme = get_scheme(scheme)
    dtype = dtype or scheme.model_dtype
    layout = scheme.layout_for(role)
    if layout is None and scheme.is_quantized:  # a role the scheme keeps unquantized, in its model dtype
        return StoredLinear(in_features, out_features, dtype, scheme.model_dtype, out_dtype=out_dtype)
    if layout is None:
        return nn.Linear(in_features, out_features, bias=False, dtype=dtype, out_dtype=out_dtype)
    return QuantizedLinear(in_features, out_features, scheme, out_dtype=out_dtype, dtype=dtype, layout=layout)


def make_embedding(
    vocab_size: int, dim: int, scheme: QuantScheme | str, dtype: str | None = None
) -> nn.Module:
    """Token embedding for `scheme` with `forward(ids)` and `lm_head_forward(x)` (tied lm_head)."""
    scheme = get_scheme(scheme)
    dtype = dtype or scheme.model_dtype
    layout = scheme.layout_for("embedding")
    if layout is None:
        # stored in the model dtype when the scheme quantizes (like its norms), else in the activation dtype
        return Embedding(vocab_size, dim, dtype, scheme.model_dtype if scheme.is_quantized else None)
    return QuantizedEmbedding(vocab_size, dim, scheme, dtype=dtype, layout=layout)
