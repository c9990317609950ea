"""config.json parsing for the whole Phi3ForCausalLM family, transformers-4 and transformers-5 spellings."""

from __future__ import annotations

import json
import math

import pytest
from tiny import hf_config

from toolkit.config import Phi3Config, load_hf_config, parse_hf_config
from toolkit.errors import UserError

# Shapes and rope settings of the real hub configs (transformers-4 spelling, as published); the factor lists
# are synthetic but have the real length (rotary_dim / 2).
PHI3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_act": "silu",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "vocab_size": 32064,
}


def _factors(n: int, base: float) -> list[float]:
    return [base + 0.01 * i for i in range(n)]


PHI3_MINI_128K = {
    **PHI3_MINI_4K,
    "max_position_embeddings": 131072,
    "sliding_window": 262144,
    "rope_scaling": {"type": "longrope", "short_factor": _factors(48, 1.0), "long_factor": _factors(48, 2.0)},
}
PHI3_MEDIUM = {
    **PHI3_MINI_4K,
    "hidden_size": 5120,
    "intermediate_size": 17920,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 10,
}
PHI4_MINI = {
    **PHI3_MINI_4K,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "partial_rotary_factor": 0.75,
    "tie_word_embeddings": True,
    "vocab_size": 200064,
    "max_position_embeddings": 131072,
    "sliding_window": 262144,
    "bos_token_id": 199999,
    "eos_token_id": 199999,
    "pad_token_id": 199999,
    "rope_scaling": {"type": "longrope", "short_factor": _factors(48, 1.0), "long_factor": _factors(48, 3.0)},
}


def _hf_attention_factor(cfg: dict) -> float:
    """transformers' own LongRoPE attention factor for a config dict (independent of our parser)."""
    from transformers import Phi3Config as HFPhi3Config
    from transformers.modeling_rope_utils import _compute_longrope_parameters

    # deep copy: transformers normalises rope_scaling in place (adds rope_type etc.)
    return float(_compute_longrope_parameters(HFPhi3Config(**json.loads(json.dumps(cfg))))[1])


def test_mini_4k() -> None:
    c = parse_hf_config(PHI3_MINI_4K, "config.json")
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (3072, 32, 32, 96)
    assert c.sliding_window == 2047 and c.longrope is None and c.rope_theta == 10000.0
    assert c.rotary_dim == 96 and c.qkv_size == 3 * 3072
    assert c.eos_token_ids == (32000,) and not c.tie_word_embeddings


@pytest.mark.parametrize("rope_type", ["longrope", "su"])
def test_mini_128k_longrope_and_legacy_su(rope_type: str) -> None:
    raw = json.loads(json.dumps(PHI3_MINI_128K))
    raw["rope_scaling"]["type"] = rope_type
    c = parse_hf_config(raw, "config.json")
    assert c.longrope is not None
    assert c.longrope.short_factor == tuple(_factors(48, 1.0))
    assert c.longrope.long_factor == tuple(_factors(48, 2.0))
    assert c.longrope.original_max_position_embeddings == 4096
    # sqrt(1 + ln(131072/4096) / ln(4096)), checked against transformers below
    assert c.longrope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))


def test_longrope_attention_factor_matches_transformers() -> None:
    for cfg in (PHI3_MINI_128K, PHI4_MINI):
        assert parse_hf_config(cfg, "c").longrope.attention_factor == pytest.approx(
            _hf_attention_factor(cfg), rel=1e-12
        )


def test_explicit_attention_factor_wins() -> None:
    raw = json.loads(json.dumps(PHI3_MINI_128K))
    raw["rope_scaling"]["attention_factor"] = 1.5
    assert parse_hf_config(raw, "c").longrope.attention_factor == 1.5


def test_medium_gqa() -> None:
    c = parse_hf_config(PHI3_MEDIUM, "config.json")
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (40, 10, 128)
    assert c.qkv_size == (40 + 2 * 10) * 128


def test_phi4_mini_partial_rotary_tied() -> None:
    c = parse_hf_config(PHI4_MINI, "config.json")
    assert c.partial_rotary_factor == 0.75 and c.head_dim == 128 and c.rotary_dim == 96
    assert c.tie_word_embeddings and c.num_key_value_heads == 8
    assert len(c.longrope.long_factor) == 48 and c.eos_token_ids == (199999,)


@pytest.mark.parametrize("variant", ["mini-4k", "mini-128k", "medium", "phi4-mini"])
def test_transformers5_rope_parameters_equal_transformers4_spelling(variant: str) -> None:
    """transformers 5 writes rope_parameters; the same model in the v4 spelling must parse identically."""
    v5 = hf_config(variant).to_dict()
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rp = dict(v5["rope_parameters"])
    v4["rope_theta"] = rp.pop("rope_theta")
    v4["partial_rotary_factor"] = rp.pop("partial_rotary_factor", 1.0)
    rtype = rp.pop("rope_type")
    rp.pop("type", None)
    v4["rope_scaling"] = None if rtype == "default" else {"type": rtype, **rp}
    a, b = parse_hf_config(v5, "v5"), parse_hf_config(v4, "v4")
    assert a == b
    assert (a.longrope is not None) == (variant in ("mini-128k", "phi4-mini"))


def test_roundtrip_dict() -> None:
    c = parse_hf_config(PHI4_MINI, "c")
    assert Phi3Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def _bad(cfg: dict, match: str) -> None:
    with pytest.raises(UserError, match=match) as e:
        parse_hf_config(cfg, "some/config.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("some/config.json: ")


def test_missing_type_with_factors_is_an_error() -> None:
    rs = {k: v for k, v in PHI3_MINI_128K["rope_scaling"].items() if k != "type"}
    _bad({**PHI3_MINI_128K, "rope_scaling": rs}, "no 'type'")


@pytest.mark.parametrize("rtype", ["yarn", "linear", "dynamic", "llama3"])
def test_unknown_rope_type_is_an_error(rtype: str) -> None:
    _bad({**PHI3_MINI_4K, "rope_scaling": {"type": rtype, "factor": 2.0}}, "unsupported rope scaling type")


def test_unknown_architecture_is_an_error() -> None:
    _bad(
        {**PHI3_MINI_4K, "architectures": ["LlamaForCausalLM"], "model_type": "llama"},
        "unsupported architecture",
    )
    _bad(
        {k: v for k, v in PHI3_MINI_4K.items() if k != "architectures"} | {"model_type": "mistral"},
        "model_type",
    )


def test_wrong_factor_length_and_missing_fields() -> None:
    rs = dict(PHI3_MINI_128K["rope_scaling"], short_factor=[1.0] * 47)
    _bad({**PHI3_MINI_128K, "rope_scaling": rs}, "expected rotary_dim/2 = 48")
    _bad({k: v for k, v in PHI3_MINI_4K.items() if k != "hidden_size"}, "hidden_size")


def test_load_hf_config_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(UserError, match="no config.json") as e:
        load_hf_config(tmp_path)
    assert e.value.path == str(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON") as e:
        load_hf_config(tmp_path)
    assert e.value.path == str(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(PHI3_MEDIUM))
    assert load_hf_config(tmp_path).num_key_value_heads == 10
