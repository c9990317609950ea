"""TVM's CPU pool is sized by us (`toolkit/cpu_threads.py`): TVM's own default started one thread on
2-vCPU VMs, which halved every command's speed there, and bound the main thread to CPU 0. Each case runs in
a fresh process, as a command does (the pool's size is fixed when it first starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from toolkit.cpu_threads import physical_cores

REPORT = (
    "import json, os\n"
    "from toolkit.cpu_threads import pool_threads\n"
    "print(json.dumps({'pool': pool_threads(), 'cpus': sorted(os.sched_getaffinity(0)),"
    " 'env': os.environ.get('TVM_NUM_THREADS')}))\n"
)


def _run(code: str, env_threads: str | None = None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    if env_threads is not None:
        env["TVM_NUM_THREADS"] = env_threads
    # TVM imported as a command imports it (without torch: 2 s sooner a child)
    code = "from toolkit.tvm_compat import tvm_without_torch\ntvm_without_torch()\n" + code + REPORT
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


SIZE = "from toolkit.cpu_threads import size_thread_pool\nsize_thread_pool({n})\n"
ALL_CPUS = sorted(os.sched_getaffinity(0))


def test_pool_takes_the_asked_count_unpinned() -> None:
    got, _ = _run(SIZE.format(n=1))
    assert got == {"pool": 1, "cpus": ALL_CPUS, "env": "1"}  # worker processes started later size alike


@pytest.mark.skipif(physical_cores() < 2, reason="one core: one thread either way")
def test_default_is_one_thread_per_core_unless_tvm_num_threads_says_otherwise() -> None:
    # `load_engine(threads=None)` sizes the pool this way
    got, _ = _run(SIZE.format(n=None))
    assert got["pool"] == physical_cores() and got["cpus"] == ALL_CPUS
    assert _run(SIZE.format(n=None), env_threads="1")[0]["pool"] == 1


@pytest.mark.skipif(physical_cores() < 2, reason="one core: the pool cannot be too small")
def test_a_pool_started_too_small_says_so_and_leaves_the_cpus_alone() -> None:
    started = "import os; from toolkit.cpu_threads import pool_threads; pool_threads()\n"  # starts the pool
    got, err = _run(started + SIZE.format(n=2), env_threads="1")
    assert got["pool"] == 1 and got["cpus"] == ALL_CPUS
    assert "notice: TVM's CPU thread pool started earlier with 1 thread(s); running 1, not 2" in err


def test_more_threads_than_cpus_says_what_runs_and_why() -> None:
    """TVM makes at most one pool thread per CPU: asking for more runs that many, and the notice names the
    CPUs, not a pool started too early (which it was not)."""
    got, err = _run(SIZE.format(n=len(ALL_CPUS) + 5))
    assert got["pool"] == len(ALL_CPUS)
    notice = f"notice: running {len(ALL_CPUS)} thread(s), not {len(ALL_CPUS) + 5}: this process may use"
    assert notice in err and "started earlier" not in err, err


@pytest.mark.parametrize("value", ["abc", "-2", "0"])
def test_a_malformed_count_runs_one_per_core_with_a_notice(value) -> None:
    """TVM reads a TVM_NUM_THREADS it cannot use as its default; so do we, but say so unless it is 0 (TVM's
    own way to ask for the default)."""
    got, err = _run(SIZE.format(n=None), env_threads=value)
    assert got["pool"] == physical_cores()
    notice = f"notice: TVM_NUM_THREADS='{value}' is not a count of threads; running {physical_cores()}"
    assert (notice in err) == (value != "0"), err
