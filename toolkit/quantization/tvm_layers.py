"""TVM `relax.frontend.nn` layers for the quantization schemes: Linear and Embedding, plain or q4 (MLC).

Parameters keep the Hugging Face names the converter writes: a plain layer has `weight`; a q4 layer has
`q_weight` (storage words (N, G * words per group)) and `q_scale` ((N, G), the scheme's scale dtype), G =
ceil(K / group size), plus `q_min` ((N, G)) for a layout with a min (GGUF Q4_1); every layout number is read
from the `GroupLayout` the scheme gives the layer's role (Linears, embedding, lm_head). A K-quant layer
(`KQuantLayout`) has the parameters its layout's `suffixes` name, dequantized by `_k_value`.

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
from tvm.relax import op as relax_op
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.core import wrap_nested

from . import MLC_Q4_LAYOUT, SUPER_BLOCK, GroupLayout, KQuantLayout, Layout, QuantScheme, get_scheme


def _code_to_float(word: tirx.PrimExpr, j: tirx.PrimExpr, dtype: str, layout: GroupLayout) -> tirx.PrimExpr:
    """Code of element j (of its row) inside its packed storage word, minus the zero point, as `dtype`."""
    shift = ((j % layout.elems_per_word) * layout.bits).astype(layout.storage)
    code = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(layout.code_mask, layout.storage))
    code = code.astype(dtype)
    return code - tirx.const(layout.zero_point, dtype) if layout.zero_point else code


def f16_bits_to_float32(h: tirx.PrimExpr) -> tirx.PrimExpr:
    """The fp16 value of uint16 bits `h` as float32, exactly (subnormals, signed zeros, inf and NaN too).
    An fp32 gguf scheme stores its fp16 d / dmin this way, as uint16 rather than float16 or float32: a
    float16 buffer anywhere in a kernel makes TVM's OpenCL codegen declare `half*` and need cl_khr_fp16
    (which PoCL lacks) even if it is only widened, and float32 storage would add 16 bits per block (Q4_1
    5.0 -> 6.0 bits per weight). Integer ops only, plus one exact int -> float conversion, so neither fp32
    denormal flushing nor fast-math can change the result."""
    u32 = "uint32"
    h = h.astype(u32)
    a = tirx.bitwise_and(h, tirx.const(0x7FFF, u32))
    # normal numbers: exponent and mantissa moved into place, bias 15 -> 127; inf / NaN: exponent 31 -> 255
    rebias = tirx.Select(
        a >= tirx.const(0x7C00, u32), tirx.const(0x70000000, u32), tirx.const(0x38000000, u32)
    )
    normal = tirx.shift_left(a, tirx.const(13, u32)) + rebias
    # subnormals: a * 2^-24, by taking 24 off the exponent of float(a) (exact, a normal fp32 number); no
    # float arithmetic (measured: the llvm build of a * 2^-24 in this expression came out 1 ulp low)
    as_float = tirx.reinterpret(u32, a.astype("float32")) - tirx.const(24 << 23, u32)
    small = tirx.Select(a == tirx.const(0, u32), tirx.const(0, u32), as_float)
    mag = tirx.Select(a < tirx.const(0x400, u32), small, normal)
    sign = tirx.shift_left(tirx.bitwise_and(h, tirx.const(0x8000, u32)), tirx.const(16, u32))
    return tirx.reinterpret("float32", tirx.bitwise_or(mag, sign))


def _scale_value_dtype(q_scale) -> str:
    """The dtype a stored scale array's values have (uint16 holds fp16 bits, widened to float32)."""
    return "float32" if q_scale.dtype == "uint16" else q_scale.dtype


def _scale(q_scale: te.Tensor, i, g, dtype: str) -> tirx.PrimExpr:
    s = q_scale[i, g]
    if q_scale.dtype == "uint16":  # fp16 bits (an fp32 gguf scheme's d / dmin)
        s = f16_bits_to_float32(s)
    return s if _scale_value_dtype(q_scale) == dtype else s.astype(dtype)


