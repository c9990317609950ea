"""Mutated config.json files: every field we read, wrong type / out of range / missing, and broken JSON.

Each case: `phi3 inspect` on a checkpoint whose config.json holds the bad value exits non-zero with one line
naming config.json and the field, and leaves the folder byte-identical. A few run through `generate` and
`convert` too (the same parse must stop them before any model work).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bad_util import TINY_CONFIG, assert_clean_failure, run, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.config import parse_hf_config
from toolkit.errors import UserError

POSITIVE_INT_FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
]
BAD_POSITIVE_INTS = [0, -1, 128.7, "abc", "64", [1, 2], True, {"a": 1}, 1e400]
REQUIRED = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
POSITIVE_FLOAT_FIELDS = ["rms_norm_eps", "rope_theta"]
BAD_POSITIVE_FLOATS = [0, -1, -1e-5, "abc", None, [1.0], True, math.nan, math.inf]

CASES: list[tuple[str, dict, str]] = []  # (id, patch, field named in the message)
for f in POSITIVE_INT_FIELDS:
    for v in BAD_POSITIVE_INTS:
        CASES.append((f"{f}={v!r}", {f: v}, f))
for f in REQUIRED:
    CASES.append((f"{f}=null", {f: None}, f))
for f in POSITIVE_FLOAT_FIELDS:
    for v in BAD_POSITIVE_FLOATS:
        CASES.append((f"{f}={v!r}", {f: v}, f))
for v in [0, -0.5, 1.5, "half", None, [0.5]]:
    CASES.append((f"partial_rotary_factor={v!r}", {"partial_rotary_factor": v}, "partial_rotary_factor"))
for v in ["false", "true", "no", 0, 1, None, [False]]:
    CASES.append((f"tie_word_embeddings={v!r}", {"tie_word_embeddings": v}, "tie_word_embeddings"))
for v in [-1, "16", 1.5, True, [16]]:
    CASES.append((f"sliding_window={v!r}", {"sliding_window": v}, "sliding_window"))
for f in ["bos_token_id", "pad_token_id"]:
    for v in [-1, "x", 1.5, [1]]:
        CASES.append((f"{f}={v!r}", {f: v}, f))
for v in [-2, "x", 2.5, [2, "x"], [2, -1], {"id": 2}]:
    CASES.append((f"eos_token_id={v!r}", {"eos_token_id": v}, "eos_token_id"))
for v in [-1, 1.5, "4"]:
    CASES.append((f"head_dim={v!r}", {"head_dim": v}, "head_dim"))
CASES += [
    ("hidden_size_not_multiple_of_heads", {"hidden_size": 66}, "hidden_size"),
    ("heads_not_multiple_of_kv", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("rope_scaling=string", {"rope_scaling": "longrope"}, "rope_scaling"),
    ("rope_scaling=list", {"rope_scaling": [1, 2]}, "rope_scaling"),
    ("rope_scaling=yarn", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "yarn"),
    (
        "rope_scaling.short_factor=str",
        {"rope_scaling": {"type": "longrope", "short_factor": ["a"] * 8, "long_factor": [1.0] * 8}},
        "short_factor",
    ),
    (
        "rope_scaling.long_factor=nan",
        {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [math.nan] * 8}},
        "long_factor",
    ),
    (
        "rope_scaling.factors_wrong_length",
        {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}},
        "longrope",
    ),
    (
        "rope_scaling.no_type",
        {"rope_scaling": {"short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
        "type",
    ),
    (
        "rope_parameters.rope_theta=0",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 0}},
        "rope_theta",
    ),
    ("original_max_position_embeddings=0", {"original_max_position_embeddings": 0}, "original_max_position"),
    ("architectures=string", {"architectures": "Phi3ForCausalLM"}, "architectures"),
    ("architectures=llama", {"architectures": ["LlamaForCausalLM"]}, "architecture"),
    ("hidden_act=gelu", {"hidden_act": "gelu"}, "hidden_act"),
    ("hidden_act=number", {"hidden_act": 3}, "hidden_act"),
    ("attention_bias=true", {"attention_bias": True}, "bias"),
    ("attention_bias=str", {"attention_bias": "no"}, "attention_bias"),
    ("model_type_no_arch", {"architectures": None, "model_type": "llama"}, "model_type"),
]
for f in REQUIRED:
    CASES.append((f"missing_{f}", {f: ...}, f))  # ... = delete the key


def _write_case(tmp_path: Path, ckpt: Path, cfg_text: str | bytes) -> Path:
    """A checkpoint folder with this config.json and the tiny model's other files linked in."""
    d = tmp_path / "m"
    d.mkdir()
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (d / f.name).symlink_to(f)
    p = d / "config.json"
    p.write_bytes(cfg_text if isinstance(cfg_text, bytes) else cfg_text.encode())
    return d


