"""The decode roofline: every weight is read once per generated token, so tok/s <= bandwidth / weight bytes.

Bandwidth is measured here with a read-only TVM kernel over an array much larger than the caches, split over
T cores (`measure_read_bandwidth`). Weight bytes come from a config and
a storage scheme, or from the tensors of a GGUF file. The embedding table is not counted (one row is read
per token) unless it doubles as the output layer (tied embeddings), where all of it is read."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from ..config import Phi3Config
from ..errors import UserError

# bytes per weight for 2-D weights, by scheme. Ours: 4-bit codes (0.5 B) + one scale per 32 values.
BYTES_PER_WEIGHT = {
    "q4f32_1": 0.5 + 4 / 32,
    "q4f16_1": 0.5 + 2 / 32,
    "q0f32": 4.0,  # ours, unquantized
    "q0f16": 2.0,
    "q4_0": 18 / 32,  # ggml: f16 scale + 16 B of codes per 32
    "q4_1": 20 / 32,  # ggml: f16 scale + f16 min + 16 B
    "q8_0": 34 / 32,
    "f16": 2.0,
    "f32": 4.0,
}
# norm weights: float32, except in our fp16 schemes (stored in the model dtype)
NORM_BYTES = {"q4f16_1": 2, "q0f16": 2}


def _gguf_scheme_bytes(cfg: Phi3Config, name: str) -> float:
    """Bytes of weights one decode step reads in a gguf_* scheme of ours, tensor by tensor (a mix such as
    Q4_K_M stores some layers' Linears in another type); fp16 norms, and fp16 for an f16 role."""
    from ..quantization import get_scheme

    s = get_scheme(name)

    def per(weight: str) -> float:
        layout = s.layout_for_weight(weight)
        return layout.bits_per_weight(16) / 8 if layout is not None else 2.0

    h, inter = cfg.hidden_size, cfg.intermediate_size
    sizes = {
        "self_attn.qkv_proj": h * cfg.qkv_size,
        "self_attn.o_proj": cfg.num_attention_heads * cfg.head_dim * h,
        "mlp.gate_up_proj": 2 * h * inter,
        "mlp.down_proj": inter * h,
    }
    layers = sum(
        n * per(f"model.layers.{i}.{k}.weight")
        for i in range(cfg.num_hidden_layers)
        for k, n in sizes.items()
    )
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return layers + cfg.vocab_size * h * per(head) + (2 * cfg.num_hidden_layers + 1) * h * 2


def weight_bytes_per_token(cfg: Phi3Config, scheme: str) -> int:
    """Bytes of weights one decode step reads for a Phi-3 config stored in `scheme`."""
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    layer_2d = h * cfg.qkv_size + cfg.num_attention_heads * cfg.head_dim * h + 3 * h * cfg.intermediate_size
    if scheme.startswith("gguf_"):
        return int(round(_gguf_scheme_bytes(cfg, scheme)))
    if scheme not in BYTES_PER_WEIGHT:
        raise UserError(f"unknown quantization scheme {scheme!r}; known: {', '.join(BYTES_PER_WEIGHT)}")
    per = BYTES_PER_WEIGHT[scheme]
    total = L * layer_2d * per + (2 * L + 1) * h * NORM_BYTES.get(scheme, 4)
    total += cfg.vocab_size * h * per  # lm_head, or the tied embedding table acting as it
    return int(round(total))


def gguf_weight_bytes_per_token(path: str | Path) -> int:
    """The same count from a GGUF's tensors: all of them except `token_embd` unless there is no `output`."""
    from ..checkpoint.gguf_source import read_gguf

    reader = read_gguf(path)
    # rope factor tables (a few hundred bytes, only one of them used) are left out, as in the formula
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors if not t.name.startswith("rope_factors")}
    total = sum(sizes.values())
    if "output.weight" in sizes:
        total -= sizes.get("token_embd.weight", 0)
    return total


LANES, UNROLL = 16, 4  # uint32 lanes per load (one 512-bit vector; two 256-bit ones on AVX2), loads in flight


