"""The one table between Hugging Face Phi-3 tensor names and llama.cpp's GGUF names, both directions.

The GGUF reader (`gguf_source`) asks which GGUF tensors make one of our tensors; the exporter
(`gguf_export`) asks the GGUF name of each of ours; `hf_name` answers the reverse. llama.cpp's `phi3`
architecture keeps Phi-3's fused tensors (`attn_qkv`, `ffn_up` holding the gate rows first); its `llama`
architecture (Phi-3 GGUFs converted as llama) splits them into q/k/v and gate/up, in that order.
"""

from __future__ import annotations

import re

# per-layer tensors: HF suffix -> the GGUF suffixes (under `blk.<i>.`) per architecture, in fused order
_LAYER: dict[str, dict[str, tuple[str, ...]]] = {
    "input_layernorm.weight": {"phi3": ("attn_norm.weight",)},
    "self_attn.qkv_proj.weight": {
        "phi3": ("attn_qkv.weight",),
        "llama": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    },
    "self_attn.o_proj.weight": {"phi3": ("attn_output.weight",)},
    "post_attention_layernorm.weight": {"phi3": ("ffn_norm.weight",)},
    # gate rows first, as llama.cpp's fused SwiGLU expects
    "mlp.gate_up_proj.weight": {"phi3": ("ffn_up.weight",), "llama": ("ffn_gate.weight", "ffn_up.weight")},
    "mlp.down_proj.weight": {"phi3": ("ffn_down.weight",)},
}
_GLOBAL: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# the longrope factors: global GGUF tensors with no HF tensor of their own (they come from config.json)
ROPE_FACTOR_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
ARCHITECTURES = ("phi3", "llama")

_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_names(hf_name: str, arch: str = "phi3") -> tuple[str, ...]:
    """The GGUF tensors holding HF tensor `hf_name`, in the order they concatenate along rows
    (`model.layers.3.mlp.down_proj.weight` -> `blk.3.ffn_down.weight`). KeyError for a name with none."""
    if arch not in ARCHITECTURES:
        raise KeyError(f"no GGUF names for architecture {arch!r}")
    if hf_name in _GLOBAL:
        return (_GLOBAL[hf_name],)
    m = _HF_LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER:
        per_arch = _LAYER[m.group(2)]
        return tuple(f"blk.{m.group(1)}.{g}" for g in per_arch.get(arch, per_arch["phi3"]))
    raise KeyError(f"no GGUF name for tensor {hf_name!r}")


def gguf_tensor_name(hf_name: str) -> str:
    """The llama.cpp `phi3` name of HF tensor `hf_name` (one GGUF tensor per HF tensor there)."""
    (name,) = gguf_names(hf_name, "phi3")
    return name


_GLOBAL_REVERSE = {g: h for h, g in _GLOBAL.items()}
_LAYER_REVERSE = {
    (arch, g): (hf, i)
    for hf, per_arch in _LAYER.items()
    for arch, gs in per_arch.items()
    for i, g in enumerate(gs)
}


def hf_name(gguf_name: str, arch: str = "phi3") -> tuple[str, int]:
    """(HF tensor, index of this part among its GGUF tensors) for a GGUF tensor of `arch`
    (`blk.3.attn_k.weight` in a llama GGUF -> (`model.layers.3.self_attn.qkv_proj.weight`, 1)).
    KeyError for a GGUF tensor with no HF counterpart (e.g. the rope factors)."""
    if gguf_name in _GLOBAL_REVERSE:
        return _GLOBAL_REVERSE[gguf_name], 0
    m = _GGUF_LAYER_RE.match(gguf_name)
    if m:
        hit = _LAYER_REVERSE.get((arch, m.group(2)))
        if hit is None and (arch, m.group(2)) not in _LAYER_REVERSE:
            hit = _LAYER_REVERSE.get(("phi3", m.group(2)))
            # a suffix only the phi3 table has, and that arch does not override for this tensor
            if hit is not None and arch in _LAYER[hit[0]]:
                hit = None
        if hit is not None:
            return f"model.layers.{m.group(1)}.{hit[0]}", hit[1]
    raise KeyError(f"no Hugging Face name for GGUF tensor {gguf_name!r} ({arch})")
