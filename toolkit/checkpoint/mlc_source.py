"""Reader for `phi3 convert` output folders (MLC-LLM layout): a ModelSource of kind "mlc".

`load_params()` gives the stored arrays as they are (q4: `X.q_weight` uint32 + `X.q_scale`), checksums
verified: what a compiled model consumes. The ModelSource interface (`iter_tensors`) presents the HF names
with dequantized float32 weights, so tools that read any checkpoint (inspect, references) also work here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..convert.converter import CHAT_CONFIG, config_from_chat_config, quantized_param_names, to_mlc_name
from ..convert.tensor_cache import iter_tensor_cache, read_cache_json
from ..errors import UserError
from ..quantization import QuantScheme, get_scheme
from ..quantization import group_quant as gq
from . import ModelSource, expected_tensor_shapes


class MLCSource(ModelSource):
    kind = "mlc"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        cfg_path = path / CHAT_CONFIG
        try:
            chat = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {CHAT_CONFIG} ({e})", cfg_path) from None
        if not isinstance(chat, dict):
            raise UserError("not a JSON object", cfg_path)
        if chat.get("model_type") != "phi3":
            raise UserError(f"model_type {chat.get('model_type')!r} is not phi3", cfg_path)
        self.chat_config: dict[str, Any] = chat
        self.scheme: QuantScheme = get_scheme(chat.get("quantization", "?"))
        config = config_from_chat_config(chat, cfg_path)
        conv = chat.get("conv_template")
        super().__init__(path, config, conv if isinstance(conv, str) else "phi3")
        self._shapes = expected_tensor_shapes(config)
        toolkit_info = chat.get("toolkit") if isinstance(chat.get("toolkit"), dict) else {}
        # stored names are HF names unless converted with --param-names mlc (MLC-LLM's own Phi-3 names)
        self._rename = to_mlc_name if toolkit_info.get("param_names") == "mlc" else (lambda n: n)
        # stored param name -> (shape, dtype) from tensor-cache.json; checked against the config
        self._stored: dict[str, tuple[tuple[int, ...], str]] = {}
        for shard in read_cache_json(path)["records"]:
            for rec in shard["records"]:
                self._stored[rec["name"]] = (tuple(rec["shape"]), rec["dtype"])
        self._validate()

    def _stored_names(self, name: str) -> list[str]:
        """Stored param names holding HF weight `name`: itself, or its q_weight/q_scale pair."""
        if self._rename(name) in self._stored:
            return [self._rename(name)]
        return [self._rename(n) for n in quantized_param_names(name)]

    def _validate(self) -> None:
        for name, shape in self._shapes.items():
            stored = self._stored_names(name)
            for s in stored:
                if s not in self._stored:
                    raise UserError(f"tensor-cache.json has no {s}", self.path)
            if len(stored) == 2:
                qw, qs = (self._stored[s][0] for s in stored)
                if (qw, qs) != gq.quantized_shapes(shape):
                    raise UserError(f"{name}: stored shapes {qw}/{qs} do not fit {shape}", self.path)
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
            else:
                qw, qs = (stored[k] for k in keys)
                yield name, gq.dequantize(qw, qs, self._shapes[name][1]).astype(np.float32)

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path, config=self.config)

    # ---- stored (runtime) form ------------------------------------------------------------------------
    def param_names(self) -> list[str]:
        return list(self._stored)

    def iter_params(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(param name, stored array) shard by shard (q4: uint32 codes + scales); each shard's md5 checked."""
        return iter_tensor_cache(self.path, names)

    def load_params(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """`iter_params` collected into a dict."""
        return dict(self.iter_params(names))


def open_mlc_dir(path: str | Path) -> MLCSource:
    return MLCSource(Path(path))
