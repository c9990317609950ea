"""Threads only where a kernel has the work to pay for them, also when its size is known only at run time.

A host kernel whose size is symbolic (decode's elementwise kernels and norms are shared by every batch
size) is parallelized for the largest batch; at batch 1 each call then wakes the thread pool for a few
thousand elements, and the launch and the wait for the other threads cost more than the work. The
schedule rules mark such a loop (`parallel_if_enough`) with the least extent worth a launch; this pass,
run after scheduling, turns each marked loop into `if extent >= least: <parallel loop> else: <the same
loop, serial>`. A loop whose extent is known at compile time is parallel or not from the start."""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import IRModule

LEAST_EXTENT = "toolkit.parallel_least_extent"  # loop annotation: the extent from which to use threads
MIN_PARALLEL_ELEMS = 1 << 15  # elements of simple work (a cast, a norm) worth a thread launch


def parallel_if_enough(sch: s_tir.Schedule, loop, per_iteration: int) -> None:
    """Make `loop` parallel when its iterations (`per_iteration` elements each) reach MIN_PARALLEL_ELEMS:
    now if its extent is a number, else at run time (the annotation this module's pass reads)."""
    least = -(-MIN_PARALLEL_ELEMS // per_iteration)
    extent = sch.get(loop).extent
    if isinstance(extent, tirx.IntImm):
        if int(extent) >= least:
            sch.parallel(loop)
        return
    sch.parallel(loop)
    sch.annotate(loop, LEAST_EXTENT, least)


def _guard(loop: tirx.For) -> tirx.Stmt:
    least = int(loop.annotations[LEAST_EXTENT])
    rest = {k: v for k, v in loop.annotations.items() if k != LEAST_EXTENT}

    def copy(kind: tirx.ForKind) -> tirx.For:
        return tirx.For(loop.loop_var, loop.min, loop.extent, kind, loop.body, loop.thread_binding, rest)

    threads = copy(tirx.ForKind.PARALLEL)
    return tirx.IfThenElse(loop.extent >= least, threads, copy(tirx.ForKind.SERIAL))


def _guard_func(func: tirx.PrimFunc) -> tirx.PrimFunc:
    def visit(loop: tirx.For) -> tirx.Stmt:
        return _guard(loop) if LEAST_EXTENT in loop.annotations else loop

    body = tvm_ffi.structural_map(func.body, (tirx.For, visit))
    return func if body.same_as(func.body) else func.with_body(body)


def guard_small_parallel_loops(mod: IRModule) -> IRModule:
    """`mod` with every loop `parallel_if_enough` marked split into its parallel and serial versions."""
    changed = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            new = _guard_func(func)
            if not new.same_as(func):
                changed[gv] = new
    if not changed:
        return mod
    # the two copies share their loop and block variables: TIR defines each variable once
    renamed = tirx.transform.ConvertSSA()(IRModule(changed))
    out = IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in renamed.functions.items():
        out[gv] = func
    return out
