from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# quiet coremltools/transformers chatter and keep torch from oversubscribing a 2-core box
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one process per core already: TVM's spinning pool threads and torch's OpenMP pool would fight over them
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


@pytest.fixture(scope="session", autouse=True)
def session_toolkit_cache(tmp_path_factory) -> Path:
    """One JIT cache per test session: a tiny library (or converted weights) built by one test is reused by
    every later test with the same config, scheme and preset (`compiled_for`), and nothing is read from or
    left in the user's ~/.cache (a stale library can't make a test pass). Tests that need an empty cache
    still point PHI3_TOOLKIT_CACHE at their own folder."""
    # under pytest-xdist every worker has its own basetemp inside one shared root: the workers share the cache
    # (the JIT cache's own file locks make a second worker wait for a library the first is building)
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    cache = root / "phi3-toolkit-cache"
    cache.mkdir(exist_ok=True)
    old = os.environ.get("PHI3_TOOLKIT_CACHE")
    os.environ["PHI3_TOOLKIT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("PHI3_TOOLKIT_CACHE", None)
    else:
        os.environ["PHI3_TOOLKIT_CACHE"] = old


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `-n N --dist loadgroup` (scripts/test): a test file runs whole on one worker, so its module fixtures
    # (a compiled tiny library, a converted model) are built once; files declaring a shared group run together
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
