"""numpy references for the engine's sampling functions (semantics: toolkit/compile/attach_sampling.py,
logit_processor.py, spec_verify.py) and the inputs the tests feed them."""

from __future__ import annotations

import numpy as np

F32_LOWEST = np.finfo(np.float32).min


def softmax_with_temperature(logits: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """logits [b, 1, v] -> probs [b, 1, v] in float64; T <= 1e-5: uniform over the maxima."""
    x = logits[:, 0, :].astype(np.float64)
    out = np.empty_like(x)
    for i, t in enumerate(temperature):
        if t > 1e-5:
            s = x[i] / np.float64(t)
            e = np.exp(s - s.max())
            out[i] = e / e.sum()
        else:
            hit = (x[i] == x[i].max()).astype(np.float64)
            out[i] = hit / hit.sum()
    return out[:, None, :]


def logit_bias(logits, pos2seq, tokens, bias):
    out = logits.copy()
    for r, t, b in zip(pos2seq, tokens, bias):
        out[r, t] = np.float32(out[r, t] + b)
    return out


def penalty(logits, seq_ids, pos2seq, tokens, counts, penalties):
    out = logits.copy()
    for s, t, c in zip(pos2seq, tokens, counts):
        presence, frequency, repetition = penalties[s]
        x = np.float32(out[seq_ids[s], t] - np.float32(presence + np.float32(c) * frequency))
        out[seq_ids[s], t] = x * repetition if x < 0 else x / repetition
    return out


def bitmask(logits, seq_ids, mask):
    out = logits.copy()
    vocab = logits.shape[1]
    bits = (mask.view(np.uint32)[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    allowed = bits.reshape(mask.shape[0], -1)[:, :vocab].astype(bool)
    for s in seq_ids:
        out[s] = np.where(allowed[s], out[s], F32_LOWEST)
    return out


def pack_bitmask(allowed: np.ndarray) -> np.ndarray:
    """bool [b, v] -> int32 [b, ceil(v / 32)], token t at bit t % 32 of word t // 32."""
    b, v = allowed.shape
    padded = np.zeros((b, -(-v // 32) * 32), bool)
    padded[:, :v] = allowed
    weights = (np.uint64(1) << np.arange(32, dtype=np.uint64)).astype(np.uint64)
    words = (padded.reshape(b, -1, 32).astype(np.uint64) * weights).sum(-1)
    return words.astype(np.uint32).view(np.int32)


def multinomial(probs, uniform, rows) -> np.ndarray:
    out = []
    for u, r in zip(uniform, rows):
        cs = np.cumsum(probs[r].astype(np.float64))
        out.append(min(int((cs <= u).sum()), probs.shape[1] - 1))
    return np.array(out, np.int32)


def sample_with_top_p(sorted_probs, sorted_ids, uniform, rows, top_p) -> np.ndarray:
    v = sorted_probs.shape[1]
    out = []
    for u, r in zip(uniform, rows):
        cs = np.cumsum(sorted_probs[r].astype(np.float64))
        mass = cs[min(int((cs < top_p[r]).sum()), v - 1)]
        out.append(sorted_ids[r, min(int((cs / mass <= u).sum()), v - 1)])
    return np.array(out, np.int32)


def renormalize_by_top_p(probs, top_p) -> np.ndarray:
    out = np.zeros(probs.shape, np.float64)
    for r, (p, tp) in enumerate(zip(probs.astype(np.float64), top_p)):
        if tp >= 1 - 1e-7:
            out[r] = p
            continue
        s = np.sort(p)[::-1]
        before = np.cumsum(s) - s
        cutoff = s[max(int((before < tp).sum()), 1) - 1]
        kept = np.where(p >= cutoff, p, 0.0)
        out[r] = kept / kept.sum()
    return out


def verify_draft_tokens(draft_probs, draft_tokens, model_probs, first_child, next_sibling, uniform, parents):
    """Python walk of the token trees; returns (model_probs, parents) updated."""
    model = model_probs.astype(np.float64)
    parents = parents.copy()
    for s, root in enumerate(parents):
        parent, child = root, first_child[root]
        while child != -1:
            t = draft_tokens[child]
            if model[parent, t] >= uniform[child] * draft_probs[child, t]:
                parent, child = child, first_child[child]
                continue
            residual = np.maximum(model[parent] - draft_probs[child], 0.0)
            if residual.sum() < 1e-7:
                parent, child = child, first_child[child]
            else:
                model[parent] = residual / residual.sum()
                child = next_sibling[child]
        parents[s] = parent
    return model, parents


def random_probs(rng: np.random.Generator, rows: int, vocab: int) -> np.ndarray:
    """Distinct, peaked probabilities (softmax of N(0, 2) logits), so sorts have no ties."""
    x = rng.standard_normal((rows, vocab)) * 2
    p = np.exp(x - x.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def midpoint_uniform(cumsum: np.ndarray, position: int, scale: float = 1.0) -> float:
    """A uniform sample halfway inside `position`'s slice of the cumulative distribution: the sampled
    position then does not depend on the summation order (slices are >= 1e-4 wide in the tests)."""
    low = 0.0 if position == 0 else cumsum[position - 1]
    return float((low + cumsum[position]) / 2 / scale)
