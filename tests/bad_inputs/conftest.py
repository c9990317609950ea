"""Fixtures of the bad-input suite: one tiny checkpoint per session. Their JIT cache and lock files are the
session's private cache (tests/conftest.py), shared with the other workers: a cache of their own, set for the
rest of a worker's session, made every later test on that worker compile its libraries again."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_util import write_checkpoint


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A valid tiny Hugging Face checkpoint. Tests must not modify it (they copy or link it)."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
