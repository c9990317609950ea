"""One typed config for the whole Phi3ForCausalLM family, parsed from a Hugging Face config.json.

Accepts the transformers-4 spelling (`rope_scaling` + top-level `rope_theta`) and the transformers-5 one
(`rope_parameters`). Anything we cannot run exactly is a UserError, never a silent fallback.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

SUPPORTED_ARCHITECTURES = ("Phi3ForCausalLM",)

# Reference configs (Hugging Face config.json fields) for benchmarks and compile-cost runs that need real
# shapes but no weights. Source: microsoft/Phi-3-mini-4k-instruct config.json.
PHI3_MINI_4K_HF: dict[str, Any] = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "sliding_window": 2047,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
}


@dataclass(frozen=True)
class LongRope:
    """LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini): per-frequency divisors, chosen by position like HF."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float  # multiplies cos and sin, for every position (HF semantics)


@dataclass(frozen=True)
class Phi3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    partial_rotary_factor: float = 1.0
    longrope: LongRope | None = None
    # HF semantics: a query attends to keys with 0 <= q - k < sliding_window
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (32000,)
    pad_token_id: int | None = None
    # where it came from: "phi3" (HF checkpoint) or "llama" (GGUF import mapped onto the Phi-3 graph)
    source_arch: str = "phi3"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # every path (HF, GGUF, converted folder, manifest) builds one of these: check it once, here
        _check_values(self)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phi3Config:
        d = dict(d)
        lr = d.pop("longrope", None)
        if lr is not None:
            lr = LongRope(
                short_factor=tuple(lr["short_factor"]),
                long_factor=tuple(lr["long_factor"]),
                original_max_position_embeddings=int(lr["original_max_position_embeddings"]),
                attention_factor=float(lr["attention_factor"]),
            )
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(longrope=lr, **d)

    def num_params(self) -> int:
        h, L = self.hidden_size, self.num_hidden_layers
        per_layer = h * self.qkv_size + self.num_attention_heads * self.head_dim * h
        per_layer += 3 * h * self.intermediate_size + 2 * h
        emb = self.vocab_size * h
        return L * per_layer + h + emb + (0 if self.tie_word_embeddings else emb)


