"""The fields of a Hugging Face Phi-3 config.json that we read, typed and range-checked with pydantic.

Strict types: JSON `"false"` is not a bool, `128.7` or `"128"` is not an int, `null` is not a number. A bad
value becomes one UserError line naming the field and the file; values we do not read pass through untouched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

from .errors import UserError


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be finite")
    return v


# strict: JSON numbers only (an int is accepted where a float goes, a bool or string never)
Real = Annotated[float, Field(strict=True), AfterValidator(_finite)]
PosInt = Annotated[StrictInt, Field(gt=0)]
TokenId = Annotated[StrictInt, Field(ge=0)]
PosReal = Annotated[Real, Field(gt=0)]


class _Fields(BaseModel):
    model_config = ConfigDict(extra="allow")


class RopeFields(_Fields):
    """rope_scaling (transformers 4) / rope_parameters (transformers 5)."""

    type: StrictStr | None = None
    rope_type: StrictStr | None = None
    short_factor: list[PosReal] | None = None
    long_factor: list[PosReal] | None = None
    original_max_position_embeddings: PosInt | None = None
    attention_factor: PosReal | None = None
    rope_theta: PosReal | None = None
    partial_rotary_factor: Annotated[Real, Field(gt=0, le=1)] | None = None


class HFConfigFields(_Fields):
    architectures: list[StrictStr] | None = None
    model_type: StrictStr | None = None
    vocab_size: PosInt
    hidden_size: PosInt
    intermediate_size: PosInt
    num_hidden_layers: PosInt
    num_attention_heads: PosInt
    num_key_value_heads: PosInt | None = None
    head_dim: PosInt | None = None
    max_position_embeddings: PosInt = 4096
    original_max_position_embeddings: PosInt | None = None
    rms_norm_eps: PosReal = 1e-5
    rope_theta: PosReal = 10000.0
    partial_rotary_factor: Annotated[Real, Field(gt=0, le=1)] = 1.0
    rope_scaling: RopeFields | None = None
    rope_parameters: RopeFields | None = None
    # 0 / null: no window (as before); a negative window is nonsense
    sliding_window: Annotated[StrictInt, Field(ge=0)] | None = None
    hidden_act: StrictStr = "silu"
    tie_word_embeddings: StrictBool = False
    attention_bias: StrictBool | None = None
    mlp_bias: StrictBool | None = None
    bos_token_id: TokenId | None = 1
    eos_token_id: TokenId | list[TokenId] | None = 32000
    pad_token_id: TokenId | None = None


_BRANCH_TAGS = {"int", "float", "str", "bool", "list", "dict", "none"}


def _describe(err: dict[str, Any]) -> str:
    # a union adds its branch (e.g. "list[constrained-int]") to the location: keep field names and indices
    parts = [
        str(p)
        for p in err["loc"]
        if isinstance(p, int) or (str(p).isidentifier() and str(p) not in _BRANCH_TAGS)
    ]
    loc = ".".join(parts) or "config"
    if err["type"] == "missing":
        return f"'{loc}' is missing"
    got = json.dumps(err.get("input"), default=str)
    if len(got) > 60:
        got = got[:57] + "..."
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:]
    return f"'{loc}': {msg}, got {got}"


def validate_hf_fields(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """`cfg` with the fields we read checked; UserError (field + file, one line) on the first bad one."""
    try:
        HFConfigFields.model_validate(cfg)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        # a union (e.g. int | list[int]) reports one error per branch: the first is the plainest
        raise UserError(_describe(errs[0]), path) from None
    return cfg
