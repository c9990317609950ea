"""`--clip gptq`: the converter's tensors, every decoder Linear quantized by GPTQ, streamed layer by layer.

The numpy Phi-3 forward of `calibration.py` runs over the calibration tokens one layer at a time. Each Linear
is quantized from the inputs it actually receives (`layer_forward(..., linear=...)`): those come from the
Linears before it already quantized, in this layer and in every earlier one (GPTQ's sequential order), so a
Linear also corrects the error that reaches it from upstream. Memory: one Linear's float32 weight (read when
its inputs are ready) and its GPTQ result, the layer's quantized form, the live calibration activations
(at most T x 2 intermediate floats) and one K x K Hessian with its inverse factor (computed in its buffer).

The lm_head (or a tied embedding, which is the lm_head too) is GPTQ'd last, from the final hidden states of
the quantized model; an untied input embedding is a lookup, not a matmul, so it gets the clip search with
every channel weighed alike. Defaults, measured on a bf16 copy of SmolLM2-135M (q4f16_1, tinyshakespeare,
8 x 256 tokens, numpy reference forward; fp 57.07, rtn 82.81, weighted 76.43): GPTQ on the Linears with the
tied head clip-searched 71.66, with act order 70.30; the tied head GPTQ'd too 68.16 (the default), with
act order 69.07 (act order helps only while the head is not GPTQ'd, and costs time: off). These are single
draws: GPTQ's codes depend chaotically on float rounding (one code flipped in layer 0 changes most codes of
later layers), and rounding-only changes (BLAS threads, the lazy-update matmul's row chunks) moved the
default's perplexity between 67.8 and 71.9 (2026-12-03: 67.77, 68.51, 69.65 with 1 or 2 BLAS/LAPACK threads;
68.34, 69.72, 71.9 with row chunks of 512, 2048, 1024 in every Linear). So the decoder Linears update all
rows at once, as before, and only the head runs in row blocks (`phi3 eval`: 68.80).
Tensors come out layer by layer, then the non-layer tensors (embedding, final norm, lm_head); the tensor
cache records names, so order is free.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..checkpoint.mlc_format import quantized_param_names
from ..quantization import QuantScheme, kernels
from ..quantization import group_quant as gq
from ..quantization.clip_search import search_scales
from ..quantization.gptq import DEFAULT_DAMP, gptq_pack, gptq_pack_rows, hessian
from .calibration import (
    CALIBRATION_TEXT,
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


def gptq_tensors(*args, **kwargs) -> Iterator[tuple[str, np.ndarray]]:
    """`_gptq_tensors` on the numpy paths of quantization (`kernels.numpy_only`): TVM stays out of a GPTQ
    conversion, whose peak memory is its limit."""
    with kernels.numpy_only():
        yield from _gptq_tensors(*args, **kwargs)


def _gptq_tensors(
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
        layer = [n for n in names if n.startswith(f"{LAYER_PREFIX}{i}.")]
        plain: dict[str, np.ndarray] = {}  # the layer's weights that stay float (norms), read when used
        packed: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def weight(name: str, plain=plain) -> np.ndarray:
            if name not in plain:
                plain[name] = source.get_tensor(name)
                check(name, plain[name])
            return plain[name]

        def linear(name: str, x: np.ndarray, packed=packed, weight=weight) -> np.ndarray:
            # each Linear's float weight is read when its inputs are ready and dropped once quantized, so
            # one Linear's weight is in memory, not the layer's (452 MB float32 at Phi-3-mini width)
            if not should_quantize(name, source.tensor_shape(name)):
                return weight(name)
            w = source.get_tensor(name)
            check(name, w)
            q_weight, q_scale, w_hat = gptq_pack(
                w, hessian(x), scheme, scales=scales, damp=damp, act_order=act_order, overwrite_h=True
            )
            packed[name] = (q_weight, q_scale)
            return w_hat

        h = layer_forward(h, weight, i, cfg, cos, sin, linear=linear, segments=segments)
        for name in layer:
            if name in packed:
                yield from zip(quantized_param_names(name), packed.pop(name))
            else:  # a weight the forward does not use is still converted
                yield name, weight(name).astype(scheme.model_dtype)
                plain.pop(name)
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(name, refresh=False)
        del plain, packed

    x = rms_norm(h, source.get_tensor("model.norm.weight"), cfg.rms_norm_eps)
    del h
    head_act = np.mean(np.square(x, dtype=np.float64), axis=0).astype(np.float32)
    for name, arr in source.iter_tensors(other):
        check(name, arr)
        if should_quantize(name, arr.shape):
            is_head = name == "lm_head.weight" or cfg.tie_word_embeddings
            if is_head and head == "gptq":
                # nothing multiplies by the quantized head here: row blocks, no dequantized 394 MB copy
                q = gptq_pack_rows(
                    arr, hessian(x), scheme, scales=scales, damp=damp, act_order=act_order, overwrite_h=True
                )
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