def _value(q_weight, q_scale, q_min, row, j, dtype: str, layout: GroupLayout) -> tirx.PrimExpr:
    """Dequantized element j of `row`: (code - zero_point) * scale (+ min)."""
    g = j // layout.group_size
    v = _code_to_float(q_weight[row, j // layout.elems_per_word], j, dtype, layout) * _scale(
        q_scale, row, g, dtype
    )
    return v + _scale(q_min, row, g, dtype) if q_min is not None else v


def _bits_at(words: te.Tensor, row, j, bits: int) -> tirx.PrimExpr:
    """The `bits`-bit field of element j in a plane packing 32 / bits fields per uint32, lowest first."""
    per = 32 // bits
    shift = ((j % per) * bits).astype("uint32")
    return tirx.bitwise_and(
        tirx.shift_right(words[row, j // per], shift), tirx.const((1 << bits) - 1, "uint32")
    )


def _k_value(planes: dict[str, te.Tensor], row, j, dtype: str, layout: KQuantLayout) -> tirx.PrimExpr:
    """Dequantized element j of `row` of a K-quant weight: Q4_K/Q5_K (d*sc)*q - dmin*m, Q6_K (d*sc)*(q - 32),
    the order of gguf.quants' numpy (every product is exact in fp32; see gguf_blocks)."""
    code = _bits_at(planes["q_weight"], row, j, 4)
    if layout.high_bits:
        high = _bits_at(planes["q_high"], row, j, layout.high_bits)
        code = tirx.bitwise_or(code, tirx.shift_left(high, tirx.const(4, "uint32")))
    sb = j // SUPER_BLOCK
    d = _scale(planes["q_scale"], row, sb, dtype)
    q_sub = planes["q_sub"]
    if not layout.has_min:  # Q6_K: 16 byte scales (int8 + 128) per super-block, one per 16 weights
        sc = _bits_at(q_sub, row, j // layout.sub_block, 8).astype(dtype) - tirx.const(128, dtype)
        return (d * sc) * (code.astype(dtype) - tirx.const(layout.zero_point, dtype))
    t = (j // layout.sub_block) % 8  # sub-block in its super-block: its scale byte, and 8 bytes on its min
    sc = _bits_at(q_sub, row, sb * 16 + t, 8).astype(dtype)
    mn = _bits_at(q_sub, row, sb * 16 + 8 + t, 8).astype(dtype)
    return (d * sc) * code.astype(dtype) - _scale(planes["q_min"], row, sb, dtype) * mn


def te_dequantize_planes(
    planes: dict[str, te.Tensor], k, dtype: str, layout: Layout, ids: te.Tensor | None = None
) -> te.Tensor:
    """(N, k) dequantized weights (or, with `ids`, rows ids of them) of the parameters of any layout, keyed
    by suffix (q_weight, q_scale, ...)."""
    if isinstance(layout, GroupLayout):
        qw, qs, qm = planes["q_weight"], planes["q_scale"], planes.get("q_min")
        if ids is None:
            return te_dequantize(qw, qs, k, dtype, layout, q_min=qm)
        return te_take_dequantize(qw, qs, ids, k, dtype, layout, q_min=qm)
    if ids is None:
        n = planes["q_weight"].shape[0]
        return te.compute((n, k), lambda i, j: _k_value(planes, i, j, dtype, layout), name="dequantize")
    n = planes["q_weight"].shape[0]
    return te.compute(
        (ids.shape[0], k),
        lambda t, j: _k_value(planes, _in_range(ids, t, n), j, dtype, layout),
        name="take_dequantize",
    )


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
    dtype = dtype or _scale_value_dtype(q_scale)
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
    dtype = dtype or _scale_value_dtype(q_scale)
    n = q_weight.shape[0]
    return te.compute(
        (ids.shape[0], k),
        lambda t, j: _value(q_weight, q_scale, q_min, _in_range(ids, t, n), j, dtype, layout),
        name="take_dequantize",
    )


def _in_range(ids: te.Tensor, t, n) -> tirx.PrimExpr:
    """ids[t] clamped to a row of an n-row table, like `take` below (mode "clip")."""
    return tirx.max(tirx.min(ids[t], tirx.const(int(n) - 1, ids.dtype)), tirx.const(0, ids.dtype))


def _quant_params(module: nn.Module, n: int, k: int, scheme: QuantScheme, layout: Layout) -> None:
    """The Parameters (q_weight, q_scale, and q_min / q_high / q_sub as the layout has them) of an (n, k)
    weight stored in `layout`; an absent one is None."""
    module.layout = layout
    module.q_min = None
    for suffix, shape, dtype in zip(
        layout.suffixes, layout.param_shapes((n, k)), layout.param_dtypes(scheme.scale_dtype)
    ):
        setattr(module, suffix, nn.Parameter(shape, dtype=dtype))


def _dequant_op(module: nn.Module, k: int, dtype: str, name: str, ids: nn.Tensor | None = None) -> nn.Tensor:
    """The TE dequantize (or, with `ids`, take_dequantize) of a quantized module's parameters."""
    lay = module.layout
    suffixes = lay.suffixes
    args = [getattr(module, s) for s in suffixes]

    def compute(*tensors):
        planes = dict(zip(suffixes, tensors))
        return te_dequantize_planes(planes, k, dtype, lay, ids=tensors[-1] if ids is not None else None)

    return op.tensor_expr_op(compute, name, args + ([ids] if ids is not None else []))


def _guard_to(module: nn.Module, dtype: str | None) -> None:
    """`Module.to(dtype)` would recast the uint32 codes; allow only the dtype the scales already have."""
    own = _scale_value_dtype(module.q_scale)
    if dtype is not None and dtype != own:
        raise ValueError(f"{type(module).__name__} computes in {own}, not {dtype}")


class QuantizedLinear(nn.Module):
    """y = x @ dequantize(q_weight, q_scale).T, no bias (Phi-3 has none)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        out_dtype: str | None = None,
        dtype: str | None = None,
        layout: Layout | None = None,
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


def take(x: nn.Tensor, indices: nn.Tensor, axis: int, name: str = "take") -> nn.Tensor:
    """`nn.op.take` with the indices clamped into range. TVM's default ("fast") reads wherever an index
    points, and its compiler warns so on every build ("Fast mode segfaults when there are out-of-bounds
    indices"). Token ids are checked before they reach a library, so clamping changes no result; it costs a
    min and a max per index, and a bad id from another runtime reads a wrong row, not outside the tensor."""
    return wrap_nested(relax_op.take(x._expr, indices._expr, axis, mode="clip"), name)


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
        rows = take(self.weight, flat, axis=0)
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
        layout: Layout | None = None,
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
    name: str | None = None,
) -> nn.Module:
    """A bias-free Linear for `scheme`: `nn.Linear` (param `weight`) where the scheme keeps `role` ("linear",
    or "head" for an untied lm_head) unquantized, else `QuantizedLinear` in that role's layout.

    `dtype` defaults to the scheme's model dtype; `out_dtype` (e.g. "float32" for the lm_head) sets the
    matmul output dtype. `name` (the Hugging Face weight name) picks a per-tensor exception of a gguf mix.
    """
    scheme = get_scheme(scheme)
    dtype = dtype or scheme.model_dtype
    layout = scheme.layout_for_weight(name) if name else scheme.layout_for(role)
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
