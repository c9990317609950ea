"""`sampling_cut`: the top-k, top-p (nucleus) and min-p cuts of each row of probabilities, without sorting.

The host sampler (runtime/sampling.py) keeps, in this order: every token whose logit is at least the k-th
largest (ties included); of those, renormalised, the shortest prefix of the tokens ranked by probability
(ties: lower id first) whose mass reaches top_p; of those, every token with p >= min_p * max p. On the
device, with p = softmax(logits / T):
- top-k: the k-th largest p, t_k, is the largest t with count(p >= t) >= k;
- top-p: with S the mass of p >= t_k, the cut probability c is the largest t with mass(p >= t) >= top_p * S,
  and the prefix is every token with p > c plus, of the tokens with p == c, the first j in id order, j the
  smallest count with mass(p > c) + j * c >= top_p * S;
- min-p: p >= min_p * max p (the top token always survives the other cuts, so max p is the row's).
Both thresholds are found exactly: for non-negative floats count(p >= t) and mass(p >= t) fall in the order
of t's bit pattern, so 31 halvings of the bit-pattern range land on a probability of the row. No sort (a
bitonic sort of 32064 entries is 120 launches); one kernel per step. A float32 near-tie that float64 on the
host separates can move a token across a cut, as float32 moves a draw's boundary.

kernel(probs f32[b, v], params f32[5, b], kept f32[b, v]): kept = p where kept, else 0. params rows are
sample_tokens': temperature, uniform, top_p (>= 1: off), top_k (0 or >= v: off), min_p (0: off).

GPU: one block per row. Every barrier sits outside any data-dependent branch (WGSL's uniformity rules): each
search always takes its 31 steps (a row without that cut skips their loads, leaving the barriers) and a
row's switches are selects. llvm: the same walk as serial loops.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .logit_processor import max_threads

TOP_P, TOP_K, MIN_P = 2, 3, 4  # params rows (sample_tokens: temperature, uniform, top_p, top_k, min_p)
PARAM_ROWS = 5
SEARCH_STEPS = 31  # halvings of [0, bits(+inf)): < 2^31 patterns
INF_BITS = 0x7F800000
_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}  # opaque: never fused


def sampling_cut(vocab: int, target: tvm.target.Target) -> tirx.PrimFunc:
    if target.kind.name in ("llvm", "c"):
        return _serial(vocab)
    return _blocked(vocab, max_threads(target))


def _mid(bits):
    return bits[0] + T.shift_right(bits[1] - bits[0], 1)


def _ties_needed(use_p, goal, above, c, v: int):
    """j: how many tokens with p == c complete the top-p prefix (all of them without a top-p cut)."""
    need = T.ceil((goal - above) / T.max(c, T.float32(1e-38)))
    j = T.min(T.max(need, T.float32(1)), T.float32(v))
    return T.Select(use_p & (c > T.float32(0)), T.Cast("int32", j), v)


def _blocked(v: int, tx_n: int) -> tirx.PrimFunc:
    assert tx_n & (tx_n - 1) == 0, "the tree reduction halves the block"
    steps = tx_n.bit_length() - 1
    strided = (v + tx_n - 1) // tx_n  # k = i * tx_n + tx: coalesced sums
    chunk = strided  # k = tx * chunk + i: contiguous runs, for the id-order rank of ties

    @T.macro
    def tree_sum(partial, tx):
        """partial[0] = the sum of partial[0..tx_n), seen by every thread."""
        T.tvm_storage_sync("shared")
        for step in range(steps):
            if tx < T.shift_right(tx_n, step + 1):
                partial[tx] = partial[tx] + partial[tx + T.shift_right(tx_n, step + 1)]
            T.tvm_storage_sync("shared")

    @T.macro
    def bisect(probs, row, tx, partial, bits, acc, active, goal, per_token, per_mass):
        """bits[0]: the largest t whose sum of per_token + per_mass * p over p >= t reaches `goal` (a count
        with (1, 0), a mass with (0, 1)). An inactive row reads nothing; its result is not used."""
        bits[0] = 0
        bits[1] = INF_BITS
        for _s in range(SEARCH_STEPS):
            acc[0] = T.float32(0)
            for i in range(strided):
                if i * tx_n + tx < v and active:
                    p = probs[row, i * tx_n + tx]
                    hit = p >= T.reinterpret("float32", _mid(bits))
                    acc[0] = acc[0] + T.Select(hit, per_token + per_mass * p, T.float32(0))
            partial[tx] = acc[0]
            tree_sum(partial, tx)
            acc[0] = partial[0]
            T.tvm_storage_sync("shared")  # nobody rewrites `partial` before everyone has read the sum
            m = _mid(bits)  # one halving: keep [mid, hi) when the sum at mid reaches the goal
            bits[0] = T.Select(acc[0] >= goal, m, bits[0])
            bits[1] = T.Select(acc[0] >= goal, bits[1], m)

    @T.prim_func(private=True)
    def cut(var_probs: T.handle, var_params: T.handle, var_kept: T.handle):
        T.func_attr(_ATTRS)
        b = T.int64()
        probs = T.match_buffer(var_probs, (b, v), "float32")
        params = T.match_buffer(var_params, (PARAM_ROWS, b), "float32")
        kept = T.match_buffer(var_kept, (b, v), "float32")
        row = T.launch_thread("blockIdx.x", b)
        tx = T.launch_thread("threadIdx.x", tx_n)
        partial = T.alloc_shared((tx_n,), "float32")
        peak = T.alloc_shared((tx_n,), "float32")
        ties = T.alloc_shared((tx_n,), "int32")
        bits = T.alloc_local((2,), "int32")  # [lo, hi]: the sum at lo reaches the goal, at hi not
        acc = T.alloc_local((2,), "float32")
        rank = T.alloc_local((1,), "int32")
        bounds = T.alloc_local((2,), "float32")  # [top_p of the top-k mass, min_p of the top probability]
        top_p = params[TOP_P, row]
        top_k = params[TOP_K, row]
        min_p = params[MIN_P, row]
        use_k = (top_k >= T.float32(1)) & (top_k < T.float32(v))
        use_p = top_p < T.float32(1)
        bisect(probs, row, tx, partial, bits, acc, use_k, top_k, T.float32(1), T.float32(0))  # top-k
        t_k = T.Select(use_k, T.reinterpret("float32", bits[0]), T.float32(0))
        # the mass top-k keeps, and the top probability
        acc[0] = T.float32(0)
        acc[1] = T.float32(0)
        for i in range(strided):
            if i * tx_n + tx < v:
                p = probs[row, i * tx_n + tx]
                acc[0] = acc[0] + T.Select(p >= t_k, p, T.float32(0))
                acc[1] = T.max(acc[1], p)
        partial[tx] = acc[0]
        peak[tx] = acc[1]
        T.tvm_storage_sync("shared")
        for step in range(steps):
            if tx < T.shift_right(tx_n, step + 1):
                partial[tx] = partial[tx] + partial[tx + T.shift_right(tx_n, step + 1)]
                peak[tx] = T.max(peak[tx], peak[tx + T.shift_right(tx_n, step + 1)])
            T.tvm_storage_sync("shared")
        # in registers: a let-bound shared read could be re-read after the next writes
        bounds[0] = top_p * partial[0]
        bounds[1] = min_p * peak[0]
        T.tvm_storage_sync("shared")
        goal = bounds[0]
        floor = bounds[1]
        # top-p: mass(p >= t) reaches top_p of what top-k keeps
        bisect(probs, row, tx, partial, bits, acc, use_p, goal, T.float32(0), T.float32(1))
        c = T.max(T.Select(use_p, T.reinterpret("float32", bits[0]), T.float32(0)), t_k)
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
        tree_sum(partial, tx)
        acc[0] = partial[0]
        rank[0] = 0  # ties in the runs before this thread's
        for t in range(tx_n):
            rank[0] = rank[0] + T.Select(t < tx, ties[t], 0)
        j = _ties_needed(use_p, goal, acc[0], c, v)
        for i in range(chunk):
            if tx * chunk + i < v:
                p = probs[row, tx * chunk + i]
                keep = ((p > c) | ((p == c) & (rank[0] < j))) & (p >= floor)
                kept[row, tx * chunk + i] = T.Select(keep, p, T.float32(0))
                rank[0] = rank[0] + T.Cast("int32", p == c)

    return cut


def _serial(v: int) -> tirx.PrimFunc:
    @T.prim_func(private=True)
    def cut(var_probs: T.handle, var_params: T.handle, var_kept: T.handle):
        T.func_attr(_ATTRS)
        b = T.int64()
        probs = T.match_buffer(var_probs, (b, v), "float32")
        params = T.match_buffer(var_params, (PARAM_ROWS, b), "float32")
        kept = T.match_buffer(var_kept, (b, v), "float32")
        bits = T.alloc_buffer((2,), "int32")
        acc = T.alloc_buffer((2,), "float32")
        rank = T.alloc_buffer((1,), "int32")
        for row in range(b):
            top_p = params[TOP_P, row]
            top_k = params[TOP_K, row]
            min_p = params[MIN_P, row]
            use_k = (top_k >= T.float32(1)) & (top_k < T.float32(v))
            use_p = top_p < T.float32(1)
            bits[0] = 0
            bits[1] = INF_BITS
            for _s in range(SEARCH_STEPS):
                acc[0] = T.float32(0)
                for k in range(v):
                    p = probs[row, k]
                    acc[0] = acc[0] + T.Select(p >= T.reinterpret("float32", _mid(bits)), T.float32(1), 0.0)
                m = _mid(bits)  # one halving: keep [mid, hi) when the sum at mid reaches the goal
                bits[0] = T.Select(acc[0] >= top_k, m, bits[0])
                bits[1] = T.Select(acc[0] >= top_k, bits[1], m)
            t_k = T.Select(use_k, T.reinterpret("float32", bits[0]), T.float32(0))
            acc[0] = T.float32(0)
            acc[1] = T.float32(0)
            for k in range(v):
                acc[0] = acc[0] + T.Select(probs[row, k] >= t_k, probs[row, k], T.float32(0))
                acc[1] = T.max(acc[1], probs[row, k])
            goal = top_p * acc[0]
            floor = min_p * acc[1]
            bits[0] = 0
            bits[1] = INF_BITS
            for _s in range(SEARCH_STEPS):
                acc[0] = T.float32(0)
                for k in range(v):
                    p = probs[row, k]
                    acc[0] = acc[0] + T.Select(p >= T.reinterpret("float32", _mid(bits)), p, T.float32(0))
                m = _mid(bits)  # one halving: keep [mid, hi) when the sum at mid reaches the goal
                bits[0] = T.Select(acc[0] >= goal, m, bits[0])
                bits[1] = T.Select(acc[0] >= goal, bits[1], m)
            c = T.max(T.Select(use_p, T.reinterpret("float32", bits[0]), T.float32(0)), t_k)
            acc[0] = T.float32(0)
            for k in range(v):
                acc[0] = acc[0] + T.Select(probs[row, k] > c, probs[row, k], T.float32(0))
            j = _ties_needed(use_p, goal, acc[0], c, v)
            rank[0] = 0
            for k in range(v):
                p = probs[row, k]
                keep = ((p > c) | ((p == c) & (rank[0] < j))) & (p >= floor)
                kept[row, k] = T.Select(keep, p, T.float32(0))
                rank[0] = rank[0] + T.Cast("int32", p == c)

    return cut
