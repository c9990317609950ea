"""The host attention swap, a module pass: TVM's scalar CPU attention kernels (decode, paged prefill,
ragged prefill; found by global symbol) become ours (compile/cpu_attention.py), and so do the KV cache's
copy kernels (qkv split, page append: compile/cpu_kv_copy.py). The compile pipeline applies
it to llvm targets right after export (`pipeline.export_model`), so every path that builds a model runs it."""

from __future__ import annotations

import tvm
from tvm import IRModule, tirx

from ..config import Phi3Config
from ..model.phi3 import attention_window
from .cpu_attention import (
    AttentionKnobs,
    decode_attention_cpu,
    prefill_paged_attention_cpu,
    prefill_ragged_attention_cpu,
)
from .cpu_kv_copy import split_qkv_cpu, transpose_append_cpu
from .knobs import attention_key

SYMBOLS = ("batch_decode_paged_kv_cpu", "batch_prefill_paged_kv_cpu", "batch_prefill_ragged_kv")  # TVM's
COPIES = ("fused_rope", "tir_kv_cache_transpose_append")  # TVM's KV-cache copy kernels (cpu_kv_copy)
DEFAULT_KNOBS = AttentionKnobs()  # what the kernels were written with


def _shape(func: tirx.PrimFunc, index: int) -> list[int]:
    return [int(x) for x in func.params[index].shape if isinstance(x, tirx.IntImm)]


def _ours(
    func: tirx.PrimFunc, symbol: str, window: int, mask_window: int, knobs: AttentionKnobs
) -> tirx.PrimFunc | None:
    """Our kernel for TVM's kernel `func` (named by its global symbol), or None to keep TVM's."""
    if symbol in COPIES:
        return _copy_kernel(func, symbol)
    if not symbol.startswith(SYMBOLS):
        return None
    dtype = str(func.params[0].dtype)
    h_qo, d = _shape(func, 0)  # q: [rows, H_qo, d]
    if d % knobs.lanes:  # e.g. 16 lanes on a head of 72: 8 lanes still fit
        if d % 8:
            return None
        knobs = AttentionKnobs(8, knobs.chunk)
    if symbol.startswith("batch_decode_paged_kv_cpu"):
        _, h_kv, page_size, _ = _shape(func, 1)  # pages: [P, 2, H_kv, page_size, d]
        sliding = symbol.endswith("_sliding_window")
        mask = 0 if sliding else mask_window
        return decode_attention_cpu(h_kv, h_qo, d, dtype, sliding, page_size, mask, knobs)
    if symbol.startswith("batch_prefill_paged_kv_cpu"):
        _, h_kv, page_size, _ = _shape(func, 2)
        sliding = symbol.endswith("_sliding_window")
        mask = 0 if sliding else mask_window
        return prefill_paged_attention_cpu(h_kv, h_qo, d, dtype, sliding, page_size, window, mask, knobs)
    if symbol == "batch_prefill_ragged_kv" and len(func.params) == 14:
        h_kv, d_k = _shape(func, 2)
        h_v, d_v = _shape(func, 3)
        if (d_k, h_v, d_v) == (d, h_kv, d):
            return prefill_ragged_attention_cpu(h_kv, h_qo, d, dtype, mask_window, knobs)
    return None


def _copy_kernel(func: tirx.PrimFunc, symbol: str) -> tirx.PrimFunc | None:
    if symbol == "fused_rope" and len(func.params) == 6:
        heads, d = _shape(func, 0)  # qkv: [n, H_qo + 2 H_kv, d]
        h_qo, _ = _shape(func, 2)
        h_kv, _ = _shape(func, 3)
        if heads == h_qo + 2 * h_kv:
            return split_qkv_cpu(h_qo, h_kv, d, str(func.params[0].dtype))
    if symbol == "tir_kv_cache_transpose_append" and len(func.params) == 4:
        _, h_kv, page_size, d = _shape(func, 0)  # pages: [P, 2, H_kv, page_size, d]
        return transpose_append_cpu(h_kv, d, str(func.params[0].dtype), page_size)
    return None


def replace_attention(
    mod: IRModule,
    sliding_window_size: int,
    mask_window: int = 0,
    decode: AttentionKnobs = DEFAULT_KNOBS,
    prefill: AttentionKnobs = DEFAULT_KNOBS,
) -> IRModule:
    """`mod` with TVM's CPU attention kernels (decode, paged prefill, ragged prefill; found by global symbol)
    replaced by ours under the same global var and attributes. `sliding_window_size` is the window the
    paged prefill kernel's mask was built with; `mask_window` W > 0 makes the plain kernels apply HF's
    sliding window themselves (see the kernels). Shapes we don't cover keep TVM's kernel."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            continue
        symbol = str(func.attrs.get("global_symbol", ""))
        knobs = decode if symbol.startswith("batch_decode") else prefill
        new = _ours(func, symbol, sliding_window_size, mask_window, knobs)
        if new is not None:
            attrs = dict(func.attrs.items())
            attrs.update({"tirx.is_scheduled": True, "tirx.noalias": True})
            updates[gv] = new.with_attrs(attrs)
    if not updates:
        return mod
    return IRModule({gv: updates.get(gv, f) for gv, f in mod.functions.items()}, attrs=mod.attrs)


@tvm.transform.module_pass(opt_level=0, name="phi3_host_attention")
class HostAttention:
    """`replace_attention` as a pass (arguments as there)."""

    def __init__(
        self,
        sliding_window_size: int,
        mask_window: int = 0,
        decode: AttentionKnobs = DEFAULT_KNOBS,
        prefill: AttentionKnobs = DEFAULT_KNOBS,
    ) -> None:
        self.sliding_window_size = sliding_window_size
        self.mask_window = mask_window
        self.decode = decode
        self.prefill = prefill

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        return replace_attention(mod, self.sliding_window_size, self.mask_window, self.decode, self.prefill)


def host_attention(cfg: Phi3Config, knobs=None) -> tvm.transform.Pass:
    """The swap for a model: the window the KV cache's paged prefill kernel masks with, HF's sliding window
    inside the kernels (the cache then never rolls, so the query positions the graph reads from it stay
    absolute; RoPE is applied before the cache), kernel sizes from `knobs` (compile/knobs.Knobs, at the
    model's attention shape; None: the kernels' defaults)."""
    key = attention_key(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    sizes = {step: knobs.attention(step, key) for step in ("decode", "prefill")} if knobs else {}
    return HostAttention(attention_window(cfg), mask_window=cfg.sliding_window or 0, **sizes)
