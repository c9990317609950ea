"""The GPU decode-attention swap, a module pass: TVM's paged-KV decode kernels (`batch_decode_paged_kv` and
its `_sliding_window` twin, found by global symbol) become ours (compile/gpu_decode_attention.py) under the
same global var. The compile pipeline applies it right after export (`pipeline.export_model`) on presets
whose `decode_attention` is "ours" (the graph option `gpu_decode_attention`).

Ours ignores `rotary_mode`: the KV cache passes 1 only with its sliding window enabled while it rotates
q/k itself, and our libraries never have that window enabled (checkpoint/mlc_format
`mlc_sliding_window_size` is -1, runtime/engine.py passes 0). Shapes ours does not cover (GQA, other
dtypes) keep TVM's kernel."""

from __future__ import annotations

import tvm
from tvm import IRModule, tirx

from .gpu_decode_attention import decode_attention_gpu

SYMBOLS = ("batch_decode_paged_kv", "batch_decode_paged_kv_sliding_window")  # TVM's GPU decode kernels
MARK = "phi3_decode_attention"  # attribute on the kernels this pass put in (read back by `swapped`)


def _ours(func: tirx.PrimFunc, symbol: str, max_threads: int) -> tirx.PrimFunc | None:
    if symbol not in SYMBOLS or len(func.params) != 13:
        return None
    q, pages = func.params[:2]  # buffers: q [B, H_qo, d], pages [P, 2, H_kv, page_size, d]
    if not all(isinstance(x, tirx.IntImm) for x in (*q.shape[1:], *pages.shape[1:])):
        return None
    h_qo, d = (int(x) for x in q.shape[1:])
    _, h_kv, page_size, d_kv = (int(x) for x in pages.shape[1:])
    if d_kv != d or str(pages.dtype) != str(q.dtype):
        return None
    sliding = symbol.endswith("_sliding_window")
    return decode_attention_gpu(h_kv, h_qo, d, str(q.dtype), sliding, page_size, max_threads)


def replace_decode_attention(mod: IRModule, max_threads: int) -> IRModule:
    """`mod` with TVM's GPU decode attention kernels replaced by ours (CTAs of `max_threads` threads),
    attributes kept; unchanged where none applies."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            continue
        new = _ours(func, str(func.attrs.get("global_symbol", "")), max_threads)
        if new is not None:
            attrs = dict(func.attrs.items())
            attrs.update(dict(new.attrs.items()))
            attrs[MARK] = True
            updates[gv] = new.with_attrs(attrs)
    if not updates:
        return mod
    return IRModule({gv: updates.get(gv, f) for gv, f in mod.functions.items()}, attrs=mod.attrs)


@tvm.transform.module_pass(opt_level=0, name="phi3_gpu_decode_attention")
class GPUDecodeAttention:
    """`replace_decode_attention` as a pass; the CTA size is the target's thread limit (at most 1024)."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.max_threads = min(int(target.attrs.get("max_num_threads", 1024)), 1024)

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        return replace_decode_attention(mod, self.max_threads)


def swapped(mod: IRModule) -> bool:
    """Whether `mod` runs our decode attention (this pass replaced at least one kernel)."""
    return any(
        isinstance(f, tirx.PrimFunc) and f.attrs is not None and bool(f.attrs.get(MARK, False))
        for f in mod.functions.values()
    )
