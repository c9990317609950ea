"""The engine: a compiled Phi-3 library + its weights in the Relax VM, driving TVM's paged KV cache.

It drives the library only through MLC-LLM's model-library interface (`embed`, `prefill`, `decode`,
`batch_prefill`, `batch_decode`, `batch_verify`, `create_tir_paged_kv_cache`, `_metadata`) and TVM's
`vm.builtin.*` KV-state builtins, called the way MLC's engine calls them (cpp/serve/model.cc at mlc-ai/mlc-llm
79d603f085f50500e9509fa01785ffa7ecfaaa93), so whatever runs here runs the same under MLC's runtimes.

It owns sequences (ids in the cache) and follows transformers' `generate()` at the LongRoPE switch: when a
sequence first grows past original_max_position_embeddings while its cache holds at most that many tokens,
the cache is dropped and the whole sequence re-encoded, in one forward that reaches past the switch (so the
graph's per-sequence rule picks the long factors for every token, as HF's single forward does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine  # runtime-only: the engine also runs with TVM_USE_RUNTIME_LIB=1

from ..config import Phi3Config
from ..cpu_threads import size_thread_pool
from .device_sampling import FUSED_STEPS, DeviceSampler, Draw, Upload

if TYPE_CHECKING:
    from ..checkpoint import ModelSource


def _f(name: str):
    return tvm.get_global_func(name)


_DL_CPU = 1  # DLPack's kDLCPU
KV_SLIDING_WINDOW_SUPPORT = 0  # create_tir_paged_kv_cache's 5th argument; see Engine.__init__
FORWARD_FUNCTIONS = ("embed", "prefill", "decode", "batch_prefill", "batch_decode", "batch_verify")


@dataclass
class CacheOptions:
    max_batch_size: int = 4
    context_window: int = 4096
    prefill_chunk: int = 256
    page_size: int = 16

    def window_for(self, cfg: Phi3Config) -> int:
        """Positions one sequence may hold: this window, at most the model's max_position_embeddings."""
        return min(self.context_window, cfg.max_position_embeddings)


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
        device_sampling: bool = False,
    ) -> None:
        self.cfg, self.dtype = cfg, dtype
        self.device = device or tvm.cpu()
        self.vm = VirtualMachine(executable, self.device)
        self.metadata = json.loads(self.vm["_metadata"]())
        if self.vm.module.implements_function("cuda_graph_alloc_init"):  # `--cuda-graph` libraries
            self.vm["cuda_graph_alloc_init"]()  # the captured graphs' buffers, once, as MLC's engine does
        self.params = list(params)
        self.cache_opts = cache or CacheOptions()
        c = self.cache_opts
        self.context_window = c.window_for(cfg)
        self.prefill_chunk = c.prefill_chunk
        lr = cfg.longrope
        if lr is not None and self.context_window > lr.original_max_position_embeddings:
            # the forward that crosses the switch must reach it in one call (see prefill_pieces)
            self.prefill_chunk = max(c.prefill_chunk, lr.original_max_position_embeddings + 1)
        self.kv = self.vm["create_tir_paged_kv_cache"](
            ShapeTuple([c.max_batch_size]),
            ShapeTuple([c.max_batch_size * self.context_window]),
            ShapeTuple([self.prefill_chunk]),
            ShapeTuple([c.page_size]),
            # the host kernels apply the window over a cache that keeps every token. Keeping the cache's own
            # sliding-window support off is also what keeps batched decode correct on Vulkan/OpenCL/Metal with
            # the apache-tvm 0.27 wheel: with it on, the cache's plain aux-data manager (every device but
            # CPU/CUDA/ROCm) copies the length info of >= 2 sequences into a strided view and fails with
            # "CopyDataFromTo only support contiguous array" (tests/test_tvm_runtime_plugins.py reproduces it)
            ShapeTuple([KV_SLIDING_WINDOW_SUPPORT]),
        )
        # token ids go through one device buffer: a fresh tensor per forward cost a device allocation and
        # free per token (on CUDA with a memory-info query: ~45 us of a ~2.6 ms Phi-3-mini step)
        self._ids = tvm.runtime.empty((max(self.prefill_chunk, c.max_batch_size),), "int32", self.device)
        # on the CPU the ids are written through a numpy alias and the buffer's views are kept: each FFI call
        # made between two forwards runs cold (the weights streamed through the caches), ~50 us apiece
        self._ids_host = np.from_dlpack(self._ids) if self._on_cpu() else None
        self._ids_views: dict[int, tvm.runtime.Tensor] = {}
        self._one = ShapeTuple([1])
        self._fn = {n: self.vm[n] for n in FORWARD_FUNCTIONS}
        self._begin, self._end = (
            _f("vm.builtin.kv_state_begin_forward"),
            _f("vm.builtin.kv_state_end_forward"),
        )
        self.seqs: dict[int, _Seq] = {}
        self._next_id = 0
        # `device_sampling`: forwards given a Draw return its token, drawn where the logits are
        self.sampler = (
            DeviceSampler(self.vm, self.device, c.max_batch_size, cfg.vocab_size) if device_sampling else None
        )
        # forward -> its fused step (embed, forward, sample_tokens in one call), where the library has one
        self._fused = {
            fwd: self.vm[name]
            for fwd, name in FUSED_STEPS.items()
            if self.vm.module.implements_function(name)
        }

    # -- sequences -----------------------------------------------------------------------------------------
    def add_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self._add(sid)
        self.seqs[sid] = _Seq()
        return sid

    def _add(self, sid: int) -> None:
        # no per-sequence sliding window: the cache would roll and its query positions, which the graph
        # rotates q/k with, would stop being absolute; the host kernels apply HF's window themselves
        _f("vm.builtin.kv_state_add_sequence")(self.kv, sid)

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

    def free_pages(self) -> int:
        """Pages left in the KV cache's pool (a removed sequence gives its pages back)."""
        return int(_f("vm.builtin.attention_kv_cache_get_num_available_pages")(self.kv))

    # -- helpers -------------------------------------------------------------------------------------------
    def _tensor(self, a: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(a, self.device)

    def _on_cpu(self) -> bool:
        return self.device.dlpack_device_type() == _DL_CPU

    def _host(self, t: tvm.runtime.Tensor) -> np.ndarray:
        """A forward's output as numpy: on the CPU a view of the tensor itself, no copy per step (the view
        keeps the tensor, and so its storage, alive; the VM hands each call fresh outputs); elsewhere a copy
        to the host."""
        if self._on_cpu():
            return np.from_dlpack(t)
        return t.numpy()

    def _put_ids(self, ids: Sequence[int]) -> tvm.runtime.Tensor:
        """`ids` in the ids buffer; its view of that length."""
        n = len(ids)
        buf = self._ids_views.get(n)
        if buf is None:
            buf = self._ids_views[n] = self._ids._create_view((n,))
        if self._ids_host is not None:
            self._ids_host[:n] = ids
        else:
            buf.copyfrom(np.asarray(ids, dtype="int32"))
        return buf

    def _embed(self, ids: Sequence[int], lead: tuple[int, int]) -> tvm.runtime.Tensor:
        """Embeddings of `ids` as [b, s, h]: a view of embed's [n, h], as MLC's engine passes them."""
        emb = self._fn["embed"](self._put_ids(ids), self.params)
        return emb._create_view((*lead, self.cfg.hidden_size))

    def _check_room(self, sid: int, n: int) -> None:
        if self.seqs[sid].length + n > self.context_window:
            raise ContextFullError(
                f"sequence would reach {self.seqs[sid].length + n} tokens; "
                f"context window is {self.context_window}"
            )

    def _crosses_longrope_switch(self, sid: int, n: int) -> bool:
        """transformers' Phi3ForCausalLM.prepare_inputs_for_generation: the sequence reaches past
        original_max while the cache holds no more than that -> drop the cache and re-encode everything."""
        lr, seq = self.cfg.longrope, self.seqs[sid]
        if lr is None or seq.length == 0:
            return False
        orig = lr.original_max_position_embeddings
        return seq.length + n >= orig + 1 and seq.length <= orig

    def _reencode(self, sid: int, new: list[int]) -> list[int]:
        """Drop `sid`'s cache; the tokens to feed from position 0 are its old ones plus `new`."""
        ids = self.seqs[sid].tokens + new
        _f("vm.builtin.kv_state_remove_sequence")(self.kv, sid)
        self._add(sid)
        self.seqs[sid] = _Seq()
        return ids

    # -- forward -------------------------------------------------------------------------------------------
    def prefill(
        self, sid: int, ids: Sequence[int], *, all_logits: bool = False, draw: Draw | None = None
    ) -> np.ndarray | int:
        """Feed `ids` to sequence `sid`. Returns logits of the last token [V] (or of every token [n, V]:
        `batch_verify`, which returns every row), or with `draw` (device sampling) the token drawn there."""
        ids = list(ids)
        if not ids:
            raise ValueError("empty prompt")
        self._check_room(sid, len(ids))
        skip = 0  # rows of re-encoded old tokens, not returned
        if self._crosses_longrope_switch(sid, len(ids)):
            skip = self.seqs[sid].length
            ids = self._reencode(sid, ids)
        seq = self.seqs[sid]
        outs = []
        upload = self.sampler.upload(1, [(0, draw)]) if self._on_device(draw) else None
        for off, n in self.prefill_pieces(seq.length, len(ids)):
            emb = self._embed(ids[off : off + n], (1, n))
            self._begin(self.kv, ShapeTuple([sid]), ShapeTuple([n]))
            fn = self._fn["batch_verify"] if all_logits else self._fn["prefill"]
            logits, self.kv = fn(emb, self.kv, self.params)
            self._end(self.kv)
            if all_logits or off + n == len(ids):
                outs.append(logits if self._on_device(draw) else self._host(logits).reshape(-1, self.vocab))
        seq.length += len(ids)
        seq.tokens.extend(ids)
        if all_logits:
            return np.concatenate(outs)[skip:]
        return self.sampler.sample(outs[-1], [(0, draw)], upload)[0] if upload is not None else outs[-1][-1]

    def prefill_batch(self, sids: Sequence[int], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Several sequences in one `batch_prefill` forward -> logits of each one's last token [b, V].
        Each prompt must fit one forward (at most the prefill chunk in all)."""
        prompts = [list(p) for p in prompts]
        if len(prompts) != len(sids) or any(not p for p in prompts):
            raise ValueError("one non-empty prompt per sequence")
        for s, p in zip(sids, prompts):
            self._check_room(s, len(p))
            if self._crosses_longrope_switch(s, len(p)):
                raise ValueError(f"sequence {s} crosses the LongRoPE switch: prefill it on its own")
        total = sum(len(p) for p in prompts)
        if total > self.prefill_chunk:
            raise ValueError(f"{total} tokens exceed the prefill chunk ({self.prefill_chunk})")
        ends = np.cumsum([len(p) for p in prompts]).astype("int32") - 1
        emb = self._embed([t for p in prompts for t in p], (1, total))
        self._begin(self.kv, ShapeTuple(list(sids)), ShapeTuple([len(p) for p in prompts]))
        logits, self.kv = self._fn["batch_prefill"](emb, self._tensor(ends), self.kv, self.params)
        self._end(self.kv)
        for s, p in zip(sids, prompts):
            self.seqs[s].length += len(p)
            self.seqs[s].tokens.extend(p)
        return self._host(logits).reshape(len(sids), self.cfg.vocab_size)

    def prefill_pieces(self, start: int, n: int) -> list[tuple[int, int]]:
        """Split `n` tokens fed after `start` cached ones into (offset, size) forward calls of at most the
        prefill chunk (the server's scheduler feeds a prompt piece by piece, the same pieces). With LongRoPE,
        a prompt that ends past original_max reaches past it in its first forward, so that every token takes
        the long factors as in HF's single forward (the chunk is sized for it)."""
        chunk, lr = self.prefill_chunk, self.cfg.longrope
        pieces, off = [], 0
        while off < n:
            size = min(chunk, n - off)
            if off == 0 and lr is not None and start + n > lr.original_max_position_embeddings:
                size = min(n, max(size, lr.original_max_position_embeddings + 1 - start))
            pieces.append((off, size))
            off += size
        return pieces

    def decode(self, sid: int, token: int, draw: Draw | None = None) -> np.ndarray | int:
        """Feed one token -> the logits after it [V], or with `draw` (device sampling) the token drawn."""
        if self.seqs[sid].length + 1 > self.context_window or self._crosses_longrope_switch(sid, 1):
            # the error, or the re-encode at the switch
            return self.decode_batch([sid], [token], None if draw is None else [draw])[0]
        # the per-token path, kept short: on a GPU every microsecond here is one the GPU idles
        upload = self.sampler.upload(1, [(0, draw)]) if self._on_device(draw) else None
        if upload is not None and upload.adjust is None and "decode" in self._fused:
            return self._fused_step("decode", [sid], [int(token)], upload)[0]
        emb = self._embed([token], (1, 1))
        self._begin(self.kv, ShapeTuple([sid]), self._one)
        logits, self.kv = self._fn["decode"](emb, self.kv, self.params)
        self._end(self.kv)
        self._fed([sid], [int(token)])
        if upload is not None:
            return self.sampler.sample(logits, [(0, draw)], upload)[0]
        return self._host(logits).reshape(self.vocab)

    def _fused_step(self, fwd: str, sids: list[int], tokens: list[int], upload: Upload) -> list[int]:
        """One token into each sequence and one drawn from each, in one library call (the forward's fused
        step): only the ids and the draws' params go to the device, only the drawn ids come back."""
        b = len(sids)
        ids = self._put_ids(tokens)
        self._begin(self.kv, ShapeTuple(sids), self._one if b == 1 else ShapeTuple([1] * b))
        drawn, self.kv = self._fused[fwd](ids, self.kv, upload.params, self.params)
        self._end(self.kv)
        self._fed(sids, tokens)
        return [int(t) for t in drawn.numpy()]

    def _fed(self, sids: Sequence[int], tokens: Sequence[int]) -> None:
        """One token more in each sequence's cache."""
        for s, t in zip(sids, tokens):
            self.seqs[s].length += 1
            self.seqs[s].tokens.append(t)

    def decode_batch(
        self, sids: Sequence[int], tokens: Sequence[int], draws: Sequence[Draw | None] | None = None
    ) -> np.ndarray | list[np.ndarray | int]:
        """One token for each sequence in one forward (`decode` for one, `batch_decode` for several, as MLC's
        engine picks) -> logits [b, V]. With `draws` (device sampling), a list: the token drawn for each
        sequence with a Draw, its logits [V] for each with None. A sequence at the LongRoPE switch is
        re-encoded on its own first."""
        sids, tokens = list(sids), [int(t) for t in tokens]
        picks = list(draws) if draws is not None else [None] * len(sids)
        if len(picks) != len(sids):
            raise ValueError("one draw (or None) per sequence")
        for s in sids:
            self._check_room(s, 1)
        out: list = [None] * len(sids)
        crossing = [i for i, s in enumerate(sids) if self._crosses_longrope_switch(s, 1)]
        for i in crossing:
            out[i] = self.prefill(sids[i], [tokens[i]], draw=picks[i])
        rest = [i for i in range(len(sids)) if i not in crossing]
        if rest:
            b = len(rest)
            fwd = "decode" if b == 1 else "batch_decode"
            rest_sids, rest_tokens = [sids[i] for i in rest], [tokens[i] for i in rest]
            on_device = [(j, i) for j, i in enumerate(rest) if self._on_device(picks[i])]
            upload = self.sampler.upload(b, [(j, picks[i]) for j, i in on_device]) if on_device else None
            if len(on_device) == b and upload.adjust is None and fwd in self._fused:
                for i, tok in zip(rest, self._fused_step(fwd, rest_sids, rest_tokens, upload)):
                    out[i] = tok
                return out
            emb = self._embed(rest_tokens, (b, 1))
            self._begin(self.kv, ShapeTuple(rest_sids), ShapeTuple([1] * b))
            logits, self.kv = self._fn[fwd](emb, self.kv, self.params)
            self._end(self.kv)
            if on_device:
                drawn = self.sampler.sample(logits, [(j, picks[i]) for j, i in on_device], upload)
                for (_, i), tok in zip(on_device, drawn):
                    out[i] = tok
            if len(on_device) < b:
                rows = self._host(logits).reshape(b, self.vocab)
                for j, i in enumerate(rest):
                    if out[i] is None:
                        out[i] = rows[j]
            self._fed(rest_sids, rest_tokens)
        return out if draws is not None else np.stack(out).astype("float32", copy=False)

    @property
    def vocab(self) -> int:
        return self.cfg.vocab_size

    def _on_device(self, draw: Draw | None) -> bool:
        return draw is not None and self.sampler is not None


class ContextFullError(Exception):
    """The sequence would outgrow the compiled context window."""


def load_engine(
    model: str | ModelSource | None = None,
    *,
    quantization: str | None = None,
    device: str = "host",
    threads: int | None = None,
    cache: CacheOptions | None = None,
    allow_pickle: bool = False,
    kv_cache: str | None = None,
    device_sampling: bool = False,
):
    """Open a model (HF folder, GGUF, converter output, or None = the embedded default; or take a source the
    caller opened), compile it for the device preset on first use (cached), load its weights and return
    (Engine, ModelSource). `kv_cache` overrides a CPU preset's KV cache dtype; `device_sampling` draws tokens
    with the library's sampler functions (GPU presets) instead of on the host."""
    from ..checkpoint import ModelSource, open_model
    from ..compile.compile_model import compiled_for, is_compiled
    from ..quantization import quantization_for
    from ..targets import load_preset
    from .weights import converting_alongside, load_params

    # opening parses the whole header (a GGUF's vocabulary): once per load
    source = model if isinstance(model, ModelSource) else open_model(model, allow_pickle=allow_pickle)
    if source.kind == "mlc":
        if quantization and quantization != source.scheme.name:
            raise ValueError(f"{source.path} holds {source.scheme.name} weights, not {quantization}")
        quantization = source.scheme.name
    quantization = quantization_for(source, quantization)
    preset = load_preset(device)
    if kv_cache is not None:
        preset = preset.with_kv_cache(kv_cache)
    dev = open_device(preset)
    if preset.kind == "opencl":  # an fp16 library on PoCL would fail only at its first kernel build
        from ..quantization import fp32_twin, get_scheme
        from .opencl_caps import check_fp16

        check_fp16(
            dev.device_name, quantization, get_scheme(quantization).model_dtype, fp32_twin(quantization)
        )
    if is_compiled(source.config, quantization, preset):
        compiled = compiled_for(source.config, quantization, preset)  # weights convert (if new) on load
    else:
        with converting_alongside(source, quantization):  # a first run converts while it compiles
            compiled = compiled_for(source.config, quantization, preset)
    size_thread_pool(threads)  # None: one per physical core
    lib = tvm.runtime.load_module(str(compiled.library))
    # decode streams the weights: on the host 2 MiB pages read faster than 4 KiB ones (hugepages.py)
    params = load_params(source, compiled, dev, huge_pages=preset.kind == "llvm")
    eng = Engine(
        lib,
        params,
        source.config,
        dtype=compiled.manifest["dtype"],
        device=dev,
        cache=cache,
        device_sampling=device_sampling,
    )
    eng.compiled = compiled
    return eng, source


def _check_amx_tiles(preset) -> None:
    """A library whose prefill runs on AMX tiles needs the OS to grant them (Linux 5.16+, and no seccomp
    filter against arch_prctl); else its first prefill dies in the kernel's own check. Asked before any
    compile."""
    from ..compile.cpu_isa import host_kernel_isas
    from ..errors import UserError
    from ..hostinfo import amx_tiles_granted

    if host_kernel_isas(preset.target, preset.q4_activations)["q4_gemm"] != "int8-amx":
        return
    if amx_tiles_granted() is False:
        raise UserError(
            f"cannot run '{preset.spec}' here: the OS refused this process the AMX tile registers its "
            "prefill kernels use (Linux grants them from 5.16); compile for a CPU without AMX, e.g. "
            "--device host:icelake-server"
        )


def open_device(preset) -> tvm.runtime.Device:
    """The device a preset's library runs on here: the CPU, CUDA, or Vulkan / OpenCL through TVM's own
    runtimes built as plugins (`phi3 runtime build`); UserError when this machine cannot run it."""
    from ..errors import UserError

    if not preset.is_gpu:
        if preset.missing_features:  # its first kernel would die of SIGILL
            raise UserError(
                f"cannot run '{preset.spec}' here: this CPU lacks {', '.join(preset.missing_features)}; "
                f"use `phi3 compile --device {preset.spec}` and deploy the library"
            )
        _check_amx_tiles(preset)
        return tvm.cpu()
    if preset.kind == "cuda":
        if not tvm.cuda().exist:  # else the library's CUDA module fails to load, a traceback
            raise UserError(
                f"cannot run '{preset.name}' here: no CUDA GPU on this machine; "
                f"use `phi3 compile --device {preset.name}` and deploy the library"
            )
        return tvm.cuda()
    if preset.kind in ("vulkan", "opencl"):
        import platform

        host = (preset.host_triple or "").split("-")[0]
        if host and host != platform.machine():
            raise UserError(
                f"cannot run '{preset.name}' here: its host code is {host}, this machine is "
                f"{platform.machine()}; use the '{preset.kind}' preset to run its kernels here"
            )
        from .plugins import require_device

        return require_device(preset.kind)
    raise UserError(
        f"cannot run '{preset.name}' here: use `phi3 compile --device {preset.name}` and deploy the library"
    )
