"""Weight quantization schemes, as plain data (one registry, MLC-LLM's names and storage layout).

`q4f16_1` / `q4f32_1` are MLC-LLM's group quantization with the NK ("_1") layout: 4-bit codes in groups of 32
consecutive input (K) elements, one scale per group, eight codes per uint32. `q0*` means no quantization.
The storage layout (bits, group size, codes per word, zero point) is derived once, in `GroupLayout`, and
every user (numpy quantizer, TVM layers, host kernel matchers) reads it from the scheme.
`gguf_<type>` schemes hold llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks losslessly repacked into the same kind of
layout (codes in uint32 words, fp16 scale and min arrays), so a GGUF is imported without re-quantizing it;
their embedding and lm_head may use another block type (`gguf_q4_1-q8_0`), see `gguf_scheme_name`.
The K-quants (Q4_K / Q5_K / Q6_K: 256-weight super-blocks with 6- or 8-bit sub-block scales) have a
two-level layout of their own, `KQuantLayout`. A llama.cpp "_M" mix (some layers' Linears in another type)
names its per-tensor exceptions in the scheme name: llama.cpp 0.3.36's Q4_K_M of an 8-layer Phi-3 is
`gguf_q4_k-q4_k-q6_k-qkv_q6_k_lc9-down_q6_k_lc9` (Q4_K; Q6_K lm_head; Q6_K qkv and down_proj in layers 0,
3, 6, 7), so a scheme name alone still fixes every parameter of the compiled library (the converted folder
records just that name).
A gguf scheme computes in fp16 like q4f16_1; its `_f32` twin (`gguf_q4_1-q8_0_f32`, like q4f32_1) computes
in fp32 for devices without fp16 (PoCL's OpenCL): same blocks, the fp16 d/dmin kept bit for bit as uint16 and
widened exactly inside the kernels, norms and unquantized roles (`f32` in the name) in fp32.
The numerics live in `group_quant.py` and `gguf_blocks.py`, the TVM modules in `tvm_layers.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError

_STORAGE_BITS = {"uint8": 8, "uint16": 16, "uint32": 32}


@dataclass(frozen=True)
class GroupLayout:
    """How group-quantized codes are stored: `bits`-bit codes, `group_size` consecutive K elements share a
    scale, `elems_per_word` codes per `storage` word (element k at bits [bits*(k % epw), ...), lowest first),
    and a code c stands for (c - zero_point) * scale (+ min with `has_min`, a per-group offset array, GGUF
    Q4_1). The derived fields follow MLC-LLM's GroupQuantize; zero_point defaults to its max_int."""

    bits: int = 4
    group_size: int = 32
    storage: str = "uint32"
    zero_point: int | None = None  # None: max_int (MLC)
    has_min: bool = False
    storage_bits: int = field(init=False)
    elems_per_word: int = field(init=False)
    max_int: int = field(init=False)
    code_mask: int = field(init=False)

    def __post_init__(self) -> None:
        storage_bits = _STORAGE_BITS.get(self.storage)
        if storage_bits is None:
            raise ValueError(f"storage {self.storage!r} is not one of {', '.join(_STORAGE_BITS)}")
        if not 2 <= self.bits <= storage_bits or storage_bits % self.bits:
            raise ValueError(f"{self.bits}-bit codes do not pack evenly into {self.storage}")
        elems = storage_bits // self.bits
        if self.group_size <= 0 or self.group_size % elems:
            raise ValueError(f"group size {self.group_size} is not a multiple of {elems} codes per word")
        object.__setattr__(self, "storage_bits", storage_bits)
        object.__setattr__(self, "elems_per_word", elems)
        object.__setattr__(self, "max_int", 2 ** (self.bits - 1) - 1)
        object.__setattr__(self, "code_mask", 2**self.bits - 1)
        if self.zero_point is None:
            object.__setattr__(self, "zero_point", self.max_int)
        if not 0 <= self.zero_point <= self.code_mask:
            raise ValueError(f"zero point {self.zero_point} is not a {self.bits}-bit code")

    @property
    def words_per_group(self) -> int:
        return self.group_size // self.elems_per_word

    def num_groups(self, k: int) -> int:
        """Groups per row of K elements (K is padded up to whole groups, like MLC)."""
        return -(-k // self.group_size)

    def quantized_shapes(self, shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(q_weight shape, q_scale shape) of a group-quantized (N, K) weight."""
        n, k = shape
        g = self.num_groups(k)
        return (n, g * self.words_per_group), (n, g)

    def bits_per_weight(self, scale_bits: int) -> float:
        """Storage per weight: the code plus its share of the group's scale (and min)."""
        return self.bits + scale_bits * (2 if self.has_min else 1) / self.group_size

    @property
    def suffixes(self) -> tuple[str, ...]:
        """Stored parameter suffixes of a weight in this layout."""
        return ("q_weight", "q_scale", "q_min") if self.has_min else ("q_weight", "q_scale")

    def param_shapes(self, shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        """Shapes of the `suffixes` parameters of an (N, K) weight."""
        qw, qs = self.quantized_shapes(shape)
        return (qw, qs, qs) if self.has_min else (qw, qs)

    def param_dtypes(self, scale_dtype: str) -> tuple[str, ...]:
        return (self.storage, scale_dtype, scale_dtype) if self.has_min else (self.storage, scale_dtype)


SUPER_BLOCK = 256  # weights per K-quant super-block (QK_K)


@dataclass(frozen=True)
class KQuantLayout:
    """llama.cpp's K-quant super-blocks (ggml-common.h), losslessly repacked into uint32 planes and fp16
    arrays (gguf_blocks.py): per (N, K) weight
      q_weight (N, K/8)    low 4 bits of each code, 8 per word, element order, lowest bits first (like q4);
      q_high   (N, K*hb/32) the code's high bits (`high_bits` = 1 for Q5_K, 2 for Q6_K), packed the same way;
      q_sub    (N, K/64)   the sub-block scales as bytes, 4 per word: Q4_K/Q5_K 4 words per super-block
                           (8 6-bit scales, then 8 6-bit mins), Q6_K 4 words (16 int8 scales, stored + 128);
      q_scale  (N, K/256)  fp16 d, and for Q4_K/Q5_K q_min (N, K/256) fp16 dmin.
    Values (float32, as gguf.quants): Q4_K/Q5_K d*sc*q - dmin*m; Q6_K d*sc*(q - 32)."""

    bits: int  # code bits: 4 (Q4_K), 5 (Q5_K), 6 (Q6_K)
    sub_block: int  # weights per sub-block scale: 32, or 16 (Q6_K)
    has_min: bool
    group_size: int = SUPER_BLOCK
    storage: str = "uint32"
    # the 4-bit plane, read like a q4 layout's codes
    elems_per_word: int = 8
    code_mask: int = 0xF

    @property
    def high_bits(self) -> int:
        return self.bits - 4

    @property
    def zero_point(self) -> int:
        return 32 if self.bits == 6 else 0

    @property
    def suffixes(self) -> tuple[str, ...]:
        high = ("q_high",) if self.high_bits else ()
        return ("q_weight", *high, "q_sub", "q_scale") + (("q_min",) if self.has_min else ())

    def num_groups(self, k: int) -> int:
        return -(-k // SUPER_BLOCK)

    def param_shapes(self, shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        n, k = shape
        kp = self.num_groups(k) * SUPER_BLOCK  # padded to whole super-blocks (a GGUF row always is one)
        shapes = [(n, kp // 8)]
        if self.high_bits:
            shapes.append((n, kp * self.high_bits // 32))
        shapes += [(n, kp // 64), (n, kp // SUPER_BLOCK)]
        if self.has_min:
            shapes.append((n, kp // SUPER_BLOCK))
        return tuple(shapes)

    def param_dtypes(self, scale_dtype: str = "float16") -> tuple[str, ...]:
        return tuple(scale_dtype if s in ("q_scale", "q_min") else "uint32" for s in self.suffixes)

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        """Stored bits per weight: code, sub-block scale (and min) bytes, fp16 d (and dmin) per super-block
        (4.625 for Q4_K: llama.cpp's 4.5 plus the 2 bits per 6-bit scale and min kept as bytes)."""
        sub = 8 * (2 if self.has_min else 1) / self.sub_block
        return self.bits + sub + scale_bits * (2 if self.has_min else 1) / SUPER_BLOCK


Layout = GroupLayout | KQuantLayout

# llama.cpp's block types (ggml-common.h), repacked losslessly (gguf_blocks.py): a block is 32 weights with an
# fp16 scale d; Q4_0: d * (q - 8); Q4_1: d * q + m (fp16 min m); Q8_0: d * q with q int8, stored + 128
GGUF_BLOCK_LAYOUTS: dict[str, GroupLayout] = {
    "q4_0": GroupLayout(4, 32, "uint32", zero_point=8),
    "q4_1": GroupLayout(4, 32, "uint32", zero_point=0, has_min=True),
    "q8_0": GroupLayout(8, 32, "uint32", zero_point=128),
    "q4_k": KQuantLayout(4, 32, has_min=True),
    "q5_k": KQuantLayout(5, 32, has_min=True),
    "q6_k": KQuantLayout(6, 16, has_min=False),
}
# the Linears of one decoder layer, as the scheme names them in per-tensor exceptions
LINEAR_KINDS = {
    "qkv": "self_attn.qkv_proj",
    "o": "self_attn.o_proj",
    "gateup": "mlp.gate_up_proj",
    "down": "mlp.down_proj",
}
_LAYER_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)\.weight")
_KIND_OF = {v: k for k, v in LINEAR_KINDS.items()}
# a role of a gguf scheme kept unquantized, in the model dtype (norms always are): spelled by that dtype
GGUF_PLAIN = "f16"
GGUF_PLAIN_F32 = "f32"
# the name suffix of the fp32 twin of a gguf scheme (as MLC's q4f32_1 is q4f16_1's)
GGUF_F32_SUFFIX = "_f32"
_PLAIN = {"float16": GGUF_PLAIN, "float32": GGUF_PLAIN_F32}
ROLES = ("linear", "embedding", "head")


@dataclass(frozen=True)
class QuantScheme:
    name: str
    kind: Literal["none", "group", "gguf"]
    # dtype of activations and of every float parameter (norm weights, unquantized weights, scales)
    model_dtype: Literal["float16", "float32"]
    bits: int = 4
    group_size: int = 32
    storage: str = "uint32"
    quantize_embedding: bool = True
    quantize_final_fc: bool = True
    # gguf schemes: GGUF block type of the layers' Linears, the embedding and the lm_head (GGUF_PLAIN = kept
    # in the model dtype); the embedding also serves a tied lm_head
    gguf_blocks: tuple[str, str, str] | None = None
    # gguf schemes: Linears whose block type differs from gguf_blocks[0] (a llama.cpp "_M" mix), as
    # (kind in LINEAR_KINDS, block type, bit mask of layers; 0 = every layer)
    gguf_overrides: tuple[tuple[str, str, int], ...] = ()
    # derived from bits / group_size / storage in __post_init__ (validated there)
    layout: Layout = field(init=False, repr=False)
    elems_per_word: int = field(init=False, repr=False)
    max_int: int = field(init=False, repr=False)  # a code c dequantizes to (c - max_int) * scale

    def __post_init__(self) -> None:
        if self.kind == "gguf":
            if self.gguf_blocks is None or self.gguf_blocks[0] not in GGUF_BLOCK_LAYOUTS:
                raise ValueError(f"gguf scheme {self.name} needs a block type for its Linears")
            layout = GGUF_BLOCK_LAYOUTS[self.gguf_blocks[0]]
            object.__setattr__(self, "bits", layout.bits)
            object.__setattr__(self, "group_size", layout.group_size)
            object.__setattr__(self, "storage", layout.storage)
        else:
            layout = GroupLayout(self.bits, self.group_size, self.storage)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "elems_per_word", layout.elems_per_word)
        object.__setattr__(self, "max_int", getattr(layout, "max_int", layout.zero_point))

    @property
    def is_quantized(self) -> bool:
        return self.kind in ("group", "gguf")

    @property
    def scale_dtype(self) -> str:
        """MLC stores scales in the model dtype (fp16 for q4f16_1, fp32 for q4f32_1); GGUF blocks hold fp16,
        and an fp32 gguf scheme keeps those bits as uint16 (widened exactly in its kernels, `tvm_layers`)."""
        if self.kind == "gguf":
            return "float16" if self.model_dtype == "float16" else "uint16"
        return self.model_dtype

    def layout_for(self, role: str) -> Layout | None:
        """Storage layout of the Linears ("linear"), the token embedding ("embedding") or an untied lm_head
        ("head"); None: that weight is stored unquantized in the model dtype."""
        if role not in ROLES:
            raise ValueError(f"unknown weight role {role!r}; known: {', '.join(ROLES)}")
        if self.kind == "gguf":
            return GGUF_BLOCK_LAYOUTS.get(self.gguf_blocks[ROLES.index(role)])
        if not self.is_quantized:
            return None
        if role == "embedding" and not self.quantize_embedding:
            return None
        if role == "head" and not self.quantize_final_fc:
            return None
        return self.layout

    def block_type(self, role: str) -> str | None:
        """The GGUF block type of `role` in a gguf scheme (None: unquantized, or not a gguf scheme)."""
        if self.kind != "gguf" or self.layout_for(role) is None:
            return None
        return self.gguf_blocks[ROLES.index(role)]

    def weight_block_type(self, name: str) -> str | None:
        """The GGUF block type of Hugging Face weight `name` (its role's, or a per-tensor exception's);
        None: stored unquantized, or not a gguf scheme."""
        if self.kind != "gguf":
            return None
        role = weight_role(name)
        t = self.gguf_blocks[ROLES.index(role)]
        m = _LAYER_WEIGHT.fullmatch(name) if role == "linear" and self.gguf_overrides else None
        kind = _KIND_OF.get(m.group(2)) if m else None
        for k, block, mask in self.gguf_overrides:
            if k == kind and (mask == 0 or mask >> int(m.group(1)) & 1):
                t = block
        return t if t in GGUF_BLOCK_LAYOUTS else None

    def layout_for_weight(self, name: str) -> Layout | None:
        """Storage layout of Hugging Face weight `name` (per-tensor exceptions of a gguf mix included)."""
        if self.kind == "gguf":
            t = self.weight_block_type(name)
            return GGUF_BLOCK_LAYOUTS[t] if t else None
        return self.layout_for(weight_role(name))

    def bits_per_weight(self) -> float:
        """Storage cost of one quantized Linear weight, scale (and min) included (4.5 for q4f16_1, 5 for
        gguf_q4_1)."""
        if not self.is_quantized:
            return 16.0 if self.model_dtype == "float16" else 32.0
        return self.layout.bits_per_weight(16 if self.scale_dtype in ("float16", "uint16") else 32)

    def check_widths(self, cfg) -> None:
        """UserError when a weight of the Phi3Config `cfg` has a row length (K) that is not a whole number of
        its GGUF blocks: llama.cpp's blocks have no padding, and a K-quant's super-block is 256 weights
        (SmolLM2's 576 wide rows are not). Group schemes pad K and fit any model."""
        if self.kind != "gguf":
            return
        h, o = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        widths = {"qkv": h, "o": o, "gateup": h, "down": cfg.intermediate_size}
        names = {"model.embed_tokens.weight": h, "lm_head.weight": h}
        for i in range(cfg.num_hidden_layers):
            names.update({f"model.layers.{i}.{LINEAR_KINDS[k]}.weight": w for k, w in widths.items()})
        for name, width in names.items():
            block = self.weight_block_type(name)
            size = GGUF_BLOCK_LAYOUTS[block].group_size if block else 1
            if width % size:
                raise UserError(
                    f"quantization {self.name}: {name} has rows of {width} weights, not a whole number of "
                    f"{block.upper()}'s {size}-weight blocks (GGUF blocks have no padding); use a scheme "
                    "whose blocks fit, such as q4f16_1 or gguf_q4_0"
                )

    def max_layer(self) -> int:
        """Highest layer index a per-tensor exception names (-1: none); a model needs more layers."""
        return max((mask.bit_length() - 1 for _, _, mask in self.gguf_overrides), default=-1)


def _group(name: str, model_dtype: Literal["float16", "float32"]) -> QuantScheme:
    return QuantScheme(name=name, kind="group", model_dtype=model_dtype)


GGUF_PREFIX = "gguf_"


def gguf_scheme_name(
    linear: str,
    embedding: str | None = None,
    head: str | None = None,
    overrides: tuple[tuple[str, str, int], ...] = (),
    model_dtype: str = "float16",
) -> str:
    """`gguf_<linear>[-<embedding>[-<head>]][-<kind>_<type>[_l<hex layer mask>]...][_f32]`: block types per
    role (embedding defaults to the Linears', head to the embedding's), then the Linears of kind `kind` (qkv,
    o, gateup, down) that are in another type, in the layers of the mask (none: every layer); e.g.
    `gguf_q4_1-q8_0` = Q4_1 layers, Q8_0 embedding and (tied) lm_head; `gguf_q4_k-q4_k-q6_k-down_q6_k_l3`:
    Q4_K but a Q6_K lm_head and Q6_K down_proj in layers 0 and 1. `_f32`: the fp32 twin (`model_dtype`
    float32), whose unquantized roles are spelled `f32` (`f16` is accepted for them and respelled)."""
    plain = _PLAIN[model_dtype]
    linear, embedding, head = (
        plain if t in (GGUF_PLAIN, GGUF_PLAIN_F32) else t for t in (linear, embedding, head)
    )
    overrides = tuple((k, plain if t in (GGUF_PLAIN, GGUF_PLAIN_F32) else t, m) for k, t, m in overrides)
    embedding = embedding or linear
    head = head or embedding
    if head != embedding:
        parts = [linear, embedding, head]
    else:
        parts = [linear, embedding] if embedding != linear else [linear]
    kinds = list(LINEAR_KINDS)
    for kind, block, mask in sorted(overrides, key=lambda o: (kinds.index(o[0]), o[1], o[2])):
        parts.append(f"{kind}_{block}" + (f"_l{mask:x}" if mask else ""))
    return GGUF_PREFIX + "-".join(parts) + (GGUF_F32_SUFFIX if model_dtype == "float32" else "")


_OVERRIDE = re.compile(r"(qkv|o|gateup|down)_(q\d_[0-9k]|f16|f32)(?:_l([0-9a-f]+))?")


def _parse_gguf(name: str) -> QuantScheme | None:
    if not name.startswith(GGUF_PREFIX):
        return None
    # a mask is `_l<hex>`, so a name ending in `_f32` is the fp32 twin, never a mask or a block type
    model_dtype = "float32" if name.endswith(GGUF_F32_SUFFIX) else "float16"
    body = name[len(GGUF_PREFIX) : len(name) - (len(GGUF_F32_SUFFIX) if model_dtype == "float32" else 0)]
    parts = body.split("-")
    allowed = (*GGUF_BLOCK_LAYOUTS, _PLAIN[model_dtype])
    n_roles = next((i for i, p in enumerate(parts) if p not in allowed), len(parts))
    roles, rest = parts[:n_roles], parts[n_roles:]
    if not 1 <= len(roles) <= 3 or roles[0] not in GGUF_BLOCK_LAYOUTS:
        return None
    overrides = []
    for part in rest:
        m = _OVERRIDE.fullmatch(part)
        if m is None or m.group(2) not in allowed or m.group(2) == roles[0]:
            return None
        overrides.append((m.group(1), m.group(2), int(m.group(3), 16) if m.group(3) else 0))
    covered: dict[str, int] = {}
    for kind, _, mask in overrides:  # an exception per layer and kind at most; "every layer" stands alone
        seen = covered.get(kind)
        if seen is not None and (mask == 0 or seen == 0 or seen & mask):
            return None
        covered[kind] = (seen or 0) | mask
    # the plain role is stored as GGUF_PLAIN internally whatever its dtype (layout_for: no layout)
    blocks = tuple(GGUF_PLAIN if b == GGUF_PLAIN_F32 else b for b in (roles + [roles[-1]] * 2)[:3])
    overrides = [(k, GGUF_PLAIN if t == GGUF_PLAIN_F32 else t, m) for k, t, m in overrides]
    canonical = gguf_scheme_name(*blocks, overrides=tuple(overrides), model_dtype=model_dtype)
    if canonical != name:
        return None
    # float16 like q4f16_1: GPUs compute in it, the host in fp32 (fp16 scales are exact there); the `_f32`
    # twin computes in fp32 everywhere (like q4f32_1), for devices without fp16
    return QuantScheme(
        name=name,
        kind="gguf",
        model_dtype=model_dtype,
        gguf_blocks=blocks,
        gguf_overrides=tuple(overrides),
    )


QUANTIZATIONS: dict[str, QuantScheme] = {
    "q0f32": QuantScheme(name="q0f32", kind="none", model_dtype="float32"),
    "q0f16": QuantScheme(name="q0f16", kind="none", model_dtype="float16"),
    "q4f16_1": _group("q4f16_1", "float16"),
    "q4f32_1": _group("q4f32_1", "float32"),
    **{s.name: s for s in (_parse_gguf(GGUF_PREFIX + t) for t in GGUF_BLOCK_LAYOUTS)},
}
GGUF_NAME_HELP = (
    f"{GGUF_PREFIX}<linear>[-<embedding>[-<head>]][-<qkv|o|gateup|down>_<type>[_l<hex layers>]...]"
    f"[{GGUF_F32_SUFFIX}] with types {', '.join(GGUF_BLOCK_LAYOUTS)}"
)

# MLC's q4*_1 storage layout (4-bit codes, groups of 32, 8 per uint32): what checkpoints in the registry
# use, and the one layout the hand-written host kernels are built for
MLC_Q4_LAYOUT: GroupLayout = QUANTIZATIONS["q4f16_1"].layout


def weight_role(name: str) -> str:
    """The role (see `QuantScheme.layout_for`) of Hugging Face weight `name`."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    return "head" if name == "lm_head.weight" else "linear"


# what a checkpoint runs in unless asked (MLC's default for phones too). A GGUF too: its own blocks
# (`phi3 convert` keeps them, `native_quantization`) are one `-q` away; Q6_K blocks still run the host's
# generic schedules (several times slower decode than the int8 kernels the other GGUF blocks get)
DEFAULT_QUANTIZATION = "q4f16_1"


def quantization_for(source, requested: str | None, *, keep_native: bool = False) -> str:
    """The scheme a command uses for `source`: the one asked for, else a converted folder's own, else (when
    `keep_native`, i.e. `convert`) a GGUF's own blocks, else DEFAULT_QUANTIZATION."""
    if getattr(source, "kind", None) == "mlc" and not requested:
        return source.scheme.name
    name = requested or (native_quantization(source) if keep_native else None) or DEFAULT_QUANTIZATION
    get_scheme(name).check_widths(source.config)  # before anything is converted or compiled
    return name


def native_quantization(source, model_dtype: str = "float16") -> str | None:
    """The gguf scheme that keeps a GGUF source's weights as stored (`gguf_q4_1-q8_0` for the embedded
    SmolLM2: Q4_1 layers, Q8_0 embedding; a Q4_K_M Phi-3 names its Q5_K / Q6_K Linears per kind and layer),
    or None: not a GGUF, or a Linear is not in a block type we have (or is fused from parts of different
    types). An embedding or lm_head in a type we lack is kept in the model dtype (f16). `model_dtype`
    float32 gives the `_f32` twin (for devices without fp16)."""
    if getattr(source, "kind", None) != "gguf":
        return None
    by_role: dict[str, set] = {r: set() for r in ROLES}
    linear: dict[str, str] = {}  # HF name -> block type
    for name in source.tensor_names():
        if len(source.tensor_shape(name)) == 2:
            t = source.tensor_type(name)
            t = t.lower() if t else None
            role = weight_role(name)
            by_role[role].add(t)
            if role == "linear":
                if t not in GGUF_BLOCK_LAYOUTS:
                    return None
                linear[name] = t
    if not linear:
        return None
    counts: dict[str, int] = {}
    for t in linear.values():
        counts[t] = counts.get(t, 0) + 1
    default = max(sorted(counts), key=lambda t: counts[t])  # the most common type, the rest are exceptions
    masks: dict[tuple[str, str], int] = {}
    n_layers: set[int] = set()
    for name, t in linear.items():
        m = _LAYER_WEIGHT.fullmatch(name)
        kind = _KIND_OF.get(m.group(2)) if m else None
        if kind is None:
            if t != default:
                return None  # a Linear the scheme cannot name
            continue
        layer = int(m.group(1))
        n_layers.add(layer)
        if t != default:
            masks[(kind, t)] = masks.get((kind, t), 0) | (1 << layer)
    every = (1 << len(n_layers)) - 1
    overrides = tuple((k, t, 0 if mask == every else mask) for (k, t), mask in masks.items())

    def kept(types: set) -> str | None:
        (t,) = types or {None}
        return t if t in GGUF_BLOCK_LAYOUTS else GGUF_PLAIN

    embedding = kept(by_role["embedding"])
    head = kept(by_role["head"]) if by_role["head"] else embedding  # tied: the embedding is the head
    return gguf_scheme_name(default, embedding, head, overrides, model_dtype=model_dtype)


def fp32_twin(name: str) -> str | None:
    """The fp32-activation scheme with the same weights storage as fp16 scheme `name` (q4f16_1 -> q4f32_1,
    q0f16 -> q0f32, gguf_X -> gguf_X_f32), for a device without fp16; None when `name` is not fp16."""
    scheme = get_scheme(name)
    if scheme.model_dtype != "float16":
        return None
    if scheme.kind == "gguf":
        return gguf_scheme_name(*scheme.gguf_blocks, overrides=scheme.gguf_overrides, model_dtype="float32")
    twin = name.replace("f16", "f32")
    return twin if twin in QUANTIZATIONS else None


def get_scheme(name: str | QuantScheme) -> QuantScheme:
    """Look a scheme up by name (a QuantScheme passes through)."""
    if isinstance(name, QuantScheme):
        return name
    scheme = QUANTIZATIONS.get(name) or _parse_gguf(str(name))
    if scheme is None:
        raise UserError(
            f"unknown quantization {name!r}; known: {', '.join(QUANTIZATIONS)}, or {GGUF_NAME_HELP} "
            f"({GGUF_PLAIN}, or {GGUF_PLAIN_F32} with {GGUF_F32_SUFFIX}: unquantized)"
        )
    return scheme


__all__ = [
    "GGUF_BLOCK_LAYOUTS",
    "MLC_Q4_LAYOUT",
    "QUANTIZATIONS",
    "GroupLayout",
    "KQuantLayout",
    "Layout",
    "QuantScheme",
    "fp32_twin",
    "get_scheme",
    "gguf_scheme_name",
    "native_quantization",
    "quantization_for",
    "DEFAULT_QUANTIZATION",
    "weight_role",
]
