"""`adjust_logits(logits f32[b, v], pairs i32[4, n], values f32[n + 3 b])`: the host sampler's logit bias,
repetition, frequency and presence penalties (runtime/sampling.py `TokenSampler.adjust`, in its order) in
place on the device, before `sample_tokens` draws (runtime/device_sampling.py).

Pair i is logits[row, token] with pairs[:, i] = (row, token, 1 if the repetition penalty covers the token,
times the token was generated); values[i] is its bias, and values[n + 3 r :][:3] row r's repetition,
frequency and presence. For each pair: x += bias; x = x / repetition if x > 0 else x * repetition where
covered; x -= count * frequency + presence where count > 0. MLC's `apply_penalty_inplace` subtracts before
it scales and covers only generated tokens, so it can't give the host's numbers. The engine lists each
(row, token) once and packs everything in two arrays, so a step uploads two buffers (each upload waits for
the device's queue).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .logit_processor import max_threads

NAME = "adjust_logits"


def _adjusted(logits, pairs, values, n, i):
    """Pair i's logit after its change: bias, then repetition where covered, then frequency / presence where
    generated (its row's three values follow the n biases). One expression: no lets, which a GPU kernel's
    block could read before they are bound."""
    r, count = pairs[0, i], pairs[3, i]
    y = logits[r, pairs[1, i]] + values[i]
    repetition = values[n + 3 * r]
    y = T.if_then_else(pairs[2, i] != 0, T.if_then_else(y > T.float32(0), y / repetition, y * repetition), y)
    penalty = T.Cast("float32", count) * values[n + 3 * r + 1] + values[n + 3 * r + 2]
    return T.if_then_else(count > 0, y - penalty, y)


def adjust_logits(target: tvm.target.Target) -> tirx.PrimFunc:
    """Plain loop on llvm; one thread per pair on GPUs (pairs are unique: no logit is written twice)."""
    attrs = {"global_symbol": NAME, "tirx.noalias": True, "tirx.is_scheduled": True}
    if target.kind.name in ("llvm", "c"):

        @T.prim_func(s_tir=True)
        def cpu(var_logits: T.handle, var_pairs: T.handle, var_values: T.handle):
            T.func_attr(attrs)
            b, v, n = T.int32(), T.int32(), T.int32()
            logits = T.match_buffer(var_logits, (b, v), "float32")
            pairs = T.match_buffer(var_pairs, (4, n), "int32")
            values = T.match_buffer(var_values, (n + 3 * b,), "float32")
            for i in range(n):
                logits[pairs[0, i], pairs[1, i]] = _adjusted(logits, pairs, values, n, i)

        return cpu

    tx = max_threads(target)

    @T.prim_func(s_tir=True)
    def gpu(var_logits: T.handle, var_pairs: T.handle, var_values: T.handle):
        T.func_attr(attrs)
        b, v, n = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (b, v), "float32")
        pairs = T.match_buffer(var_pairs, (4, n), "int32")
        values = T.match_buffer(var_values, (n + 3 * b,), "float32")
        for bx in T.thread_binding((n + tx - 1) // tx, thread="blockIdx.x"):
            for t in T.thread_binding(tx, thread="threadIdx.x"):
                with T.sblock("adjust"):
                    i = T.axis.spatial(n, bx * tx + t)
                    T.where(bx * tx + t < n)
                    logits[pairs[0, i], pairs[1, i]] = _adjusted(logits, pairs, values, n, i)

    return gpu