class ConfigError(ValueError):
    """A config value out of range; `field` names it. Readers turn it into a UserError naming their file."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_values(c: Phi3Config) -> None:
    """Ranges every runnable config satisfies (a zero or negative size, eps or theta gives NaN or crashes)."""
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
    ):
        v = getattr(c, name)
        if not _is_int(v) or v <= 0:
            raise ConfigError(name, f"must be a positive integer, got {v!r}")
    for name in ("rms_norm_eps", "rope_theta"):
        v = getattr(c, name)
        if not _is_real(v) or v <= 0:
            raise ConfigError(name, f"must be a finite number > 0, got {v!r}")
    if not _is_real(c.partial_rotary_factor) or not 0 < c.partial_rotary_factor <= 1:
        raise ConfigError("partial_rotary_factor", f"must be in (0, 1], got {c.partial_rotary_factor!r}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(
            "num_key_value_heads",
            f"num_attention_heads {c.num_attention_heads} is not a multiple of {c.num_key_value_heads}",
        )
    if c.sliding_window is not None and (not _is_int(c.sliding_window) or c.sliding_window <= 0):
        raise ConfigError("sliding_window", f"must be a positive integer or null, got {c.sliding_window!r}")
    if not isinstance(c.tie_word_embeddings, bool):
        raise ConfigError("tie_word_embeddings", f"must be true or false, got {c.tie_word_embeddings!r}")
    for name in ("bos_token_id", "pad_token_id"):
        v = getattr(c, name)
        if v is not None and (not _is_int(v) or v < 0):
            raise ConfigError(name, f"must be a token id >= 0 or null, got {v!r}")
    if any(not _is_int(e) or e < 0 for e in c.eos_token_ids):
        raise ConfigError("eos_token_id", f"must be token ids >= 0, got {list(c.eos_token_ids)!r}")
    lr = c.longrope
    if lr is not None:
        if not _is_int(lr.original_max_position_embeddings) or lr.original_max_position_embeddings <= 0:
            raise ConfigError("original_max_position_embeddings", "must be a positive integer")
        if not _is_real(lr.attention_factor) or lr.attention_factor <= 0:
            raise ConfigError("rope_scaling.attention_factor", "must be a finite number > 0")
        for key in ("short_factor", "long_factor"):
            if any(not _is_real(f) or f <= 0 for f in getattr(lr, key)):
                raise ConfigError(f"rope_scaling.{key}", "must hold finite numbers > 0")


def _req(cfg: dict[str, Any], key: str, path: Path) -> Any:
    if key not in cfg:
        raise UserError(f"config.json has no '{key}'", path)
    return cfg[key]


def _parse_longrope(cfg: dict[str, Any], rope: dict[str, Any], rotary_dim: int, path: Path) -> LongRope:
    for key in ("short_factor", "long_factor"):
        if key not in rope:
            raise UserError(f"longrope scaling without '{key}'", path)
    short, long = tuple(map(float, rope["short_factor"])), tuple(map(float, rope["long_factor"]))
    if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
        raise UserError(
            f"longrope factors have {len(short)}/{len(long)} entries, expected rotary_dim/2 = "
            f"{rotary_dim // 2}",
            path,
        )
    orig = rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    if orig is None:
        raise UserError("longrope scaling needs 'original_max_position_embeddings'", path)
    orig = int(orig)
    max_pos = int(cfg.get("max_position_embeddings", orig))
    att = rope.get("attention_factor")
    if att is None:
        # transformers' _compute_longrope_parameters: factor = max_pos / original_max
        factor = max_pos / orig
        att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return LongRope(short, long, orig, float(att))


def parse_hf_config(cfg: dict[str, Any], path: Path) -> Phi3Config:
    """Turn a Hugging Face config dict into a Phi3Config, rejecting what we do not support."""
    archs = cfg.get("architectures") or []
    mtype = cfg.get("model_type")
    if isinstance(archs, list) and archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UserError(
            f"unsupported architecture {archs}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}", path
        )
    if not archs and mtype != "phi3":
        raise UserError(f"unsupported model_type {mtype!r}; expected 'phi3'", path)
    from .hf_schema import validate_hf_fields  # pydantic: imported when a config.json is parsed

    validate_hf_fields(cfg, path)
    try:
        return _build(cfg, path)
    except ConfigError as e:
        raise UserError(f"'{e.field}': {e.message}", path) from None


def _build(cfg: dict[str, Any], path: Path) -> Phi3Config:
    hidden = int(_req(cfg, "hidden_size", path))
    n_heads = int(_req(cfg, "num_attention_heads", path))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    if n_heads % n_kv:
        raise UserError(
            f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}", path
        )
    if cfg.get("head_dim") is None and hidden % n_heads:
        raise UserError(f"'hidden_size' {hidden} is not a multiple of num_attention_heads {n_heads}", path)
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)

    # transformers 5 folds rope_theta/rope_scaling/partial_rotary_factor into rope_parameters
    rope = cfg.get("rope_parameters")
    if rope is None:
        rope = cfg.get("rope_scaling")
    rope = dict(rope) if rope else {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    prf = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * prf)
    if rotary_dim % 2 or rotary_dim <= 0 or rotary_dim > head_dim:
        raise UserError(f"partial_rotary_factor {prf} gives an invalid rotary dim {rotary_dim}", path)

    rtype = rope.get("rope_type", rope.get("type"))
    if rope and rtype is None and ("short_factor" in rope or "long_factor" in rope):
        raise UserError(
            "rope scaling has long/short factors but no 'type'/'rope_type'; refusing to guess", path
        )
    longrope = None
    if rtype in ("longrope", "su"):  # "su" is the pre-July-2024 name of longrope
        longrope = _parse_longrope(cfg, rope, rotary_dim, path)
    elif rtype not in (None, "default"):
        raise UserError(f"unsupported rope scaling type {rtype!r}; supported: default, longrope (su)", path)

    sw = cfg.get("sliding_window")
    eos = cfg.get("eos_token_id", 32000)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"unsupported hidden_act {act!r}; Phi-3 uses silu", path)
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError("attention/mlp biases are not supported by the Phi-3 graph", path)
    return Phi3Config(
        vocab_size=int(_req(cfg, "vocab_size", path)),
        hidden_size=hidden,
        intermediate_size=int(_req(cfg, "intermediate_size", path)),
        num_hidden_layers=int(_req(cfg, "num_hidden_layers", path)),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        partial_rotary_factor=prf,
        longrope=longrope,
        sliding_window=int(sw) if sw else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
        source_arch="phi3",
    )


def phi3_mini_4k(**overrides: Any) -> Phi3Config:
    """Phi-3-mini-4k's config (optionally with HF fields overridden, e.g. num_hidden_layers=2)."""
    return parse_hf_config({**PHI3_MINI_4K_HF, **overrides}, Path("<phi-3-mini-4k>"))


def load_hf_config(model_dir: str | Path) -> Phi3Config:
    """Read `config.json` from a checkpoint folder."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError("no config.json (is this a Hugging Face checkpoint folder?)", Path(model_dir))
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", path) from None
    if not isinstance(cfg, dict):
        raise UserError("not a JSON object", path)
    return parse_hf_config(cfg, path)
