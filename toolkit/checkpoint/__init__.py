"""Checkpoint readers: one `ModelSource` interface over HF folders, GGUF files and our converter's output.

Every reader presents the weights under the Hugging Face Phi-3 names (fused `qkv_proj` and `gate_up_proj`) as
float32 numpy arrays, streamed one tensor at a time so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import abc
import importlib.util
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Phi3Config
from ..errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from ..tokenizer import Tokenizer

__all__ = ["ModelSource", "expected_tensor_shapes", "open_model", "require_finite"]


def require_finite(name: str, arr: np.ndarray, path: Path) -> np.ndarray:
    """`arr`, or a UserError naming the tensor if it holds NaN or inf: every path (quantized or not, GGUF and
    Core ML export) reads weights through here, so none turns them into a model that prints garbage."""
    import numpy as np  # here, not at import: `phi3 --help` loads this package without touching tensors

    # the largest and smallest value: a NaN propagates into both, an inf is one of them
    if arr.dtype.kind == "f" and arr.size and not (np.isfinite(arr.max()) and np.isfinite(arr.min())):
        raise UserError(f"tensor {name} contains NaN or inf values", path)
    return arr


def expected_tensor_shapes(cfg: Phi3Config) -> dict[str, tuple[int, ...]]:
    """The HF Phi-3 tensor names and (out, in) shapes for a config, in canonical order."""
    h, hd = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.qkv_proj.weight"] = (cfg.qkv_size, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.num_attention_heads * hd)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * cfg.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, cfg.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


class ModelSource(abc.ABC):
    """A model's config, weights (HF Phi-3 names, float32), tokenizer and chat template.

    Subclasses set `kind` and implement `tensor_names`, `tensor_shape`, `iter_tensors` and `tokenizer`.
    """

    kind: str = ""

    def __init__(self, path: Path, config: Phi3Config, conv_template: str) -> None:
        self.path = Path(path)
        self.config = config
        self.conv_template = conv_template

    @abc.abstractmethod
    def tensor_names(self) -> list[str]:
        """All weight names, canonical order (embed, layers, norm, lm_head); no lm_head when tied."""

    @abc.abstractmethod
    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one weight without reading its data."""

    @abc.abstractmethod
    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """Yield `(name, float32 array)` one at a time, in the order of `names` (default: all)."""

    @abc.abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (a `toolkit.tokenizer.Tokenizer`)."""

    def get_tensor(self, name: str) -> np.ndarray:
        for _, arr in self.iter_tensors([name]):
            return arr
        raise KeyError(name)

    def num_params(self) -> int:
        return sum(math.prod(self.tensor_shape(n)) for n in self.tensor_names())

    def summary(self, with_tokenizer: bool = True) -> dict[str, Any]:
        """What `phi3 inspect` shows: config, tensor count and sizes, tokenizer, chat template."""
        names = self.tensor_names()
        n_params = self.num_params()
        info: dict[str, Any] = {
            "path": str(self.path),
            "kind": self.kind,
            "config": self.config.to_dict(),
            "tensors": len(names),
            "parameters": n_params,
            "float32_bytes": 4 * n_params,
            "file_bytes": _disk_size(self.path),
            "chat_template": self.conv_template,
        }
        if with_tokenizer:
            try:
                tok = self.tokenizer()
                info["tokenizer"] = {
                    "vocab_size": tok.vocab_size,
                    "bos_token_id": tok.bos_token_id,
                    "add_bos": tok.add_bos,
                    "eos_token_ids": sorted(tok.eos_token_ids),
                }
            except UserError as e:
                info["tokenizer"] = f"unavailable: {e}"
        return info

    def _check_names(self, names: Iterable[str] | None) -> list[str]:
        known = self.tensor_names()
        if names is None:
            return known
        names = list(names)
        missing = set(names) - set(known)
        if missing:
            raise KeyError(f"{self.path}: no tensor(s) {sorted(missing)}")
        return names

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} path={self.path}>"


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def open_model(path: str | Path | None, *, allow_pickle: bool = False) -> ModelSource:
    """Open a model by what `path` is: HF folder, `.gguf` file, converter output folder, or None (default)."""
    if path is None:
        from ..default_model import default_model_path

        path = default_model_path()
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError("no such file or folder", path)
    if path.is_file():
        if _is_gguf(path):
            from .gguf_source import GGUFSource

            return GGUFSource(path)
        if path.name == "config.json" or path.name.endswith((".safetensors", ".safetensors.index.json")):
            path = path.parent  # a file inside a checkpoint folder stands for the folder
        else:
            raise UserError("not a model: expected a GGUF file or a checkpoint folder", path)
    if (path / "mlc-chat-config.json").is_file():
        if importlib.util.find_spec(f"{__name__}.mlc_source") is None:
            raise UserError("converter output found, but this toolkit has no reader for it", path)
        from .mlc_source import open_mlc_dir  # type: ignore[import-not-found]

        return open_mlc_dir(path)
    if (path / "config.json").is_file():
        from .safetensors_source import HFSource

        return HFSource(path, allow_pickle=allow_pickle)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        from .gguf_source import GGUFSource

        return GGUFSource(ggufs[0])
    raise UserError(
        "not a model folder: expected config.json (Hugging Face), mlc-chat-config.json (converted) "
        "or one .gguf",
        path,
    )
