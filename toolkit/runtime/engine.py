"""The engine: a compiled Phi-3 library + its weights in the Relax VM, driving TVM's paged KV cache.

It owns sequences (ids in the cache), their positions, and the per-token LongRoPE choice that follows
Hugging Face: a forward uses the long factors iff the sequence's largest position in it + 1 exceeds
original_max_position_embeddings. A prompt longer than the prefill chunk is fed in chunks that all use
the choice of the whole prompt, as HF's single forward would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine  # runtime-only: the engine also runs with TVM_USE_RUNTIME_LIB=1

from ..config import Phi3Config


def _f(name: str):
    return tvm.get_global_func(name)


@dataclass
class CacheOptions:
    max_batch_size: int = 4
    context_window: int = 4096
    prefill_chunk: int = 256
    page_size: int = 16


@dataclass
class _Seq:
    length: int = 0
    tokens: list[int] = field(default_factory=list)


class Engine:
    """Library + params + KV cache. Single-threaded: one forward at a time."""

    def __init__(
        self,
        executable: tvm.runtime.Module,
        params: Sequence[tvm.runtime.Tensor],
        cfg: Phi3Config,
        *,
        dtype: str = "float32",
        device: tvm.runtime.Device | None = None,
        cache: CacheOptions | None = None,
    ) -> None:
        self.cfg, self.dtype = cfg, dtype
        self.device = device or tvm.cpu()
        self.vm = VirtualMachine(executable, self.device)
        self.params = list(params)
        self.cache_opts = cache or CacheOptions()
        c = self.cache_opts
        self.context_window = min(c.context_window, cfg.max_position_embeddings)
        self.kv = self.vm["create_tir_paged_kv_cache"](
            ShapeTuple([c.max_batch_size]),
            ShapeTuple([c.max_batch_size * self.context_window]),
            ShapeTuple([c.prefill_chunk]),
            ShapeTuple([c.page_size]),
            ShapeTuple([1 if cfg.sliding_window else 0]),
        )
        self._embed, self._prefill = self.vm["embed"], self.vm["prefill"]
        self._prefill_logits, self._decode = self.vm["prefill_logits"], self.vm["decode"]
        self._begin, self._end = (
            _f("vm.builtin.kv_state_begin_forward"),
            _f("vm.builtin.kv_state_end_forward"),
        )
        self.seqs: dict[int, _Seq] = {}
        self._next_id = 0

    # -- sequences -----------------------------------------------------------------------------------------
    def add_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        _f("vm.builtin.kv_state_add_sequence")(self.kv, sid)
        if self.cfg.sliding_window:
            # HF: a query attends keys with 0 <= q - k < W; no attention sink
            # TVM's window holds W tokens *before* the new one is appended: W-1 gives HF's W keys per query
            _f("vm.builtin.attention_kv_cache_enable_sliding_window_for_seq")(
                self.kv, sid, self.cfg.sliding_window - 1, 0
            )
        self.seqs[sid] = _Seq()
        return sid

    def remove_sequence(self, sid: int) -> None:
        _f("vm.builtin.kv_state_remove_sequence")(self.kv, sid)
        del self.seqs[sid]

    def popn(self, sid: int, n: int) -> None:
        """Forget the last `n` tokens of a sequence (chat: drop what no longer matches the conversation)."""
        if n:
            _f("vm.builtin.kv_state_popn")(self.kv, sid, n)
            seq = self.seqs[sid]
            seq.length -= n
            del seq.tokens[-n:]

    def sequence_length(self, sid: int) -> int:
        return self.seqs[sid].length

    # -- helpers -------------------------------------------------------------------------------------------
    def _tensor(self, a: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(a, self.device)

    def _rope_long(self, last_position: int, n: int) -> np.ndarray:
        lr = self.cfg.longrope
        flag = int(lr is not None and last_position + 1 > lr.original_max_position_embeddings)
        return np.full((n,), flag, dtype="int32")

    def _check_room(self, sid: int, n: int) -> None:
        if self.seqs[sid].length + n > self.context_window:
            raise ContextFullError(
                f"sequence would reach {self.seqs[sid].length + n} tokens; "
                f"context window is {self.context_window}"
            )

    # -- forward -------------------------------------------------------------------------------------------
    def prefill(self, sid: int, ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Feed `ids` to sequence `sid`. Returns logits of the last token [V] (or of every token [n, V])."""
        ids = list(ids)
        if not ids:
            raise ValueError("empty prompt")
        self._check_room(sid, len(ids))
        seq = self.seqs[sid]
        start, last_pos = seq.length, seq.length + len(ids) - 1
        outs = []
        for off, n in self._pieces(start, len(ids)):
            part = ids[off : off + n]
            pos = np.arange(start + off, start + off + n, dtype="int32")
            emb = self._embed(self._tensor(np.asarray(part, dtype="int32")), self.params)
            emb = self._reshape_emb(emb, (1, n))
            self._begin(self.kv, ShapeTuple([sid]), ShapeTuple([n]))
            fn = self._prefill_logits if all_logits else self._prefill
            logits, self.kv = fn(
                emb, self._tensor(pos), self._tensor(self._rope_long(last_pos, n)), self.kv, self.params
            )
            self._end(self.kv)
            if all_logits or off + n == len(ids):
                outs.append(logits.numpy().reshape(-1, self.cfg.vocab_size))
        seq.length += len(ids)
        seq.tokens.extend(ids)
        return np.concatenate(outs) if all_logits else outs[-1][-1]

    def _pieces(self, start: int, n: int) -> list[tuple[int, int]]:
        """Split a prompt into forward calls of at most prefill_chunk tokens.

        With a sliding window W, TVM's chunked prefill applies the window only inside the chunk, not to the
        cached keys, so a chunk is exact only while it ends within the first W positions; past that we feed
        one token per call (exact: a single query sees the W-1 cached keys plus itself). This only slows
        prompts longer than the window (2047 tokens for Phi-3-mini-4k).
        """
        chunk, w = self.cache_opts.prefill_chunk, self.cfg.sliding_window
        pieces, off = [], 0
        while off < n:
            size = min(chunk, n - off)
            if w is not None and start + off + size > w:
                size = max(1, min(size, w - (start + off)))
            pieces.append((off, size))
            off += size
        return pieces

    def decode(self, sid: int, token: int) -> np.ndarray:
        return self.decode_batch([sid], [token])[0]

    def decode_batch(self, sids: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token for each sequence in one forward -> logits [b, V]."""
        b = len(sids)
        for s in sids:
            self._check_room(s, 1)
        pos = np.array([self.seqs[s].length for s in sids], dtype="int32")
        long = np.concatenate([self._rope_long(int(p), 1) for p in pos])
        emb = self._embed(self._tensor(np.asarray(tokens, dtype="int32")), self.params)
        emb = self._reshape_emb(emb, (b, 1))
        self._begin(self.kv, ShapeTuple(list(sids)), ShapeTuple([1] * b))
        logits, self.kv = self._decode(emb, self._tensor(pos), self._tensor(long), self.kv, self.params)
        self._end(self.kv)
        for s, t in zip(sids, tokens):
            self.seqs[s].length += 1
            self.seqs[s].tokens.append(int(t))
        return logits.numpy().reshape(b, self.cfg.vocab_size)

    def _reshape_emb(self, emb: tvm.runtime.Tensor, lead: tuple[int, int]) -> tvm.runtime.Tensor:
        """[n, h] embeddings as [b, s, h] for prefill/decode: a view, no copy."""
        return emb._create_view((*lead, self.cfg.hidden_size))


class ContextFullError(Exception):
    """The sequence would outgrow the compiled context window."""


# TVM's pool modes: 1/0 pin threads to the "big" cores, which on a VM without cpufreq data means all threads
# (and this process, and every child it starts later, e.g. a llama.cpp worker) on CPU 0. -3
# (kSpecifyThreadShareAllCore) lets each pool thread run on any CPU this process may use.
_SHARE_ALL_CORES = -3


def set_threads(n: int | None) -> None:
    """Size TVM's CPU thread pool (None: one per physical core, TVM's default), without CPU pinning."""
    if n:
        cpus = [str(c) for c in sorted(os.sched_getaffinity(0))] if hasattr(os, "sched_getaffinity") else []
        tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, int(n), cpus)


def load_engine(
    model: str | None = None,
    *,
    quantization: str | None = None,
    device: str = "host",
    threads: int | None = None,
    cache: CacheOptions | None = None,
    allow_pickle: bool = False,
):
    """Open a model (HF folder, GGUF, converter output, or None = the embedded default), compile it for the
    device preset on first use (cached), load its weights and return (Engine, ModelSource)."""
    from ..checkpoint import open_model
    from ..compile.compile_model import compiled_for
    from ..targets import load_preset
    from .weights import load_params

    source = open_model(model, allow_pickle=allow_pickle)
    if source.kind == "mlc":
        if quantization and quantization != source.scheme.name:
            raise ValueError(f"{source.path} holds {source.scheme.name} weights, not {quantization}")
        quantization = source.scheme.name
    quantization = quantization or DEFAULT_QUANTIZATION
    preset = load_preset(device)
    if preset.is_gpu and preset.kind != "cuda":
        from ..errors import UserError

        raise UserError(
            f"cannot run '{device}' here: use `phi3 compile --device {device}` and deploy the library"
        )
    compiled = compiled_for(source.config, quantization, preset)
    dev = tvm.cuda() if preset.kind == "cuda" else tvm.cpu()
    set_threads(threads)
    lib = tvm.runtime.load_module(str(compiled.library))
    params = load_params(source, compiled, dev)
    eng = Engine(lib, params, source.config, dtype=compiled.manifest["dtype"], device=dev, cache=cache)
    eng.compiled = compiled
    return eng, source


DEFAULT_QUANTIZATION = "q4f16_1"
