"""The `_metadata` function MLC-LLM's engine reads from a model library (`ModelMetadata::FromModule`).

Keys and their meaning as cpp/metadata/model.cc and python/mlc_llm/interface/compile.py define them at
mlc-ai/mlc-llm 79d603f085f50500e9509fa01785ffa7ecfaaa93 (required: model_type, quantization,
context_window_size, prefill_chunk_size, max_batch_size, tensor_parallel_shards, kv_cache, params,
memory_usage). `memory_usage` is, per Relax function, the bytes of the buffers memory planning allocates for
it with the symbolic sizes at their bounds, which MLC's engine subtracts from the device memory before sizing
the KV cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import IRModule, relax
from tvm.ir import Op
from tvm.relax.expr_functor import PyExprVisitor, visitor

from ..checkpoint.mlc_format import (
    MLC_MAX_BATCH_SIZE,
    default_window_sizes,
    mlc_sliding_window_size,
    model_type_of,
)
from ..config import Phi3Config

FUNC_NAME = "_metadata"


@dataclass(frozen=True)
class Limits:
    """The sizes a library is compiled for (MLC: context_window_size, prefill_chunk_size, max_batch_size)."""

    context_window_size: int
    prefill_chunk_size: int
    max_batch_size: int

    @classmethod
    def default(cls, cfg: Phi3Config) -> Limits:
        """MLC's defaults, as the weights folder's mlc-chat-config.json records them."""
        ctx, chunk = default_window_sizes(cfg, None, None)
        return cls(context_window_size=ctx, prefill_chunk_size=chunk, max_batch_size=MLC_MAX_BATCH_SIZE)


def model_metadata(
    cfg: Phi3Config, quantization: str, limits: Limits, named_params: list[tuple[str, Any]]
) -> dict[str, Any]:
    """Everything but memory_usage, which needs the compiled module (see attach_metadata)."""
    return {
        "model_type": model_type_of(cfg),
        "quantization": quantization,
        "context_window_size": limits.context_window_size,
        "sliding_window_size": mlc_sliding_window_size(cfg),
        "attention_sink_size": -1,
        "prefill_chunk_size": limits.prefill_chunk_size,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "disaggregation": False,
        "kv_state_kind": "kv_cache",
        "max_batch_size": limits.max_batch_size,
        "active_vocab_size": cfg.vocab_size,
        "model_task": "chat",
        "kv_cache": {
            "num_hidden_layers": cfg.num_hidden_layers,
            "head_dim": cfg.head_dim,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
        },
        "params": [
            {
                "name": name,
                "shape": [int(s) for s in p.shape],
                "dtype": str(p.dtype),
                "preprocs": [],
                "pipeline_stages": [0],
            }
            for name, p in named_params
        ],
    }


def variable_bounds(limits: Limits) -> dict[str, int]:
    """Upper bounds of the graph's symbolic sizes (spec names in model/phi3.py)."""
    return {
        "seq_len": limits.prefill_chunk_size,
        "batch_size": limits.max_batch_size,
    }


def memory_usage(scheduled: IRModule, target: tvm.target.Target, limits: Limits) -> dict[str, int]:
    """Bytes memory planning gives each Relax function when its symbolic sizes are at their bounds. Planned
    on a copy: the library itself keeps planning by the real sizes of each call."""
    bounds = variable_bounds(limits)
    mod = IRModule(
        {
            gv: f.with_attr("tir_var_upper_bound", bounds) if isinstance(f, relax.Function) else f
            for gv, f in scheduled.functions.items()
        },
        attrs=scheduled.attrs,
    )
    seq = tvm.transform.Sequential(
        [
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
        ]
    )
    with target:
        planned = seq(mod)
    return _StorageBytes().run(planned)


@visitor
class _StorageBytes(PyExprVisitor):
    def run(self, mod: IRModule) -> dict[str, int]:
        self._storage = Op.get("relax.memory.alloc_storage")
        out = {}
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                self.total = 0
                self.visit_expr(func)
                out[gv.name_hint] = self.total
        return out

    def visit_call_(self, call: relax.Call) -> None:
        if call.op == self._storage:
            size = call.args[0]
            if isinstance(size, relax.ShapeExpr) and all(isinstance(v, tvm.tirx.IntImm) for v in size.values):
                n = 1
                for v in size.values:
                    n *= int(v.value)
                self.total += n
        super().visit_call_(call)


def attach_metadata(mod: IRModule, metadata: dict[str, Any]) -> IRModule:
    """`mod` plus a parameterless Relax function `_metadata` returning the JSON text."""
    bb = relax.BlockBuilder()
    with bb.function(FUNC_NAME, params=[]):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(metadata, sort_keys=True)))
    out = mod.clone()
    out[FUNC_NAME] = bb.finalize()[FUNC_NAME]
    return out
