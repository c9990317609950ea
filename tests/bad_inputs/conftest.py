"""Fixtures of the bad-input suite: one tiny checkpoint per session, and a private cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bad_util import write_checkpoint


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    # never touch the user's ~/.cache; the lock files and JIT caches of these cases live here
    cache = tmp_path_factory.mktemp("phi3-cache")
    old = os.environ.get("PHI3_TOOLKIT_CACHE")
    os.environ["PHI3_TOOLKIT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("PHI3_TOOLKIT_CACHE", None)
    else:
        os.environ["PHI3_TOOLKIT_CACHE"] = old


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A valid tiny Hugging Face checkpoint. Tests must not modify it (they copy or link it)."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
