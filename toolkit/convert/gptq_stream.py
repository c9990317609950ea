"""`--clip gptq`: the converter's tensors, every decoder Linear quantized by GPTQ, streamed layer by layer.

The numpy Phi-3 forward of `calibration.py` runs over the calibration tokens one layer at a time. Each Linear
is quantized from the inputs it actually receives (`layer_forward(..., linear=...)`): those come from the
Linears before it already quantized, in this layer and in every earlier one (GPTQ's sequential order), so a
Linear also corrects the error that reaches it from upstream. Memory: one layer's float32 weights, its
quantized form, the calibration activations (T x intermediate floats) and one K x K Hessian.

The lm_head (or a tied embedding, which is the lm_head too) is GPTQ'd last, from the final hidden states of
the quantized model; an untied input embedding is a lookup, not a matmul, so it gets the clip search with
every channel weighed alike. Defaults, measured on a bf16 copy of SmolLM2-135M (q4f16_1, tinyshakespeare,
8 x 256 tokens, numpy reference forward; fp 57.07, rtn 82.81, weighted 76.43): GPTQ on the Linears with the
tied head clip-searched 71.66, with act order 70.30; the tied head GPTQ'd too 68.16 (the default), with
act order 69.07 (act order helps only while the head is not GPTQ'd, and costs time: off).
Tensors come out layer by layer, then the non-layer tensors (embedding, final norm, lm_head); the tensor
cache records names, so order is free.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..checkpoint.mlc_format import quantized_param_names
from ..quantization import QuantScheme
from ..quantization import group_quant as gq
from ..quantization.clip_search import search_scales
from ..quantization.gptq import DEFAULT_DAMP, gptq_pack, hessian
from .calibration import (
    CALIBRATION_TEXT,
    _layer_weights,
    calibration_tokens,
    layer_forward,
    rms_norm,
    rope_cos_sin,
)
from .calibration_text import EXTRA_TEXT

if TYPE_CHECKING:
    from ..checkpoint import ModelSource

LAYER_PREFIX = "model.layers."
GPTQ_CALIBRATION_TEXT = CALIBRATION_TEXT + EXTRA_TEXT
GPTQ_MAX_TOKENS = 2048
# the calibration text runs as independent sequences of this many tokens: attention scores stay
# heads x SEGMENT^2 floats (32 MB at Phi-3-mini's 32 heads), whatever the text's length
SEGMENT = 512


def gptq_calibration_tokens(source: ModelSource) -> list[int]:
    return calibration_tokens(source, GPTQ_CALIBRATION_TEXT, max_tokens=GPTQ_MAX_TOKENS)


def gptq_tensors(
    source: ModelSource,
    scheme: QuantScheme,
    token_ids: list[int],
    check,
    should_quantize,
    progress=None,
    scales: str = "weighted",
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    head: str = "gptq",
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param name, array) for every tensor of `source`; `check(name, arr)` refuses bad values and
    `should_quantize(name, shape)` says which weights get q4 (both the converter's).

    `head`: "gptq" (the lm_head, or a tied embedding, GPTQ'd from the final hidden states) or "weighted"
    (the weighted clip search). `act_order`, `scales`, `damp`: see `quantization.gptq.gptq_quantize`."""
    cfg = source.config
    names = source.tensor_names()
    other = [n for n in names if not n.startswith(LAYER_PREFIX)]
    ids = np.asarray(token_ids, np.int64)
    h = source.get_tensor("model.embed_tokens.weight")[ids].astype(np.float32)
    segments = [slice(s, min(s + SEGMENT, len(ids))) for s in range(0, len(ids), SEGMENT)]
    cos, sin = rope_cos_sin(cfg, np.concatenate([np.arange(s.stop - s.start) for s in segments]))

    for i in range(cfg.num_hidden_layers):
        weights = _layer_weights(source, i)
        packed: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def linear(name: str, x: np.ndarray, weights=weights, packed=packed) -> np.ndarray:
            w = weights[name]
            check(name, w)
            if not should_quantize(name, w.shape):
                return w
            q_weight, q_scale, w_hat = gptq_pack(
                w, hessian(x), scheme, scales=scales, damp=damp, act_order=act_order, overwrite_h=True
            )
            packed[name] = (q_weight, q_scale)
            weights[name] = None  # the float weight is not needed again: free it before the next Linear
            return w_hat

        h = layer_forward(h, weights.__getitem__, i, cfg, cos, sin, linear=linear, segments=segments)
        for name, arr in weights.items():
            if name in packed:
                yield from zip(quantized_param_names(name), packed.pop(name))
            else:
                check(name, arr)
                yield name, arr.astype(scheme.model_dtype)
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(name, refresh=False)
        del weights, packed

    x = rms_norm(h, source.get_tensor("model.norm.weight"), cfg.rms_norm_eps)
    del h
    head_act = np.mean(np.square(x, dtype=np.float64), axis=0).astype(np.float32)
    for name, arr in source.iter_tensors(other):
        check(name, arr)
        if should_quantize(name, arr.shape):
            is_head = name == "lm_head.weight" or cfg.tie_word_embeddings
            if is_head and head == "gptq":
                q = gptq_pack(
                    arr, hessian(x), scheme, scales=scales, damp=damp, act_order=act_order, overwrite_h=True
                )[:2]
            else:
                act = head_act if is_head else np.ones(arr.shape[1], np.float32)
                q = gq.quantize(arr, scheme, scales=search_scales(arr, scheme, act_sq=act))
            yield from zip(quantized_param_names(name), q)
        else:
            yield name, arr.astype(scheme.model_dtype)
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(name, refresh=False)
        del arr
