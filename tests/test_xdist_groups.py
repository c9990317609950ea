"""scripts/test runs a test file whole on one worker (`--dist loadgroup`, groups set in tests/conftest.py), so
its module fixtures are built once; a pytest / pytest-xdist pair that ignores the groups would build them
on every worker and push the suite past its time budget without failing anything else."""

from __future__ import annotations

import os

import pytest


def test_this_file_runs_as_its_own_group(request: pytest.FixtureRequest) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER") or not request.config.getvalue("loadgroup"):
        pytest.skip("only under pytest-xdist with --dist loadgroup (scripts/test)")
    assert request.node.nodeid.endswith("@test_xdist_groups"), request.node.nodeid
