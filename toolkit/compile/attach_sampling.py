"""Add the functions MLC-LLM's serving engine looks up next to the model: softmax with temperature, the logit
processors, the GPU sampler and the embedding-buffer allocator.

Names, argument lists, shapes, dtypes and return values follow mlc-ai/mlc-llm at commit
79d603f085f50500e9509fa01785ffa7ecfaaa93 (callers: cpp/serve/function_table.cc, logit_processor.cc,
sampler/gpu_sampler.cc; attached there by python/mlc_llm/compiler_pass/attach_*.py). The computations are
our own: Relax/TE graphs that our pipeline lowers and schedules like the model (dlight on GPUs), plus
pre-scheduled TIR where a kernel needs control flow (logit processors, draft verification).

Which target gets what (as MLC's engine expects):
- every target: `softmax_with_temperature`, the three `apply_*_inplace` processors (plain loops on llvm,
  thread-bound kernels on GPUs) and `alloc_embedding_tensor`;
- cuda, metal, vulkan, webgpu: the GPU sampler (`multinomial_from_uniform`, `argsort_probs`,
  `sample_with_top_p`, `sampler_take_probs`, `renormalize_by_top_p`, `sampler_verify_draft_tokens`), and
  our engine's own `sample_tokens` and `adjust_logits` (runtime/device_sampling.py: one call per step,
  drawing as the host sampler draws, after its bias and penalties; MLC's engine never looks them up).
  WebGPU leaves out `sampler_verify_draft_tokens`: its tree walk synchronises threads inside a loop whose
  trip count is read from memory, which WGSL's uniformity rules reject (MLC's web build leaves it out too).
"""

from __future__ import annotations

import tvm
from tvm import IRModule, relax, te, tirx

from .adjust_logits import NAME as ADJUST
from .adjust_logits import adjust_logits
from .gpu_sort import emit_argsort
from .logit_processor import logit_processors
from .prefix_sum import prefix_sum
from .sampling_cut import PARAM_ROWS, sampling_cut
from .spec_verify import emit_verify_function

GPU_SAMPLER_KINDS = ("cuda", "metal", "vulkan", "webgpu")
GPU_SAMPLER_NAMES = (
    "multinomial_from_uniform",
    "argsort_probs",
    "sample_with_top_p",
    "sampler_take_probs",
    "renormalize_by_top_p",
    "sampler_verify_draft_tokens",
)
# our engine's (runtime/device_sampling.py), attached wherever the GPU sampler is
ENGINE_SAMPLER_NAMES = ("sample_tokens", ADJUST)
# temperatures at or below this mean greedy (MLC's softmax kernel uses the same threshold)
GREEDY_TEMPERATURE = 1e-5
# top_p this close to 1 keeps the distribution unchanged (MLC's top-p pivot search uses the same bound)
TOP_P_KEEP_ALL = 1e-7
F32 = "float32"
I32 = "int32"


def sampler_names(target: tvm.target.Target, include: bool | None = None) -> tuple[str, ...]:
    """The GPU sampler functions attached for `target`; `include` True forces the Relax-graph ones onto any
    target (tests run them on llvm), False leaves all out."""
    kind = target.kind.name
    if include is None:
        include = kind in GPU_SAMPLER_KINDS
    if not include:
        return ()
    if kind not in GPU_SAMPLER_KINDS or kind == "webgpu":  # the thread-cooperative tree walk: see above
        return (
            tuple(n for n in GPU_SAMPLER_NAMES if n != "sampler_verify_draft_tokens") + ENGINE_SAMPLER_NAMES
        )
    return GPU_SAMPLER_NAMES + ENGINE_SAMPLER_NAMES


