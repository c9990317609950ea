"""Reader for `phi3 convert` output folders (MLC-LLM layout): a ModelSource of kind "mlc".

`load_params()` gives the stored arrays as they are (q4: `X.q_weight` uint32 + `X.q_scale`), checksums
verified: what a compiled model consumes. The ModelSource interface (`iter_tensors`) presents the HF names
with dequantized float32 weights, so tools that read any checkpoint (inspect, references) also work here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..quantization import QuantScheme, get_scheme
from ..quantization import group_quant as gq
from . import ModelSource, expected_tensor_shapes
from .mlc_format import (
    CHAT_CONFIG,
    MODEL_TYPES,
    MLCChatConfig,
    config_from_model_config,
    iter_tensor_cache,
    our_template_name,
    param_renamer,
    quantized_param_names,
    read_cache_json,
    read_chat_config,
)


class MLCSource(ModelSource):
    kind = "mlc"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        cfg_path = path / CHAT_CONFIG
        chat = read_chat_config(path)
        if chat.arch not in MODEL_TYPES:
            raise UserError(
                f"model_type {chat.arch!r} is not one this toolkit runs ({', '.join(MODEL_TYPES)})", cfg_path
            )
        self.chat_config: MLCChatConfig = chat
        self.scheme: QuantScheme = get_scheme(chat.quantization)
        config = config_from_model_config(chat.params, cfg_path)
        toolkit_info = chat.toolkit or {}
        # our template as recorded at conversion, else the one rendering MLC's template; raw when neither
        conv = toolkit_info.get("conv_template") or our_template_name(chat.conv_template) or "raw"
        super().__init__(path, config, conv)
        self._shapes = expected_tensor_shapes(config)
        # stored names are HF names unless converted with --param-names mlc (MLC-LLM's names)
        self._rename = param_renamer(toolkit_info.get("param_names", "hf"), chat.arch)
        # stored param name -> (shape, dtype) from tensor-cache.json; checked against the config
        self._stored: dict[str, tuple[tuple[int, ...], str]] = {}
        for shard in read_cache_json(path)["records"]:
            for rec in shard["records"]:
                self._stored[rec["name"]] = (tuple(rec["shape"]), rec["dtype"])
        self._validate()

    def _stored_names(self, name: str) -> list[str]:
        """Stored param names holding HF weight `name`: itself, or its q_weight/q_scale (/q_min) params."""
        if self._rename(name) in self._stored:
            return [self._rename(name)]
        layout = self.scheme.layout_for_weight(name)
        suffixes = layout.suffixes if layout is not None else None
        return [self._rename(n) for n in quantized_param_names(name, suffixes=suffixes)]

    def _validate(self) -> None:
        for name, shape in self._shapes.items():
            stored = self._stored_names(name)
            for s in stored:
                if s not in self._stored:
                    raise UserError(f"tensor-cache.json has no {s}", self.path)
            if len(stored) > 1:
                layout = self.scheme.layout_for_weight(name)
                got = tuple(self._stored[s][0] for s in stored)
                if layout is None or got != layout.param_shapes(shape):
                    shapes = "/".join(str(g) for g in got)
                    raise UserError(f"{name}: stored shapes {shapes} do not fit {shape}", self.path)
            elif self._stored[stored[0]][0] != shape:
                got = self._stored[stored[0]][0]
                raise UserError(f"{name}: stored shape {got}, expected {shape}", self.path)

    # ---- ModelSource ---------------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._shapes)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        names = self._check_names(names)
        for name in names:  # one tensor at a time; a shard is re-read per tensor (simple, bounded memory)
            keys = self._stored_names(name)
            stored = dict(iter_tensor_cache(self.path, keys))
            if len(keys) == 1:
                yield name, stored[keys[0]].astype(np.float32)
            elif self.scheme.kind == "gguf":
                from ..quantization import gguf_blocks

                block = self.scheme.weight_block_type(name)
                yield name, gguf_blocks.dequantize(tuple(stored[k] for k in keys), block)
            else:
                qw, qs = (stored[k] for k in keys)
                w = gq.dequantize(qw, qs, self._shapes[name][1], self.scheme.layout)
                yield name, w.astype(np.float32)

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path, config=self.config)

    # ---- stored (runtime) form ------------------------------------------------------------------------
    def param_names(self) -> list[str]:
        return list(self._stored)

    def stored_dtype(self, name: str) -> str | None:
        """dtype of stored param `name` in tensor-cache.json (None if absent)."""
        return self._stored[name][1] if name in self._stored else None

    def iter_params(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(param name, stored array) shard by shard (q4: uint32 codes + scales); each shard's md5 checked."""
        return iter_tensor_cache(self.path, names)

    def load_params(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """`iter_params` collected into a dict."""
        return dict(self.iter_params(names))


def open_mlc_dir(path: str | Path) -> MLCSource:
    return MLCSource(Path(path))
