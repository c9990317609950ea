"""Weight quantization schemes, as plain data (one registry, MLC-LLM's names and storage layout).

`q4f16_1` / `q4f32_1` are MLC-LLM's group quantization with the NK ("_1") layout: 4-bit codes in groups of 32
consecutive input (K) elements, one scale per group, eight codes per uint32. `q0*` means no quantization.
The numerics live in `group_quant.py`, the TVM modules in `tvm_layers.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UserError


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

    @property
    def is_quantized(self) -> bool:
        return self.kind == "group"

    @property
    def scale_dtype(self) -> str:
        # MLC stores scales in the model dtype (fp16 for q4f16_1, fp32 for q4f32_1)
        return self.model_dtype

    @property
    def elems_per_word(self) -> int:
        return 32 // self.bits

    @property
    def max_int(self) -> int:
        """Codes are offset by this value: a code c dequantizes to (c - max_int) * scale."""
        return 2 ** (self.bits - 1) - 1

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


def get_scheme(name: str | QuantScheme) -> QuantScheme:
    """Look a scheme up by name (a QuantScheme passes through)."""
    if isinstance(name, QuantScheme):
        return name
    scheme = QUANTIZATIONS.get(name)
    if scheme is None:
        raise UserError(f"unknown quantization {name!r}; known: {', '.join(QUANTIZATIONS)}")
    return scheme


__all__ = ["QUANTIZATIONS", "QuantScheme", "get_scheme"]