def attach_sampling_functions(
    mod: IRModule,
    target: tvm.target.Target,
    *,
    vocab_size: int,
    hidden_size: int,
    dtype: str,
    prefill_chunk_size: int,
    gpu_sampler: bool | None = None,
) -> IRModule:
    """The exported model module plus the engine's sampling functions for `target`.

    `hidden_size`/`dtype` shape the embedding buffer (`embed`'s output), `prefill_chunk_size` its rows (the
    library's `_metadata` value, which the engine sizes its prefill chunks by).
    Batch sizes stay symbolic: the engine passes as many rows as it has. `gpu_sampler` overrides which
    targets get the GPU sampler (default: cuda, metal, vulkan, webgpu, as MLC's engine looks it up)."""
    bb = relax.BlockBuilder(mod)
    _softmax_with_temperature(bb, vocab_size)
    _alloc_embedding_tensor(bb, prefill_chunk_size, hidden_size, dtype)
    builders = {
        "multinomial_from_uniform": _multinomial_from_uniform,
        "argsort_probs": _argsort_probs,
        "sample_with_top_p": _sample_with_top_p,
        "sampler_take_probs": _sampler_take_probs,
        "renormalize_by_top_p": _renormalize_by_top_p,
        "sampler_verify_draft_tokens": emit_verify_function,
        "sample_tokens": _sample_tokens,
        # the engine's bias and penalties before its draw: a kernel, called on the logits in place
        ADJUST: lambda bb, _vocab, target: bb.add_func(adjust_logits(target), ADJUST),
    }
    names = sampler_names(target, gpu_sampler)
    for name in names:
        builders[name](bb, vocab_size, target)
    out = bb.finalize()
    for name, func in logit_processors(target).items():
        out[name] = func
    return out


def _on_gpu(target: tvm.target.Target) -> bool:
    """GPU targets sort with our bitonic kernels (gpu_sort.py says why not TVM's); llvm with TVM's sort."""
    return target.kind.name not in ("llvm", "c")


def _prefix_sum(bb: relax.BlockBuilder, x: relax.Expr, vocab: int, target, exclusive: bool = False):
    """Running sums along the rows of x f32[b, v] (prefix_sum.py), inside a dataflow block of `bb`."""
    name = "prefix_sum_exclusive" if exclusive else "prefix_sum"
    gv = bb.add_func(prefix_sum(vocab, target, exclusive), name)
    return bb.emit(relax.call_tir(gv, [x], out_ty=relax.TensorType([x.ty.shape[0], vocab], F32)))


def _var(name: str) -> tirx.Var:
    return tirx.Var(name, "int64")


def _tensor(name: str, shape: list, dtype: str) -> relax.Var:
    return relax.Var(name, relax.TensorType(shape, dtype))


# -- softmax with temperature ---------------------------------------------------------------------------
def _softmax_te(logits: te.Tensor, temperature: te.Tensor):
    """Row softmax of logits / T; rows with T <= 1e-5 get the argmax set, each maximum 1 / (their count)."""
    rows, _one, vocab = logits.shape
    sampled = lambda i: temperature[i] > tirx.const(GREEDY_TEMPERATURE, F32)  # noqa: E731
    scaled = te.compute(
        (rows, vocab),
        lambda i, j: tirx.Select(sampled(i), logits[i, 0, j] / temperature[i], logits[i, 0, j]),
        name="scaled",
    )
    k = te.reduce_axis((0, vocab), name="k")
    row_max = te.compute((rows,), lambda i: te.max(scaled[i, k], axis=k), name="row_max")
    weight = te.compute(
        (rows, vocab),
        lambda i, j: tirx.Select(
            sampled(i),
            te.exp(scaled[i, j] - row_max[i]),
            (scaled[i, j] == row_max[i]).astype(F32),
        ),
        name="weight",
    )
    k2 = te.reduce_axis((0, vocab), name="k2")
    total = te.compute((rows,), lambda i: te.sum(weight[i, k2], axis=k2), name="total")
    return te.compute((rows, 1, vocab), lambda i, _o, j: weight[i, j] / total[i], name="probs")


def _softmax_with_temperature(bb: relax.BlockBuilder, vocab: int) -> None:
    """softmax_with_temperature(logits f32[b, 1, v], temperature f32[b]) -> probs f32[b, 1, v]."""
    b = _var("batch_size")
    logits, temperature = _tensor("logits", [b, 1, vocab], F32), _tensor("temperature", [b], F32)
    with bb.function("softmax_with_temperature", [logits, temperature]):
        with bb.dataflow():
            probs = bb.emit_te(_softmax_te, logits, temperature, primfunc_name_hint="softmax_temperature")
            out = bb.emit_output(probs)
        bb.emit_func_output(out)


def _alloc_embedding_tensor(bb: relax.BlockBuilder, rows: int, hidden: int, dtype: str) -> None:
    """alloc_embedding_tensor() -> [prefill_chunk_size, hidden] in the model dtype, on the model's device:
    the engine gathers embeddings of a prefill chunk into it."""
    with bb.function("alloc_embedding_tensor", []):
        shape = relax.ShapeExpr([rows, hidden])
        out = bb.emit(relax.op.builtin.alloc_tensor(shape, dtype, runtime_device_index=0))
        bb.emit_func_output(out)


