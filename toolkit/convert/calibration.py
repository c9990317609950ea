"""Activation statistics for the weighted clipping search, from a numpy Phi-3 forward over a short text.

The expected output error of a Linear y = W x is sum_k E[x_k^2] (W_jk - W'_jk)^2 (inputs uncorrelated), so
the search weighs each input channel k by E[x_k^2], measured here on calibration tokens. The forward is a
float32 numpy Phi-3 (RMSNorm, rotate-half RoPE with partial rotary and LongRoPE per HF semantics, GQA,
sliding window, SwiGLU), run layer by layer: only one layer's weights are held at a time, so it streams like
the converter. The same forward gives a reference perplexity (`perplexity`) for weights quantized in numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..config import Phi3Config

if TYPE_CHECKING:
    from ..checkpoint import ModelSource

# A short, generic English calibration text (written for this toolkit; deliberately not the evaluation text).
CALIBRATION_TEXT = """\
The history of science is full of small observations that changed how people understood the world. A farmer
notices that one field yields more grain than another, a sailor records the direction of the wind at noon
each day, and a physician writes down which patients recover quickly. Over years, these notes become tables,
the tables become patterns, and the patterns become theories that can be tested.
Cities grew along rivers because water meant trade, food and power. Bridges, mills and harbours followed,
and with them new laws about who could use the river and how much they should pay. Today the same questions
return in new forms: who owns data, how energy is shared, and what a fair price is for a service.
def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)
Question: What is 17 multiplied by 3? Answer: 17 times 3 is 51, because 10 times 3 is 30 and 7 times 3 is 21.
She opened the letter slowly, read the first line twice, and then laughed. "You could have just called," she
said to nobody in particular, folding the paper back into its envelope and setting it beside the kettle.
Les montagnes étaient couvertes de neige, et le village dormait encore quand le train est arrivé.
In 1969 the first humans walked on the Moon; fifty years later, small satellites the size of a shoebox are
launched by the dozen, measuring crops, storms and the temperature of the oceans.
"""


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * w


def rope_cos_sin(cfg: Phi3Config, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF Phi-3 rotary tables (T, rotary_dim); LongRoPE picks long factors iff max position + 1 > original."""
    rot = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    scale = 1.0
    if cfg.longrope is not None:
        lr = cfg.longrope
        long = positions.max() + 1 > lr.original_max_position_embeddings
        inv_freq = inv_freq / np.asarray(lr.long_factor if long else lr.short_factor, np.float64)
        scale = lr.attention_factor
    freqs = np.outer(positions.astype(np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return (np.cos(emb) * scale).astype(np.float32), (np.sin(emb) * scale).astype(np.float32)


def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rot: int) -> np.ndarray:
    """x (H, T, hd): rotate-half RoPE on the first `rot` dims."""
    xr, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = np.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    return np.concatenate([xr * cos + rotated * sin, rest], axis=-1)


def _mean_sq(x: np.ndarray) -> np.ndarray:
    return np.mean(x.astype(np.float64) ** 2, axis=0)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, sliding_window: int | None) -> np.ndarray:
    """Causal softmax attention of one sequence; q, k, v (H, T, hd)."""
    t = q.shape[1]
    scores = q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(q.shape[-1]))
    diff = np.arange(t)[:, None] - np.arange(t)[None, :]
    allowed = diff >= 0
    if sliding_window:
        allowed &= diff < sliding_window
    scores = np.where(allowed, scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (scores / scores.sum(axis=-1, keepdims=True)) @ v


def layer_forward(
    h: np.ndarray,
    w: Callable[[str], np.ndarray],
    i: int,
    cfg: Phi3Config,
    cos: np.ndarray,
    sin: np.ndarray,
    stats: dict[str, np.ndarray] | None = None,
    linear: Callable[[str, np.ndarray], np.ndarray] | None = None,
    segments: list[slice] | None = None,
) -> np.ndarray:
    """One decoder layer on h (T, hidden); `w(name)` gives float32 weights by HF name; E[x^2] into `stats`.

    `linear(name, x)`, if given, returns the weight each Linear applies to its input x, after seeing x (GPTQ
    quantizes each Linear from its actual inputs, which come after the Linears before it are quantized).
    `segments`: rows of h that are separate sequences (cos/sin restart per segment); default: one sequence."""
    p = f"model.layers.{i}."
    if linear is None:

        def linear(name: str, _x: np.ndarray) -> np.ndarray:
            return w(name)

    t = h.shape[0]
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = rms_norm(h, w(p + "input_layernorm.weight"), cfg.rms_norm_eps)
    if stats is not None:
        stats[p + "self_attn.qkv_proj.weight"] = _mean_sq(x)
    qkv = x @ linear(p + "self_attn.qkv_proj.weight", x).T
    del x  # each activation is dropped once used: at Phi-3-mini width and 2048 tokens they are 25-134 MB each
    q = qkv[:, : nh * hd].reshape(t, nh, hd).transpose(1, 0, 2)
    k = qkv[:, nh * hd : (nh + nkv) * hd].reshape(t, nkv, hd).transpose(1, 0, 2)
    v = qkv[:, (nh + nkv) * hd :].reshape(t, nkv, hd).transpose(1, 0, 2)
    q, k = _apply_rope(q, cos, sin, cfg.rotary_dim), _apply_rope(k, cos, sin, cfg.rotary_dim)
    rep = nh // nkv
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    del qkv
    attn = np.empty((nh, t, hd), np.float32)
    # independent sequences side by side: attention stays inside each (the scores are one segment squared)
    for seg in segments or [slice(0, t)]:
        attn[:, seg] = _attention(q[:, seg], k[:, seg], v[:, seg], cfg.sliding_window)
    del q, k, v
    attn = attn.transpose(1, 0, 2).reshape(t, nh * hd)
    if stats is not None:
        stats[p + "self_attn.o_proj.weight"] = _mean_sq(attn)
    h = h + attn @ linear(p + "self_attn.o_proj.weight", attn).T
    del attn
    x2 = rms_norm(h, w(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
    if stats is not None:
        stats[p + "mlp.gate_up_proj.weight"] = _mean_sq(x2)
    gu = x2 @ linear(p + "mlp.gate_up_proj.weight", x2).T
    del x2
    gate, up = gu[:, : cfg.intermediate_size], gu[:, cfg.intermediate_size :]
    act = gate / (1.0 + np.exp(-gate)) * up
    del gu, gate, up
    if stats is not None:
        stats[p + "mlp.down_proj.weight"] = _mean_sq(act)
    h = h + act @ linear(p + "mlp.down_proj.weight", act).T
    return h.astype(np.float32)


EMBED = "model.embed_tokens.weight"
_LAYER = "model.layers."


def _stages(source: ModelSource) -> list[list[str]]:
    """The source's tensor names in the order the forward needs them: an untied embedding (its lookups
    start the forward), each decoder layer, then the rest (final norm, lm_head; a tied embedding, the
    head, last)."""
    cfg = source.config
    names = source.tensor_names()
    layers = [[n for n in names if n.startswith(f"{_LAYER}{i}.")] for i in range(cfg.num_hidden_layers)]
    rest = [n for n in names if not n.startswith(_LAYER) and (cfg.tie_word_embeddings or n != EMBED)]
    return ([] if cfg.tie_word_embeddings else [[EMBED]]) + layers + [rest]


def tensors_with_stats(
    source: ModelSource, token_ids: list[int], *, head: bool = True
) -> Iterator[tuple[str, np.ndarray | None, np.ndarray | None]]:
    """Every source tensor once, float32, with E[x_k^2] of the input it multiplies (None for norms), in the
    forward's order (`_stages`): a decoder layer's tensors come after its forward over the calibration tokens,
    so a converter quantizes what it has just read, and the checkpoint is read once. With `head` False the
    head's weights (lm_head, or a tied embedding as the head), which the forward never needs, are not read:
    that tensor comes with None, for callers that want the statistics only.

    The next stage is read in a thread, tensor j of it while the consumer works on tensor j of this one (the
    same role: the same size), so memory holds one layer's float32 weights plus one tensor, not two layers."""
    from concurrent.futures import Future, ThreadPoolExecutor

    cfg = source.config
    ids = np.asarray(token_ids, np.int64)
    cos, sin = rope_cos_sin(cfg, np.arange(len(ids)))
    h = None
    if cfg.tie_word_embeddings:  # the head comes last; only its rows for the tokens are kept until then
        h = source.get_tensor(EMBED)[ids]
    stages = _stages(source)
    unread = set() if head else {EMBED if cfg.tie_word_embeddings else "lm_head.weight"}
    pool = ThreadPoolExecutor(1, thread_name_prefix="phi3-read-ahead")  # one reader thread, reads in order
    reads: dict[str, Future] = {}

    def read(name: str) -> None:
        if name not in unread:
            reads[name] = pool.submit(source.get_tensor, name)

    try:
        for n in stages[0]:
            read(n)
        for i, names in enumerate(stages):
            weights = {n: None if n in unread else reads.pop(n).result() for n in names}
            layer = i if cfg.tie_word_embeddings else i - 1  # -1: the untied embedding
            stats: dict[str, np.ndarray] = {}
            if layer == -1:  # a lookup, not a matmul: every channel matters alike
                h = weights[EMBED][ids]
                stats[EMBED] = np.ones(cfg.hidden_size)
            elif layer < cfg.num_hidden_layers:
                h = layer_forward(h, weights.__getitem__, layer, cfg, cos, sin, stats)
            else:
                x = rms_norm(h, weights["model.norm.weight"], cfg.rms_norm_eps)
                stats[EMBED if cfg.tie_word_embeddings else "lm_head.weight"] = _mean_sq(x)
            following = stages[i + 1] if i + 1 < len(stages) else []
            for j, name in enumerate(names):
                if j < len(following):
                    read(following[j])
                yield name, weights.pop(name), stats.get(name)  # handed over: the consumer frees it
            for name in following[len(names) :]:
                read(name)
    finally:
        # a consumer that stopped early: drop the queued reads, wait for the one in flight, so nothing
        # reads the source after this returns
        pool.shutdown(wait=True, cancel_futures=True)


def activation_stats(source: ModelSource, token_ids: list[int]) -> dict[str, np.ndarray]:
    """E[x_k^2] of the input of every Linear (by its HF weight name, lm_head/tied embedding included)."""
    items = tensors_with_stats(source, token_ids, head=False)
    return {name: act for name, _, act in items if act is not None}


MIN_CALIBRATION_TOKENS = 16  # fewer: the E[x^2] weights are mostly noise


def calibration_tokens(source: ModelSource, text: str = CALIBRATION_TEXT, max_tokens: int = 512) -> list[int]:
    return source.tokenizer().encode(text)[:max_tokens]


def _windows(ids: np.ndarray, window: int) -> Iterator[np.ndarray]:
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) >= 2:
            yield chunk


def perplexity(
    cfg: Phi3Config, w: Callable[[str], np.ndarray], token_ids: list[int], window: int = 256
) -> dict[str, float]:
    """Reference perplexity over consecutive non-overlapping windows (each scored from a fresh context):
    {"ppl", "tokens" (scored), "windows"}. `w(name)` gives float32 weights by HF name."""
    ids = np.asarray(token_ids, np.int64)
    nll, count, n_win = 0.0, 0, 0
    for chunk in _windows(ids, window):
        cos, sin = rope_cos_sin(cfg, np.arange(len(chunk)))
        h = w(EMBED)[chunk].astype(np.float32)
        for i in range(cfg.num_hidden_layers):
            h = layer_forward(h, w, i, cfg, cos, sin)
        x = rms_norm(h, w("model.norm.weight"), cfg.rms_norm_eps)
        head = w(EMBED if cfg.tie_word_embeddings else "lm_head.weight")
        logits = (x[:-1] @ head.T).astype(np.float64)
        m = logits.max(axis=-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
        n_win += 1
    return {"ppl": float(np.exp(nll / max(count, 1))), "tokens": count, "windows": n_win}