PROBE_PREFETCH = (0, 8192)  # bytes of software prefetch (into L2) ahead of the loads; the best one counts


def _read_kernel(words: int, threads: int, prefetch: int = 0):
    """A TVM kernel that reads `words` uint32 in `threads` contiguous parts, XOR-folding them into UNROLL
    independent vectors per part: the loads a decode GEMV issues without any of its arithmetic, with a
    software prefetch `prefetch` bytes ahead (one per 64-byte line, into L2) when not 0."""
    from tvm.script import tirx as T

    per = words // threads
    steps = per // (LANES * UNROLL)

    @T.prim_func
    def main(a: T.Buffer((words,), "uint32"), out: T.Buffer((threads * LANES,), "uint32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((UNROLL * LANES,), "uint32")  # global scope, small: on the stack
            for u in T.unroll(UNROLL):
                acc[T.ramp(u * LANES, 1, LANES)] = T.broadcast(T.uint32(0), LANES)
            for i in range(steps):
                if prefetch > 0:  # LANES * UNROLL words = 4 lines per step
                    for u in T.unroll(UNROLL):
                        T.evaluate(
                            T.call_llvm_intrin(
                                "void",
                                "llvm.prefetch.p0",
                                T.address_of(
                                    a[T.min(t * per + (i * UNROLL + u) * LANES + prefetch // 4, words - 1)]
                                ),
                                0,
                                2,
                                1,
                            )
                        )
                for u in T.unroll(UNROLL):
                    acc[T.ramp(u * LANES, 1, LANES)] = (
                        acc[T.ramp(u * LANES, 1, LANES)]
                        ^ a[T.ramp(t * per + (i * UNROLL + u) * LANES, 1, LANES)]
                    )
            for j in range(LANES):
                out[t * LANES + j] = acc[j] ^ acc[LANES + j] ^ acc[2 * LANES + j] ^ acc[3 * LANES + j]

    return main


@functools.cache
def _read_kernels(words: int, threads: int) -> list:
    """The probe built for this CPU, once per size and thread count (`phi3 tune` probes per kernel)."""
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return [
        tvm.compile(tvm.IRModule({"main": _read_kernel(words, threads, pf)}), target=target)["main"]
        for pf in PROBE_PREFETCH
    ]


def measure_read_bandwidth(threads: int = 1, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth in bytes/s of `threads` cores streaming `nbytes` (a TVM kernel
    built for this CPU: wide loads, several in flight per core, as the decode kernels issue them). TVM's
    thread pool must have `threads` threads (TVM_NUM_THREADS, read when the pool starts).

    The best, not the median: the roofline is the ceiling the machine allows, and neighbours only lower it.
    A numpy sum split over Python threads measured a third less than this on AMD Zen 4/5, less than
    decode itself moved, so it is not used. The kernel runs without and with a software prefetch
    (`PROBE_PREFETCH`): on Zen 4 the decode GEMVs, which prefetch, read faster than the plain loop."""
    import tvm

    if threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    pool = int(tvm.get_global_func("runtime.NumThreads")())
    if pool < threads:  # TVM sizes its pool once, from TVM_NUM_THREADS (else half the CPUs on some hosts)
        raise RuntimeError(f"TVM's thread pool has {pool} thread(s), not {threads}: set TVM_NUM_THREADS")
    words = nbytes // 4 // (threads * LANES * UNROLL) * (threads * LANES * UNROLL)
    reads = _read_kernels(words, threads)
    dev = tvm.cpu()
    a = tvm.runtime.tensor(np.ones(words, dtype=np.uint32), dev)  # every page touched before timing
    out = tvm.runtime.empty((threads * LANES,), "uint32", dev)
    best = 0.0
    for read in reads:
        read(a, out)
    for _ in range(repeats):
        for read in reads:  # interleaved: a drift in the machine's bandwidth meets both alike
            t0 = time.perf_counter()
            read(a, out)
            best = max(best, words * 4 / (time.perf_counter() - t0))
            if not np.all(out.numpy() == 0):  # an even number of ones per lane: the loads really ran
                raise RuntimeError("bandwidth probe read wrong data")
    return best