# -- GPU sampler ------------------------------------------------------------------------------------------
def _first_above(cumsum: te.Tensor, row, bound, scale=None, name: str = "count"):
    """Position of the first cumulative value above `bound` (cumsum / scale when given), capped at the last
    position: a count of the values at or below it, because cumulative sums only grow."""
    vocab = cumsum.shape[1]
    k = te.reduce_axis((0, vocab), name=f"{name}_k")

    def below(i):
        value = cumsum[row(i), k] if scale is None else cumsum[row(i), k] / scale(i)
        return te.sum((value <= bound(i)).astype(I32), axis=k)

    return below, vocab


def _multinomial_from_uniform(bb: relax.BlockBuilder, vocab: int, target: tvm.target.Target) -> None:
    """multinomial_from_uniform(probs f32[b, v], uniform_samples f32[n], sample_indices i32[n]) -> i32[n]:
    sample i draws from row sample_indices[i] the first token whose cumulative probability exceeds
    uniform_samples[i] (the last token if none does)."""
    b, n = _var("batch_size"), _var("num_samples")
    probs = _tensor("probs", [b, vocab], F32)
    uniform, rows = _tensor("uniform_samples", [n], F32), _tensor("sample_indices", [n], I32)

    def pick(cumsum: te.Tensor, u: te.Tensor, idx: te.Tensor):
        below, v = _first_above(cumsum, lambda i: idx[i], lambda i: u[i])
        count = te.compute(u.shape, below, name="count")
        return te.compute(u.shape, lambda i: te.min(count[i], v - 1).astype(I32), name="token")

    with bb.function("multinomial_from_uniform", [probs, uniform, rows]):
        with bb.dataflow():
            cumsum = _prefix_sum(bb, probs, vocab, target)
            out = bb.emit_output(bb.emit_te(pick, cumsum, uniform, rows, primfunc_name_hint="sample_token"))
        bb.emit_func_output(out)


def _argsort_probs(bb: relax.BlockBuilder, vocab: int, target: tvm.target.Target) -> None:
    """argsort_probs(probs f32[b, v]) -> (sorted_probs f32[b, v], sorted_indices i32[b, v]), descending."""
    b = _var("batch_size")
    probs = _tensor("probs", [b, vocab], F32)

    with bb.function("argsort_probs", [probs]):
        with bb.dataflow():
            values, order = _ranked(bb, probs, vocab, target)
            out = bb.emit_output(relax.Tuple([values, order]))
        bb.emit_func_output(out)


def _ranked(bb: relax.BlockBuilder, probs: relax.Expr, vocab: int, target: tvm.target.Target):
    """(probabilities descending, their token ids) per row."""
    if _on_gpu(target):
        return emit_argsort(bb, probs, vocab, target)

    def gather(p: te.Tensor, order: te.Tensor):
        return te.compute(p.shape, lambda i, j: p[i, order[i, j]], name="sorted_probs")

    order = bb.emit(relax.op.argsort(probs, axis=-1, descending=True, dtype=I32))
    return bb.emit_te(gather, probs, order, primfunc_name_hint="take_sorted_probs"), order


def _sample_with_top_p(bb: relax.BlockBuilder, vocab: int, target: tvm.target.Target) -> None:
    """sample_with_top_p(sorted_probs f32[b, v], sorted_indices i32[b, v], uniform_samples f32[n],
    sample_indices i32[n], top_p f32[b]) -> i32[n].

    Row r keeps its sorted prefix up to and including the first position whose cumulative probability
    reaches top_p[r] (mass m); sample i takes the first kept position whose cumulative probability / m
    exceeds uniform_samples[i], and returns the token id stored there."""
    b, n = _var("batch_size"), _var("num_samples")
    sorted_probs, sorted_ids = (
        _tensor("sorted_probs", [b, vocab], F32),
        _tensor("sorted_indices", [b, vocab], I32),
    )
    uniform, rows = _tensor("uniform_samples", [n], F32), _tensor("sample_indices", [n], I32)
    top_p = _tensor("top_p", [b], F32)

    def pick(cumsum: te.Tensor, ids: te.Tensor, u: te.Tensor, idx: te.Tensor, p: te.Tensor):
        # per sample, not per row: a separate per-row kernel trips dlight's GEMV rule (AssertionError)
        last = cumsum.shape[1] - 1
        k = te.reduce_axis((0, cumsum.shape[1]), name="k")
        kept = te.compute(
            u.shape, lambda i: te.sum((cumsum[idx[i], k] < p[idx[i]]).astype(I32), axis=k), name="kept"
        )
        mass = te.compute(u.shape, lambda i: cumsum[idx[i], te.min(kept[i], last)], name="mass")
        below, v = _first_above(cumsum, lambda i: idx[i], lambda i: u[i], lambda i: mass[i])
        count = te.compute(u.shape, below, name="position")
        return te.compute(u.shape, lambda i: ids[idx[i], te.min(count[i], v - 1)], name="token")

    with bb.function("sample_with_top_p", [sorted_probs, sorted_ids, uniform, rows, top_p]):
        with bb.dataflow():
            cumsum = _prefix_sum(bb, sorted_probs, vocab, target)
            token = bb.emit_te(
                pick, cumsum, sorted_ids, uniform, rows, top_p, primfunc_name_hint="top_p_token"
            )
            out = bb.emit_output(token)
        bb.emit_func_output(out)