def _patched(patch: dict) -> str:
    cfg = dict(TINY_CONFIG)
    for k, v in patch.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return json.dumps(cfg)  # NaN / Infinity spelled as Python's json writes (and reads) them


@pytest.mark.parametrize("patch, field", [(p, f) for _, p, f in CASES], ids=[i for i, _, _ in CASES])
def test_bad_config_field_is_one_line_naming_field_and_file(tmp_path, ckpt, patch, field) -> None:
    d = _write_case(tmp_path, ckpt, _patched(patch))
    before = snapshot(d)
    line = assert_clean_failure(run(["inspect", d]), "config.json", before, d)
    assert field in line, line


BROKEN_JSON = {
    "empty": b"",
    "truncated": json.dumps(TINY_CONFIG).encode()[:40],
    "array": b"[1, 2, 3]",
    "string": b'"phi3"',
    "invalid_utf8": b'{"vocab_size": "\xff\xfe"}',
    "trailing_garbage": json.dumps(TINY_CONFIG).encode() + b"}}",
    "nul_bytes": b"\0" * 64,
}


@pytest.mark.parametrize("text", list(BROKEN_JSON.values()), ids=list(BROKEN_JSON))
def test_broken_config_json(tmp_path, ckpt, text) -> None:
    d = _write_case(tmp_path, ckpt, text)
    before = snapshot(d)
    assert_clean_failure(run(["inspect", d]), "config.json", before, d)


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "{m}", "-p", "hi"],
        ["convert", "{m}", "-o", "{out}", "--no-progress"],
        ["export-gguf", "{m}", "-o", "{out}.gguf"],
        ["compile", "{m}", "-o", "{out}"],
    ],
    ids=["generate", "convert", "export-gguf", "compile"],
)
def test_bad_config_stops_every_command(tmp_path, ckpt, command) -> None:
    d = _write_case(tmp_path, ckpt, _patched({"tie_word_embeddings": "false"}))
    out = tmp_path / "out"
    args = [a.format(m=d, out=out) for a in command]
    before = snapshot(tmp_path)
    assert_clean_failure(run(args), "tie_word_embeddings", before, tmp_path)


# property-based: any non-integer value in any integer field is refused by the parser, naming the field
_non_ints = st.one_of(
    st.text(max_size=5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.integers(max_value=0),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(POSITIVE_INT_FIELDS), value=_non_ints)
def test_property_any_non_positive_int_is_refused(field: str, value) -> None:
    if field == "num_key_value_heads" and value is None:
        return  # null means "same as num_attention_heads" (HF semantics)
    cfg = {**TINY_CONFIG, field: value}
    with pytest.raises(UserError) as e:
        parse_hf_config(cfg, Path("/m/config.json"))
    msg = str(e.value)
    assert "/m/config.json" in msg and field in msg and "\n" not in msg


@settings(max_examples=40, deadline=None)
@given(value=st.one_of(st.floats(max_value=0), st.floats(allow_nan=True).filter(lambda x: x != x), st.text()))
def test_property_rms_norm_eps_must_be_positive_finite(value) -> None:
    with pytest.raises(UserError, match="rms_norm_eps"):
        parse_hf_config({**TINY_CONFIG, "rms_norm_eps": value}, Path("/m/config.json"))
