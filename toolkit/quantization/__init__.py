"""Weight quantization schemes, as plain data (one registry, MLC-LLM's names and storage layout).

`q4f16_1` / `q4f32_1` are MLC-LLM's group quantization with the NK ("_1") layout: 4-bit codes in groups of 32
consecutive input (K) elements, one scale per group, eight codes per uint32. `q0*` means no quantization.
The storage layout (bits, group size, codes per word, zero point) is derived once, in `GroupLayout`, and
every user (numpy quantizer, TVM layers, host kernel matchers) reads it from the scheme.
The numerics live in `group_quant.py`, the TVM modules in `tvm_layers.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError

_STORAGE_BITS = {"uint8": 8, "uint16": 16, "uint32": 32}


@dataclass(frozen=True)
class GroupLayout:
    """How group-quantized codes are stored: `bits`-bit codes, `group_size` consecutive K elements share a
    scale, `elems_per_word` codes per `storage` word (element k at bits [bits*(k % epw), ...), lowest first),
    and a code c stands for (c - max_int) * scale. The derived fields follow MLC-LLM's GroupQuantize."""

    bits: int = 4
    group_size: int = 32
    storage: str = "uint32"
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


@dataclass(frozen=True)
class QuantScheme:
    name: str
    kind: Literal["none", "group"]
    # dtype of activations and of every float parameter (norm weights, unquantized weights, scales)
    model_dtype: Literal["float16", "float32"]
    bits: int = 4
    group_size: int = 32
    storage: str = "uint32"
    quantize_embedding: bool = True
    quantize_final_fc: bool = True
    # derived from bits / group_size / storage in __post_init__ (validated there)
    layout: GroupLayout = field(init=False, repr=False)
    elems_per_word: int = field(init=False, repr=False)
    max_int: int = field(init=False, repr=False)  # a code c dequantizes to (c - max_int) * scale

    def __post_init__(self) -> None:
        layout = GroupLayout(self.bits, self.group_size, self.storage)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "elems_per_word", layout.elems_per_word)
        object.__setattr__(self, "max_int", layout.max_int)

    @property
    def is_quantized(self) -> bool:
        return self.kind == "group"

    @property
    def scale_dtype(self) -> str:
        # MLC stores scales in the model dtype (fp16 for q4f16_1, fp32 for q4f32_1)
        return self.model_dtype

    def bits_per_weight(self) -> float:
        """Storage cost of one quantized weight, scale included (4.5 for q4f16_1)."""
        if not self.is_quantized:
            return 16.0 if self.model_dtype == "float16" else 32.0
        scale_bits = 16 if self.scale_dtype == "float16" else 32
        return self.bits + scale_bits / self.group_size


def _group(name: str, model_dtype: Literal["float16", "float32"]) -> QuantScheme:
    return QuantScheme(name=name, kind="group", model_dtype=model_dtype)


QUANTIZATIONS: dict[str, QuantScheme] = {
    "q0f32": QuantScheme(name="q0f32", kind="none", model_dtype="float32"),
    "q0f16": QuantScheme(name="q0f16", kind="none", model_dtype="float16"),
    "q4f16_1": _group("q4f16_1", "float16"),
    "q4f32_1": _group("q4f32_1", "float32"),
}

# MLC's q4*_1 storage layout (4-bit codes, groups of 32, 8 per uint32): what checkpoints in the registry
# use, and the one layout the hand-written host kernels are built for
MLC_Q4_LAYOUT: GroupLayout = QUANTIZATIONS["q4f16_1"].layout


def get_scheme(name: str | QuantScheme) -> QuantScheme:
    """Look a scheme up by name (a QuantScheme passes through)."""
    if isinstance(name, QuantScheme):
        return name
    scheme = QUANTIZATIONS.get(name)
    if scheme is None:
        raise UserError(f"unknown quantization {name!r}; known: {', '.join(QUANTIZATIONS)}")
    return scheme


__all__ = ["MLC_Q4_LAYOUT", "QUANTIZATIONS", "GroupLayout", "QuantScheme", "get_scheme"]
