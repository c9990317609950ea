"""TVM's CPU thread pool, sized by us.

TVM's own default is not one thread per core everywhere: on 2-vCPU VMs (no SMT, two cores by psutil) its
pool started one thread, so every command that runs or times CPU kernels sizes the pool itself, in this
process and, through TVM_NUM_THREADS, in the worker processes it starts (MetaSchedule's runners)."""

from __future__ import annotations

import os
import sys

# TVM's pool modes: 1/0 pin threads to the "big" cores, which on a VM without cpufreq data means all threads
# (and this process, and every child it starts later, e.g. a llama.cpp worker) on CPU 0. -3
# (kSpecifyThreadShareAllCore) lets each pool thread run on any CPU this process may use.
_SHARE_ALL_CORES = -3
# the CPUs this process may use, read before TVM's pool can exist: starting the pool binds the calling thread
# to CPU 0 on some hosts (a 2-vCPU VM), and every process started from it later would inherit that one CPU
_AFFINITY = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def usable_cpus() -> int:
    """The CPUs this process may run on (TVM's pool makes at most one thread per CPU)."""
    return len(_AFFINITY) if _AFFINITY else os.cpu_count() or 1


def physical_cores() -> int:
    """This machine's physical cores (SMT siblings share the vector units: extra threads add contention)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def default_threads() -> int:
    """TVM_NUM_THREADS when set to a positive count (TVM's own knob, e.g. one per test worker), else one
    thread per physical core."""
    env = os.environ.get("TVM_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = physical_cores()
    if env and env != "0":  # TVM reads 0 as its default too; other values would be a typo
        print(
            f"notice: TVM_NUM_THREADS={env!r} is not a count of threads; running {cores} (one per core)",
            file=sys.stderr,
        )
    return cores


def size_thread_pool(n: int | None = None) -> int:
    """Give TVM's CPU pool `n` threads (None: `default_threads()`), unpinned; returns the threads it runs.

    TVM fixes the pool's size when the pool first starts (in this thread), so sizing must come first: a
    pool started earlier with fewer threads keeps them, and a one-line notice says so."""
    import tvm

    n = int(n or default_threads())
    os.environ["TVM_NUM_THREADS"] = str(n)  # worker processes started from here size their pools alike
    cpus = [str(c) for c in sorted(_AFFINITY)] if _AFFINITY else []
    tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, n, cpus)
    if _AFFINITY and os.sched_getaffinity(0) != _AFFINITY:
        os.sched_setaffinity(0, _AFFINITY)
    got = pool_threads()
    cpus = usable_cpus()
    if got < n and n > cpus and got >= cpus:  # TVM makes at most one pool thread per CPU
        print(
            f"notice: running {got} thread(s), not {n}: this process may use {cpus} CPU(s)",
            file=sys.stderr,
        )
    elif got < n:
        print(
            f"notice: TVM's CPU thread pool started earlier with {got} thread(s); running {got}, not {n} "
            "(set TVM_NUM_THREADS before the first kernel runs)",
            file=sys.stderr,
        )
    return got


def pool_threads() -> int:
    """The threads TVM's CPU pool runs a parallel kernel with now."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())
