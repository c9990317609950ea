"""The Python API: load a model, generate / stream text, hold chat sessions, convert weights, compile
libraries. The CLI and the server use it.

    import toolkit.api as phi3
    m = phi3.load()                                   # the embedded SmolLM2; or a HF folder, .gguf, converted
    print(m.generate("What is the capital of France?", temperature=0, max_tokens=16).text)
    for piece in m.stream([{"role": "user", "content": "Hi"}], max_tokens=32):
        print(piece, end="")
    chat = m.chat(system="Be brief.")
    chat.send("Hello")                                # the KV cache is reused across turns

Sampling options are `GenerationOptions` fields (max_tokens, temperature, top_p, top_k, min_p,
repetition_penalty, frequency_penalty, presence_penalty, stop, logit_bias, seed), validated in one place;
the model's generation_config.json supplies the defaults. A Model is not thread-safe: one call at a time
(`phi3 serve` batches concurrent requests on one engine thread).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .runtime.options import GenerationOptions
from .runtime.request import Generation, Step, draw_for
from .tvm_compat import tvm_without_torch

# the API's first `import tvm` skips torch as the `phi3` command's does (tvm_compat.py); no effect where the
# caller imported torch or TVM first
tvm_without_torch()

if TYPE_CHECKING:
    from .runtime.device_sampling import Draw
    from .runtime.engine import Engine

# the runtime's engine (and with it TVM, ~170 MB of RSS) loads only when a model runs; `convert` never does
_RUNTIME_NAMES = {
    "CacheOptions": "engine",
    "ContextFullError": "engine",
    "Engine": "engine",
    "PromptTooLongError": "generate",
}


def __getattr__(name: str) -> Any:
    if name not in _RUNTIME_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".runtime.{_RUNTIME_NAMES[name]}", __package__), name)


Messages = Sequence[dict[str, Any]]
DEFAULT_CONTEXT_WINDOW = 4096


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (stop token or string) or "length" (max_tokens, context window)
    prompt_tokens: int
    completion_tokens: int


class Model:
    """A loaded model: engine + tokenizer + chat template + generation defaults."""

    def __init__(self, engine: Engine, source: Any, defaults: GenerationOptions | None = None) -> None:
        from .runtime.prompts import PromptFormat

        self.engine, self.source = engine, source
        self.tokenizer = source.tokenizer()
        self.prompts = PromptFormat.for_source(source, self.tokenizer)
        self.defaults = defaults or self.prompts.generation_defaults()
        self.name = source.path.name

    # -- options and prompts -----------------------------------------------------------------------------
    def options(self, options: GenerationOptions | None = None, **changes: Any) -> GenerationOptions:
        """`options` (default: the model's defaults) with `changes`, validated."""
        o = (options or self.defaults).replace(**changes)
        o.check_vocab(self.source.config.vocab_size)
        return o

    def prompt_ids(
        self, prompt: str | Messages, *, raw: bool = False, system: str | None = None
    ) -> list[int]:
        """Token ids for a prompt: a string is a user message (sent as is with `raw`), a list is a chat."""
        if isinstance(prompt, str):
            if raw:
                ids = self.tokenizer.encode(prompt)
                if not ids:
                    from .runtime.prompts import no_tokens

                    raise no_tokens(prompt)
                return ids
            prompt = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
        return self.prompts.encode(list(prompt), add_generation_prompt=True)

    def new_generation(self, ids: list[int], options: GenerationOptions) -> Generation:
        from .runtime.generate import PromptTooLongError

        if len(ids) > self.engine.context_window:
            raise PromptTooLongError(
                f"the prompt is {len(ids)} tokens; the context window is {self.engine.context_window} tokens"
            )
        return Generation(ids, options, self.tokenizer, self.prompts.stop_ids, self.engine.context_window)

    # -- one-shot ------------------------------------------------------------------------------------------
    def stream_steps(
        self, prompt: str | Messages, *, raw: bool = False, system: str | None = None, **opts: Any
    ) -> tuple[Generation, Generator[Step, None, None]]:
        """The `Generation` and an iterator of its `Step`s, on a fresh sequence removed at the end."""
        gen = self.new_generation(self.prompt_ids(prompt, raw=raw, system=system), self.options(**opts))
        return gen, _on_new_sequence(self.engine, gen)

    def stream(self, prompt: str | Messages, **kw: Any) -> Iterator[str]:
        """Text pieces as they are generated (whole characters only). Closing it early frees the sequence."""
        _, steps = self.stream_steps(prompt, **kw)
        try:
            for st in steps:
                if st.text:
                    yield st.text
        finally:
            steps.close()  # not left to the garbage collector: the sequence goes now

    def generate(self, prompt: str | Messages, **kw: Any) -> Completion:
        gen, steps = self.stream_steps(prompt, **kw)
        text = "".join(st.text for st in steps)
        return Completion(text, gen.finish_reason or "length", len(gen.prompt), len(gen.tokens))

    def chat(self, system: str | None = None) -> Chat:
        return Chat(self, system)


class Chat:
    """A conversation whose tokens stay in one KV-cache sequence across turns (only the new turn is
    prefilled). A reply cut short (the stream closed, Ctrl-C) is kept as far as it got."""

    def __init__(self, model: Model, system: str | None = None) -> None:
        self.model, self.system = model, system
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.seq: int | None = None
        self.last: Generation | None = None

    def stream(self, text: str, **opts: Any) -> Iterator[str]:
        from .runtime.engine import ContextFullError
        from .runtime.generate import PromptTooLongError

        m = self.model
        options = m.options(**opts)
        self.messages.append({"role": "user", "content": text})
        try:
            gen = m.new_generation(m.prompts.encode(self.messages, add_generation_prompt=True), options)
            if self.seq is None:
                self.seq = m.engine.add_sequence()
            steps = _run(m.engine, self.seq, gen)
            first = next(steps)  # prefill happens here: a prompt that does not fit raises before any reply
        except (PromptTooLongError, ContextFullError) as e:
            self.messages.pop()  # an unanswered message would overflow the next turn too
            raise PromptTooLongError(str(e)) from None
        self.last = gen
        pieces: list[str] = []
        try:
            for st in _chain(first, steps):
                pieces.append(st.text)
                if st.text:
                    yield st.text
        except KeyboardInterrupt:
            # it may have landed inside a forward: the cache no longer matches its bookkeeping, so the next
            # turn starts from a fresh sequence (a full prefill of the conversation)
            self._drop_cache()
            raise
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def send(self, text: str, **opts: Any) -> str:
        return "".join(self.stream(text, **opts))

    def _drop_cache(self) -> None:
        if self.seq is not None and self.seq in self.model.engine.seqs:
            self.model.engine.remove_sequence(self.seq)
        self.seq = None

    def reset(self) -> None:
        self._drop_cache()
        self.last = None
        self.messages = [{"role": "system", "content": self.system}] if self.system else []


def _chain(first: Step, rest: Iterator[Step]) -> Iterator[Step]:
    yield first
    yield from rest


def _on_new_sequence(engine: Engine, gen: Generation) -> Generator[Step, None, None]:
    sid = engine.add_sequence()
    try:
        yield from _run(engine, sid, gen)
    finally:
        engine.remove_sequence(sid)  # also when the caller stops early: its KV pages go back to the pool


def _run(engine: Engine, sid: int, gen: Generation) -> Iterator[Step]:
    """Feed the prompt (reusing what the sequence already caches), then decode until `gen` finishes."""

    out = feed(engine, sid, gen.prompt, draw_for(engine, gen))
    while True:
        st = gen.step(out)
        yield st
        if st.finish_reason:
            return
        out = engine.decode(sid, gen.last_token, draw_for(engine, gen))


def feed(engine: Engine, sid: int, ids: list[int], draw: Draw | None = None):
    """Bring sequence `sid` to hold `ids`: keep the common prefix, drop what diverged, prefill the rest;
    returns the logits of the last token (with `draw`, the token drawn from them on the device)."""
    cached = engine.seqs[sid].tokens
    common = 0
    for a, b in zip(cached, ids):
        if a != b:
            break
        common += 1
    common = min(common, len(ids) - 1)  # the last token is always fed: its logits are needed
    if common < len(cached):
        engine.popn(sid, len(cached) - common)
    return engine.prefill(sid, ids[common:], draw=draw)


def load(
    model: str | None = None,
    *,
    device: str = "host",
    quantization: str | None = None,
    threads: int | None = None,
    context_window: int = DEFAULT_CONTEXT_WINDOW,
    max_batch_size: int = 4,
    prefill_chunk: int | None = None,
    allow_pickle: bool = False,
    device_sampling: bool = False,
) -> Model:
    """Open MODEL (HF folder, .gguf, converted folder; None = the embedded SmolLM2), compile it for
    `device` on first use (cached) and load it. `max_batch_size` bounds the sequences alive at once
    (chat sessions, streams, server requests); `context_window` the tokens of each; `prefill_chunk` the
    tokens of one prefill forward (default 256; at most the library's prefill_chunk_size);
    `device_sampling` (GPU presets) draws greedy, temperature, top-k/p and min-p tokens on the device."""
    from .checkpoint import open_model
    from .checkpoint.mlc_format.model_config import default_window_sizes
    from .runtime.engine import CacheOptions, load_engine

    if context_window < 1 or max_batch_size < 1 or (prefill_chunk is not None and prefill_chunk < 1):
        raise UserError("context_window, max_batch_size and prefill_chunk must be positive")
    check_device_sampling(device, device_sampling)
    src = open_model(model, allow_pickle=allow_pickle)
    if src.kind == "mlc" and quantization and quantization != src.scheme.name:
        raise UserError(f"holds {src.scheme.name} weights, not {quantization}; drop quantization", src.path)
    cache = CacheOptions(max_batch_size=max_batch_size, context_window=context_window)
    if prefill_chunk is not None:
        # the library is compiled with MLC's default sizes: MLC's engine never feeds it more than this at once
        limit = default_window_sizes(src.config, None, None)[1]
        if prefill_chunk > limit:
            raise UserError(f"--prefill-chunk {prefill_chunk} exceeds the library's prefill chunk ({limit})")
        cache.prefill_chunk = prefill_chunk
    engine, source = load_engine(
        src,
        quantization=quantization,
        device=device,
        threads=threads,
        cache=cache,
        allow_pickle=allow_pickle,
        device_sampling=device_sampling,
    )
    return Model(engine, source)


def check_device_sampling(device: str, device_sampling: bool) -> None:
    """Only GPU presets' libraries carry the sampler functions (compile/attach_sampling.py)."""
    from .targets import load_preset

    if device_sampling and not load_preset(device).is_gpu:
        raise UserError(f"--sample-on device needs a GPU preset, not --device {device}")


def compile(  # noqa: A001 - the verb users know from `phi3 compile`
    model: str | None,
    output: str,
    *,
    device: str = "host",
    quantization: str | None = None,
    cuda_graph: bool = False,
):
    """Compile MODEL's graph (no weights needed) for `device` into folder `output` (library + manifest):
    `phi3 compile`. Returns the CompiledModel."""
    from .checkpoint import open_model
    from .compile.compile_model import check_compile_output, compile_model
    from .outputs import model_input_path
    from .quantization import quantization_for
    from .targets import load_preset

    if cuda_graph and load_preset(device).kind != "cuda":  # before any work
        raise UserError(f"--cuda-graph needs a CUDA preset (cuda-sm*), not --device {device}")
    check_compile_output(output, inputs=[model_input_path(model)])  # never the input
    source = open_model(model)
    check_scheme(source, quantization)
    return compile_model(
        source.config, quantization_for(source, quantization), device, output, cuda_graph=cuda_graph
    )


def convert(
    model: str | None,
    output: str,
    *,
    quantization: str | None = None,
    allow_pickle: bool = False,
    **options: Any,
):
    """Convert MODEL's weights into MLC-LLM's folder format at `output` (`phi3 convert`): a GGUF keeps its
    own blocks unless `quantization` says otherwise. `options` go to `convert.converter.convert` (clip,
    progress, context_window_size, prefill_chunk_size, param_names). Returns the ConvertResult."""
    from .checkpoint import open_model
    from .convert.converter import check_convert_output
    from .convert.converter import convert as run_convert
    from .outputs import model_input_path
    from .quantization import quantization_for

    check_convert_output(output, inputs=[model_input_path(model)])  # before any work
    source = open_model(model, allow_pickle=allow_pickle)
    return run_convert(source, quantization_for(source, quantization, keep_native=True), output, **options)


def check_scheme(source, quantization: str | None) -> None:
    """A converted folder is one scheme: a different one is an error naming the folder."""
    if source.kind == "mlc" and quantization and quantization != source.scheme.name:
        raise UserError(
            f"holds {source.scheme.name} weights, not {quantization}; drop -q or convert again", source.path
        )
