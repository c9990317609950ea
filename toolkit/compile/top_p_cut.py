"""`top_p_cut`: the top-p (nucleus) cut of each row of probabilities, without sorting the vocabulary.

The host sampler (runtime/sampling.py `top_p_keep`) keeps the shortest prefix of the tokens ranked by
probability (ties: lower id first) whose mass reaches top_p. With c the probability of the last kept token,
that prefix is every token with p > c and, of the tokens with p == c, the first j in id order, where j is the
smallest count with mass(p > c) + j * c >= top_p. And c is the largest probability whose mass(p >= c) still
reaches top_p: mass(p >= t) only falls as t grows, and for non-negative floats it falls in the order of their
bit patterns, so 31 halvings of the bit-pattern range find c exactly, each a sum over the row. No sort (a
bitonic sort of 32064 entries is 120 launches); one kernel per step.

kernel(probs f32[b, v], params f32[3, b], kept f32[b, v]): kept = p where kept, else 0; params rows are
sample_tokens' (temperature, uniform, top_p); rows with top_p >= 1 are copied whole.

GPU: one block per row. Every barrier sits outside any data-dependent branch (WGSL's uniformity rules): the
search always takes its 31 steps and a row that keeps everything is a select at the end. llvm: the same walk
as serial loops.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .logit_processor import max_threads

TOP_P = 2  # params row (sample_tokens: temperature, uniform, top_p)
SEARCH_STEPS = 31  # halvings of [0, bits(+inf)): < 2^31 patterns
INF_BITS = 0x7F800000
_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}  # opaque: never fused


def top_p_cut(vocab: int, target: tvm.target.Target) -> tirx.PrimFunc:
    if target.kind.name in ("llvm", "c"):
        return _serial(vocab)
    return _blocked(vocab, max_threads(target))


def _ties_needed(top_p, above, c, v: int):
    """j: how many tokens with p == c complete the cut (all of them when c is 0 or top_p >= 1)."""
    need = T.ceil((top_p - above) / T.max(c, T.float32(1e-38)))
    j = T.min(T.max(need, T.float32(1)), T.float32(v))
    return T.Select((c > T.float32(0)) & (top_p < T.float32(1)), T.Cast("int32", j), v)


def _blocked(v: int, tx_n: int) -> tirx.PrimFunc:
    assert tx_n & (tx_n - 1) == 0, "the tree reduction halves the block"
    steps = tx_n.bit_length() - 1
    strided = (v + tx_n - 1) // tx_n  # k = i * tx_n + tx: coalesced sums
    chunk = strided  # k = tx * chunk + i: contiguous runs, for the id-order rank of ties

    @T.prim_func(private=True)
    def cut(var_probs: T.handle, var_params: T.handle, var_kept: T.handle):
        T.func_attr(_ATTRS)
        b = T.int64()
        probs = T.match_buffer(var_probs, (b, v), "float32")
        params = T.match_buffer(var_params, (3, b), "float32")
        kept = T.match_buffer(var_kept, (b, v), "float32")
        row = T.launch_thread("blockIdx.x", b)
        tx = T.launch_thread("threadIdx.x", tx_n)
        partial = T.alloc_shared((tx_n,), "float32")
        ties = T.alloc_shared((tx_n,), "int32")
        bits = T.alloc_local((2,), "int32")  # [lo, hi]: mass(p >= lo) reaches top_p, mass(p >= hi) not
        acc = T.alloc_local((1,), "float32")
        rank = T.alloc_local((1,), "int32")
        top_p = params[TOP_P, row]
        bits[0] = 0
        bits[1] = INF_BITS
        for _s in range(SEARCH_STEPS):
            acc[0] = T.float32(0)
            for i in range(strided):
                if i * tx_n + tx < v:
                    p = probs[row, i * tx_n + tx]
                    mid = bits[0] + T.shift_right(bits[1] - bits[0], 1)
                    acc[0] = acc[0] + T.Select(p >= T.reinterpret("float32", mid), p, T.float32(0))
            partial[tx] = acc[0]
            T.tvm_storage_sync("shared")
            for step in range(steps):
                if tx < T.shift_right(tx_n, step + 1):
                    partial[tx] = partial[tx] + partial[tx + T.shift_right(tx_n, step + 1)]
                T.tvm_storage_sync("shared")
            acc[0] = partial[0]
            # nobody rewrites `partial` before everyone has read the sum
            T.tvm_storage_sync("shared")
            mid = bits[0] + T.shift_right(bits[1] - bits[0], 1)
            bits[0] = T.Select(acc[0] >= top_p, mid, bits[0])
            bits[1] = T.Select(acc[0] >= top_p, bits[1], mid)
        c = T.Select(top_p < T.float32(1), T.reinterpret("float32", bits[0]), T.float32(0))
        # the mass ranked above the ties at c
        acc[0] = T.float32(0)
        for i in range(strided):
            if i * tx_n + tx < v:
                p = probs[row, i * tx_n + tx]
                acc[0] = acc[0] + T.Select(p > c, p, T.float32(0))
        partial[tx] = acc[0]
        # ties at c in this thread's contiguous run
        rank[0] = 0
        for i in range(chunk):
            if tx * chunk + i < v:
                rank[0] = rank[0] + T.Cast("int32", probs[row, tx * chunk + i] == c)
        ties[tx] = rank[0]
        T.tvm_storage_sync("shared")
        for step in range(steps):
            if tx < T.shift_right(tx_n, step + 1):
                partial[tx] = partial[tx] + partial[tx + T.shift_right(tx_n, step + 1)]
            T.tvm_storage_sync("shared")
        acc[0] = partial[0]
        rank[0] = 0  # ties in the runs before this thread's
        for t in range(tx_n):
            rank[0] = rank[0] + T.Select(t < tx, ties[t], 0)
        j = _ties_needed(top_p, acc[0], c, v)
        for i in range(chunk):
            if tx * chunk + i < v:
                p = probs[row, tx * chunk + i]
                kept[row, tx * chunk + i] = T.Select((p > c) | ((p == c) & (rank[0] < j)), p, T.float32(0))
                rank[0] = rank[0] + T.Cast("int32", p == c)

    return cut


def _serial(v: int) -> tirx.PrimFunc:
    @T.prim_func(private=True)
    def cut(var_probs: T.handle, var_params: T.handle, var_kept: T.handle):
        T.func_attr(_ATTRS)
        b = T.int64()
        probs = T.match_buffer(var_probs, (b, v), "float32")
        params = T.match_buffer(var_params, (3, b), "float32")
        kept = T.match_buffer(var_kept, (b, v), "float32")
        bits = T.alloc_buffer((2,), "int32")
        acc = T.alloc_buffer((1,), "float32")
        rank = T.alloc_buffer((1,), "int32")
        for row in range(b):
            top_p = params[TOP_P, row]
            bits[0] = 0
            bits[1] = INF_BITS
            for _s in range(SEARCH_STEPS):
                mid = bits[0] + T.shift_right(bits[1] - bits[0], 1)
                acc[0] = T.float32(0)
                for k in range(v):
                    p = probs[row, k]
                    acc[0] = acc[0] + T.Select(p >= T.reinterpret("float32", mid), p, T.float32(0))
                bits[0] = T.Select(acc[0] >= top_p, mid, bits[0])
                bits[1] = T.Select(acc[0] >= top_p, bits[1], mid)
            c = T.Select(top_p < T.float32(1), T.reinterpret("float32", bits[0]), T.float32(0))
            acc[0] = T.float32(0)
            for k in range(v):
                acc[0] = acc[0] + T.Select(probs[row, k] > c, probs[row, k], T.float32(0))
            j = _ties_needed(top_p, acc[0], c, v)
            rank[0] = 0
            for k in range(v):
                p = probs[row, k]
                kept[row, k] = T.Select((p > c) | ((p == c) & (rank[0] < j)), p, T.float32(0))
                rank[0] = rank[0] + T.Cast("int32", p == c)

    return cut
