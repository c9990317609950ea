"""The in-place logit processors MLC-LLM's engine calls on the logits before the softmax.

Interface taken from mlc-ai/mlc-llm at commit 79d603f085f50500e9509fa01785ffa7ecfaaa93
(cpp/serve/logit_processor.cc calls them; python/mlc_llm/compiler_pass/attach_logit_processor.py names them);
the kernels are our own. They are PrimFuncs the engine finds in the library's imports
(`GetFunction(name, query_imports=true)`), called with device arrays and no return value:

- `apply_logit_bias_inplace(logits f32[b, v], pos2seq_id i32[n], token_ids i32[n], logit_bias f32[n])`:
  logits[pos2seq_id[i], token_ids[i]] += logit_bias[i]
- `apply_penalty_inplace(logits f32[b, v], seq_ids i32[s], pos2seq_id i32[n], token_ids i32[n],
  token_cnt i32[n], penalties f32[s, 3])`: with (presence, frequency, repetition) = penalties[pos2seq_id[i]]
  and x = logits[seq_ids[pos2seq_id[i]], token_ids[i]]: x -= presence + cnt * frequency, then x *= repetition
  when x < 0 else x /= repetition
- `apply_bitmask_inplace(logits f32[b, v], seq_ids i32[s], bitmask i32[b, ceil(v / 32)])`: for each listed
  row, token t keeps its logit when bit t % 32 of word t // 32 is set, else becomes the lowest float32

The engine lists each (row, token) pair once, so the GPU variants (one thread per pair) never write a logit
twice. GPU variants come pre-scheduled (thread-bound, marked `tirx.is_scheduled` so dlight leaves them alone);
the llvm ones are plain loops: they touch a handful of logits per token.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from ..kernel_memo import memo_kernel

NAMES = ("apply_logit_bias_inplace", "apply_penalty_inplace", "apply_bitmask_inplace")


def max_threads(target: tvm.target.Target, cap: int = 1024) -> int:
    """Threads per block the target allows (both TVM attribute spellings; the presets set either)."""
    limits = [cap]
    for key in ("max_num_threads", "max_threads_per_block"):
        value = target.attrs.get(key) if target.attrs else None
        if value is not None:
            limits.append(int(value))
    return min(limits)


def _attrs(name: str) -> dict:
    return {"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True}


@memo_kernel
def logit_bias(tx: int | None) -> tirx.PrimFunc:
    """tx None: serial loop (llvm); else one thread per (row, token) pair, blocks of tx threads."""
    if tx is None:

        @T.prim_func(s_tir=True)
        def cpu(var_logits: T.handle, var_pos2seq: T.handle, var_tokens: T.handle, var_bias: T.handle):
            T.func_attr(_attrs("apply_logit_bias_inplace"))
            b, v, n = T.int32(), T.int32(), T.int32()
            logits = T.match_buffer(var_logits, (b, v), "float32")
            pos2seq = T.match_buffer(var_pos2seq, (n,), "int32")
            tokens = T.match_buffer(var_tokens, (n,), "int32")
            bias = T.match_buffer(var_bias, (n,), "float32")
            for i in range(n):
                logits[pos2seq[i], tokens[i]] = logits[pos2seq[i], tokens[i]] + bias[i]

        return cpu

    @T.prim_func(s_tir=True)
    def gpu(var_logits: T.handle, var_pos2seq: T.handle, var_tokens: T.handle, var_bias: T.handle):
        T.func_attr(_attrs("apply_logit_bias_inplace"))
        b, v, n = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (b, v), "float32")
        pos2seq = T.match_buffer(var_pos2seq, (n,), "int32")
        tokens = T.match_buffer(var_tokens, (n,), "int32")
        bias = T.match_buffer(var_bias, (n,), "float32")
        for bx in T.thread_binding((n + tx - 1) // tx, thread="blockIdx.x"):
            for t in T.thread_binding(tx, thread="threadIdx.x"):
                with T.sblock("bias"):
                    i = T.axis.spatial(n, bx * tx + t)
                    T.where(bx * tx + t < n)
                    logits[pos2seq[i], tokens[i]] = logits[pos2seq[i], tokens[i]] + bias[i]

    return gpu


def _penalised(x, presence, frequency, repetition, count):
    shifted = x - (presence + T.Cast("float32", count) * frequency)
    return T.if_then_else(shifted < T.float32(0), shifted * repetition, shifted / repetition)


@memo_kernel
def penalty(tx: int | None) -> tirx.PrimFunc:
    if tx is None:

        @T.prim_func(s_tir=True)
        def cpu(
            var_logits: T.handle,
            var_seq_ids: T.handle,
            var_pos2seq: T.handle,
            var_tokens: T.handle,
            var_counts: T.handle,
            var_penalties: T.handle,
        ):
            T.func_attr(_attrs("apply_penalty_inplace"))
            b, v, n, s = T.int32(), T.int32(), T.int32(), T.int32()
            logits = T.match_buffer(var_logits, (b, v), "float32")
            seq_ids = T.match_buffer(var_seq_ids, (s,), "int32")
            pos2seq = T.match_buffer(var_pos2seq, (n,), "int32")
            tokens = T.match_buffer(var_tokens, (n,), "int32")
            counts = T.match_buffer(var_counts, (n,), "int32")
            penalties = T.match_buffer(var_penalties, (s, 3), "float32")
            for i in range(n):
                logits[seq_ids[pos2seq[i]], tokens[i]] = _penalised(
                    logits[seq_ids[pos2seq[i]], tokens[i]],
                    penalties[pos2seq[i], 0],
                    penalties[pos2seq[i], 1],
                    penalties[pos2seq[i], 2],
                    counts[i],
                )

        return cpu

    @T.prim_func(s_tir=True)
    def gpu(
        var_logits: T.handle,
        var_seq_ids: T.handle,
        var_pos2seq: T.handle,
        var_tokens: T.handle,
        var_counts: T.handle,
        var_penalties: T.handle,
    ):
        T.func_attr(_attrs("apply_penalty_inplace"))
        b, v, n, s = T.int32(), T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (b, v), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (s,), "int32")
        pos2seq = T.match_buffer(var_pos2seq, (n,), "int32")
        tokens = T.match_buffer(var_tokens, (n,), "int32")
        counts = T.match_buffer(var_counts, (n,), "int32")
        penalties = T.match_buffer(var_penalties, (s, 3), "float32")
        for bx in T.thread_binding((n + tx - 1) // tx, thread="blockIdx.x"):
            for t in T.thread_binding(tx, thread="threadIdx.x"):
                with T.sblock("penalty"):
                    i = T.axis.spatial(n, bx * tx + t)
                    T.where(bx * tx + t < n)
                    logits[seq_ids[pos2seq[i]], tokens[i]] = _penalised(
                        logits[seq_ids[pos2seq[i]], tokens[i]],
                        penalties[pos2seq[i], 0],
                        penalties[pos2seq[i], 1],
                        penalties[pos2seq[i], 2],
                        counts[i],
                    )

    return gpu


def _masked(x, word, bit):
    return T.if_then_else(T.bitwise_and(T.shift_right(word, bit), 1) == 1, x, T.min_value("float32"))


@memo_kernel
def bitmask(tx: int | None) -> tirx.PrimFunc:
    if tx is None:

        @T.prim_func(s_tir=True)
        def cpu(var_logits: T.handle, var_seq_ids: T.handle, var_bitmask: T.handle):
            T.func_attr(_attrs("apply_bitmask_inplace"))
            b, v, s = T.int32(), T.int32(), T.int32()
            logits = T.match_buffer(var_logits, (b, v), "float32")
            seq_ids = T.match_buffer(var_seq_ids, (s,), "int32")
            mask = T.match_buffer(var_bitmask, (b, (v + 31) // 32), "int32")
            for i, j in T.grid(s, v):
                logits[seq_ids[i], j] = _masked(logits[seq_ids[i], j], mask[seq_ids[i], j // 32], j % 32)

        return cpu

    @T.prim_func(s_tir=True)
    def gpu(var_logits: T.handle, var_seq_ids: T.handle, var_bitmask: T.handle):
        T.func_attr(_attrs("apply_bitmask_inplace"))
        b, v, s = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (b, v), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (s,), "int32")
        mask = T.match_buffer(var_bitmask, (b, (v + 31) // 32), "int32")
        # one block row of tokens per listed sequence: no division by the vocabulary size per thread
        for row in T.thread_binding(s, thread="blockIdx.y"):
            for bx in T.thread_binding((v + tx - 1) // tx, thread="blockIdx.x"):
                for t in T.thread_binding(tx, thread="threadIdx.x"):
                    with T.sblock("mask"):
                        i = T.axis.spatial(s, row)
                        j = T.axis.spatial(v, bx * tx + t)
                        T.where(bx * tx + t < v)
                        logits[seq_ids[i], j] = _masked(
                            logits[seq_ids[i], j], mask[seq_ids[i], j // 32], j % 32
                        )

    return gpu


def logit_processors(target: tvm.target.Target) -> dict[str, tirx.PrimFunc]:
    """name -> PrimFunc for the target: plain loops on llvm, thread-bound kernels on GPUs."""
    tx = None if target.kind.name in ("llvm", "c") else max_threads(target)
    return {
        "apply_logit_bias_inplace": logit_bias(tx),
        "apply_penalty_inplace": penalty(tx),
        "apply_bitmask_inplace": bitmask(tx),
    }