def _sampler_take_probs(bb: relax.BlockBuilder, vocab: int, target: tvm.target.Target) -> None:
    """sampler_take_probs(unsorted_probs f32[b, v], sorted_indices i32[b, v], sample_indices i32[n],
    sampling_result i32[n], top_prob_offsets i32[m]) -> (sampled_values f32[n], top_prob_probs f32[m],
    top_prob_indices i32[m]).

    sampled_values[i] = probs[sample_indices[i], sampling_result[i]]; offset o = row * v + rank names the
    rank-th most likely token of a row: top_prob_indices = sorted_indices[row, rank] and top_prob_probs its
    probability."""
    b, n, m = _var("batch_size"), _var("num_samples"), _var("num_positions")
    probs, sorted_ids = _tensor("unsorted_probs", [b, vocab], F32), _tensor("sorted_indices", [b, vocab], I32)
    rows, results = _tensor("sample_indices", [n], I32), _tensor("sampling_result", [n], I32)
    offsets = _tensor("top_prob_offsets", [m], I32)

    def take(p: te.Tensor, ids: te.Tensor, idx: te.Tensor, res: te.Tensor, off: te.Tensor):
        # offsets are >= 0, so truncating division is exact; floor division of an int64 index made
        # WebGPU's int32 index narrowing fail on the constant it adds (2^31 + 2)
        v = tirx.const(vocab, I32)
        row, rank = lambda i: tirx.truncdiv(off[i], v), lambda i: tirx.truncmod(off[i], v)  # noqa: E731
        sampled = te.compute(idx.shape, lambda i: p[idx[i], res[i]], name="sampled_values")
        top_ids = te.compute(off.shape, lambda i: ids[row(i), rank(i)], name="top_prob_indices")
        top_probs = te.compute(off.shape, lambda i: p[row(i), top_ids[i]], name="top_prob_probs")
        return [sampled, top_probs, top_ids]

    with bb.function("sampler_take_probs", [probs, sorted_ids, rows, results, offsets]):
        with bb.dataflow():
            out = bb.emit_te(take, probs, sorted_ids, rows, results, offsets, primfunc_name_hint="take_probs")
            out = bb.emit_output(out)
        bb.emit_func_output(out)


def _renormalize_by_top_p(bb: relax.BlockBuilder, vocab: int, target: tvm.target.Target) -> None:
    """renormalize_by_top_p(probs f32[b, v], top_p f32[b], init_pivots f32[b, 3]) -> f32[b, v].

    Keeps every probability >= the cutoff c, where c is the smallest value of the shortest most-likely
    prefix whose mass reaches top_p (ties with c kept too), and divides the kept ones by their sum; rows with
    top_p >= 1 - 1e-7 are returned unchanged. `init_pivots` are the engine's starting guesses for MLC's
    pivot search; computing the cutoff from a sort needs no guesses, so they are accepted and unused."""
    b = _var("batch_size")
    probs, top_p = _tensor("probs", [b, vocab], F32), _tensor("top_p", [b], F32)
    pivots = _tensor("init_pivots", [b, 3], F32)

    def renorm(p: te.Tensor, sorted_p: te.Tensor, before: te.Tensor, tp: te.Tensor):
        rows, v = p.shape
        k = te.reduce_axis((0, v), name="k")
        count = te.compute((rows,), lambda r: te.sum((before[r, k] < tp[r]).astype(I32), axis=k), name="kept")
        cutoff = te.compute((rows,), lambda r: sorted_p[r, te.max(count[r], 1) - 1], name="cutoff")
        k2 = te.reduce_axis((0, v), name="k2")
        mass = te.compute(
            (rows,),
            lambda r: te.sum(tirx.Select(p[r, k2] >= cutoff[r], p[r, k2], tirx.const(0, F32)), axis=k2),
            name="mass",
        )
        keep_all = lambda r: tp[r] >= tirx.const(1 - TOP_P_KEEP_ALL, F32)  # noqa: E731
        return te.compute(
            (rows, v),
            lambda r, j: tirx.Select(
                keep_all(r),
                p[r, j],
                tirx.Select(p[r, j] >= cutoff[r], p[r, j] / mass[r], tirx.const(0, F32)),
            ),
            name="renormalized",
        )

    with bb.function("renormalize_by_top_p", [probs, top_p, pivots]):
        with bb.dataflow():
            if _on_gpu(target):
                sorted_p, _order = emit_argsort(bb, probs, vocab, target)
            else:
                sorted_p = bb.emit(relax.op.sort(probs, axis=-1, descending=True))
            # the mass ranked above each
            before = _prefix_sum(bb, sorted_p, vocab, target, exclusive=True)
            out = bb.emit_te(renorm, probs, sorted_p, before, top_p, primfunc_name_hint="top_p_renormalize")
            out = bb.emit_output(out)
        bb.emit_func_output(out)


