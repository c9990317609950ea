"""`sampler_verify_draft_tokens`: accept or reject a tree of draft tokens against the model's probabilities
(speculative decoding), one thread block per sequence.

Interface from mlc-ai/mlc-llm at commit 79d603f085f50500e9509fa01785ffa7ecfaaa93 (cpp/serve/sampler/
gpu_sampler.cc calls it; the kernel here is our own):

    sampler_verify_draft_tokens(draft_probs f32[m, v], draft_tokens i32[m], model_probs f32[m, v],
        token_tree_first_child i32[m], token_tree_next_sibling i32[m], uniform_samples f32[m],
        token_tree_parent_ptr i32[b]) -> (model_probs, token_tree_parent_ptr), both updated in place
        (a Relax function around the kernel `verify_draft_tokens`).

For sequence s the walk starts at parent = token_tree_parent_ptr[s] and child = its first child. A child with
token t is accepted when model_probs[parent, t] >= u * draft_probs[child, t] (u = uniform_samples[child]);
the walk then descends (parent = child). Otherwise the parent's row becomes the residual
max(model - draft, 0) renormalised and the next sibling is tried; a residual with mass below 1e-7 accepts the
child instead. token_tree_parent_ptr[s] ends at the last accepted node.

Thread t of the block owns vocabulary entries k with k % TX == t for the whole walk, and the acceptance test
for token t is made by its owner: every global value a thread reads after a rewrite it wrote itself, so the
only communication is through shared memory (block-wide sum, the decision), ordered by block barriers.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from .logit_processor import max_threads

RESIDUAL_EPS = 1e-7  # a residual this small is all rounding noise: accept the draft token instead


def spec_verify(vocab_size: int, target: tvm.target.Target) -> tirx.PrimFunc:
    tx_n = max_threads(target)
    assert tx_n & (tx_n - 1) == 0, "the tree reduction halves the block"
    steps = tx_n.bit_length() - 1
    v = vocab_size
    per_thread = (v + tx_n - 1) // tx_n

    @T.prim_func(private=True)
    def verify(
        var_draft_probs: T.handle,
        var_draft_tokens: T.handle,
        var_model_probs: T.handle,
        var_first_child: T.handle,
        var_next_sibling: T.handle,
        var_uniform: T.handle,
        var_parent_ptr: T.handle,
    ):
        # opaque (op_pattern 8): never fused with the Relax wrapper's other calls
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        m, nb = T.int64(), T.int64()
        draft_probs = T.match_buffer(var_draft_probs, (m, v), "float32")
        draft_tokens = T.match_buffer(var_draft_tokens, (m,), "int32")
        model_probs = T.match_buffer(var_model_probs, (m, v), "float32")
        first_child = T.match_buffer(var_first_child, (m,), "int32")
        next_sibling = T.match_buffer(var_next_sibling, (m,), "int32")
        uniform = T.match_buffer(var_uniform, (m,), "float32")
        parent_ptr = T.match_buffer(var_parent_ptr, (nb,), "int32")
        seq = T.launch_thread("blockIdx.x", nb)
        tx = T.launch_thread("threadIdx.x", tx_n)
        partial = T.alloc_shared((tx_n,), "float32")
        accept_shared = T.alloc_shared((1,), "int32")
        node = T.alloc_local((2,), "int32")  # [parent, child]
        acc = T.alloc_local((1,), "float32")
        accepted = T.alloc_local((1,), "int32")
        node[0] = parent_ptr[seq]
        node[1] = first_child[node[0]]
        while node[1] != -1:
            if tx == draft_tokens[node[1]] % tx_n:
                accept_shared[0] = T.Cast(
                    "int32",
                    model_probs[node[0], draft_tokens[node[1]]]
                    >= uniform[node[1]] * draft_probs[node[1], draft_tokens[node[1]]],
                )
            T.tvm_storage_sync("shared")
            # TVM's sync planner rejects shared-memory reads inside a condition: read into a register
            accepted[0] = accept_shared[0]
            if accepted[0] == 0:
                acc[0] = T.float32(0)
                for i in range(per_thread):
                    if i * tx_n + tx < v:
                        acc[0] = acc[0] + T.max(
                            model_probs[node[0], i * tx_n + tx] - draft_probs[node[1], i * tx_n + tx],
                            T.float32(0),
                        )
                partial[tx] = acc[0]
                T.tvm_storage_sync("shared")
                for step in range(steps):
                    if tx < T.shift_right(tx_n, step + 1):
                        partial[tx] = partial[tx] + partial[tx + T.shift_right(tx_n, step + 1)]
                    T.tvm_storage_sync("shared")
                acc[0] = partial[0]
                if acc[0] >= T.float32(RESIDUAL_EPS):
                    for i in range(per_thread):
                        if i * tx_n + tx < v:
                            model_probs[node[0], i * tx_n + tx] = (
                                T.max(
                                    model_probs[node[0], i * tx_n + tx] - draft_probs[node[1], i * tx_n + tx],
                                    T.float32(0),
                                )
                                / acc[0]
                            )
                    node[1] = next_sibling[node[1]]
                else:
                    node[0] = node[1]
                    node[1] = first_child[node[1]]
            else:
                node[0] = node[1]
                node[1] = first_child[node[1]]
            # nobody rewrites accept_shared / partial before everyone has read them
            T.tvm_storage_sync("shared")
        if tx == 0:
            parent_ptr[seq] = node[0]

    return verify


def emit_verify_function(bb: relax.BlockBuilder, vocab_size: int, target: tvm.target.Target) -> None:
    """The Relax function the engine calls: the kernel in place on model_probs and token_tree_parent_ptr,
    returning both (as MLC's does; the engine reads the pointers back from its own array)."""
    m, nb = tirx.Var("num_nodes", "int64"), tirx.Var("nbatch", "int64")
    f32 = lambda name, shape: relax.Var(name, relax.TensorType(shape, "float32"))  # noqa: E731
    i32 = lambda name, shape: relax.Var(name, relax.TensorType(shape, "int32"))  # noqa: E731
    args = [
        f32("draft_probs", [m, vocab_size]),
        i32("draft_tokens", [m]),
        f32("model_probs", [m, vocab_size]),
        i32("token_tree_first_child", [m]),
        i32("token_tree_next_sibling", [m]),
        f32("uniform_samples", [m]),
        i32("token_tree_parent_ptr", [nb]),
    ]
    kernel = bb.add_func(spec_verify(vocab_size, target), "verify_draft_tokens")
    with bb.function("sampler_verify_draft_tokens", args):
        with bb.dataflow():
            out = relax.call_tir_inplace(
                kernel, args, inplace_indices=[2, 6], out_ty=[args[2].ty, args[6].ty]
            )
            out = bb.emit_output(out)
        bb.emit_func_output(out)