# -- the engine's own: one call per step ---------------------------------------------------------------------
# rows of their `params` argument: one host-to-device copy per step carries them all
TEMPERATURE, UNIFORM = 0, 1  # then sampling_cut's: top_p, top_k, min_p


def _draw_in_id_order(kept_cumsum: te.Tensor, params: te.Tensor):
    """Per row: the first token (in id order) whose running sum / the row's total exceeds the row's uniform
    number, capped at the last token. Dividing by the total (x / x is exactly 1) keeps u < 1 on a token with
    probability even where float32 sums fall short of 1, and a zero-probability token never comes first (its
    sum equals the one before it)."""
    rows, vocab = kept_cumsum.shape
    k = te.reduce_axis((0, vocab), name="k")
    u = lambda r: params[UNIFORM, r]  # noqa: E731
    below = te.compute(
        (rows,),
        lambda r: te.sum((kept_cumsum[r, k] / kept_cumsum[r, vocab - 1] <= u(r)).astype(I32), axis=k),
        name="below",
    )
    return te.compute((rows,), lambda r: te.min(below[r], vocab - 1).astype(I32), name="token")


def _probs(bb: relax.BlockBuilder, logits: relax.Expr, params: relax.Expr, b, vocab: int) -> relax.Expr:
    """softmax(logits / T) as [b, v]: the same kernel as softmax_with_temperature (T <= 1e-5: greedy)."""

    # temperatures as their own [b] tensor: the same softmax kernel as softmax_with_temperature's
    row = bb.emit(relax.op.strided_slice(params, axes=[0], begin=[TEMPERATURE], end=[TEMPERATURE + 1]))
    temperature = bb.emit(relax.op.reshape(row, relax.ShapeExpr([b])))
    probs = bb.emit_te(_softmax_te, logits, temperature, primfunc_name_hint="softmax_temperature")
    return bb.emit(relax.op.reshape(probs, relax.ShapeExpr([b, vocab])))


def _sample_tokens(bb: relax.BlockBuilder, vocab: int, target: tvm.target.Target) -> None:
    """sample_tokens(logits f32[b, 1, v], params f32[5, b]) -> i32[b]; params rows: temperature, uniform,
    top_p, top_k, min_p.

    One token per row from softmax(logits / T) cut by top-k, top-p and min-p (sampling_cut.py; top_p >= 1,
    top_k 0 and min_p 0 switch a cut off), drawn at the row's uniform number walking the vocabulary in id
    order (the host sampler's draw, runtime/sampling.py); T = 0 with u = 0 and no cuts gives the first
    maximum."""
    b = _var("batch_size")
    logits, params = _tensor("logits", [b, 1, vocab], F32), _tensor("params", [PARAM_ROWS, b], F32)
    cut = bb.add_func(sampling_cut(vocab, target), "sampling_cut")
    with bb.function("sample_tokens", [logits, params]):
        with bb.dataflow():
            flat = _probs(bb, logits, params, b, vocab)
            kept = bb.emit(relax.call_tir(cut, [flat, params], out_ty=relax.TensorType([b, vocab], F32)))
            cumsum = _prefix_sum(bb, kept, vocab, target)
            out = bb.emit_output(
                bb.emit_te(_draw_in_id_order, cumsum, params, primfunc_name_hint="draw_token")
            )
        bb.emit_func_output(out)
