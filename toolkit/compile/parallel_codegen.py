"""Host libraries built in parts: one LLVM module per part, optimised and written out on several cores.

LLVM optimises and emits a module on one core, and a model's kernels are independent functions. Split over
several modules, the cores share that work (TVM's FFI releases the GIL while LLVM runs). The parts link into
one shared library; TVM loads it like any other, since a kernel is looked up in the library itself, whichever
object file holds it.

Only for plain host libraries (kind llvm, not a system library): a system library registers its kernels
from each module's own constructor, and GPU presets build device modules, so those go through
`relax.build` as one module.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tvm
from tvm import IRModule, relax
from tvm.relax import _ffi_api as relax_ffi
from tvm.relax import vm_build

# two parts per thread: kernels differ a lot in size, so smaller parts even out the threads' work
_PARTS_PER_THREAD = 2
_MAX_THREADS = 4


def codegen_threads() -> int:
    """Threads for LLVM: the CPUs this process may use, at most `_MAX_THREADS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call on this OS
        n = os.cpu_count() or 1
    return max(1, min(n, _MAX_THREADS))


def split(mod: IRModule, parts: int) -> list[IRModule]:
    """The module's functions dealt round-robin into at most `parts` modules (none empty), attrs kept."""
    items = list(mod.functions_items())
    parts = max(1, min(parts, len(items)))
    return [IRModule(dict(items[i::parts]), attrs=mod.attrs) for i in range(parts)]


def _run_all(fn: Callable, args: list, threads: int) -> list:
    """`fn` over `args` on `threads` threads, each under the caller's PassContext settings (a PassContext
    is per thread; its instruments stay with the caller, as they time one pass at a time)."""
    ctx = tvm.transform.PassContext.current()

    def run(arg):
        with tvm.transform.PassContext(
            opt_level=ctx.opt_level,
            required_pass=list(ctx.required_pass),
            disabled_pass=list(ctx.disabled_pass),
            config=dict(ctx.config),
        ):
            return fn(arg)

    if threads <= 1 or len(args) <= 1:
        return [run(a) for a in args]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, args))


def build_vm(
    mod: IRModule, target: tvm.target.Target, relax_pipeline: tvm.transform.Pass, threads: int | None = None
) -> relax.VMExecutable:
    """`relax.build(mod, target, relax_pipeline=...)` for a host llvm target, kernels compiled in parts."""
    if target.kind.name != "llvm":
        raise ValueError(f"parallel codegen is for host llvm targets, not {target.kind.name}")
    threads = codegen_threads() if threads is None else threads
    with target:
        mod = relax_pipeline(mod)
    attrs = dict(mod.attrs) if mod.attrs else {}
    ext_libs = list(attrs.get("external_mods", []))
    params = dict(attrs.get("const_name_to_constant", {}))
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    tir_mod = vm_build._filter_tir(mod)
    libs = []
    if tir_mod is not None:
        parts = split(tir_mod, threads * _PARTS_PER_THREAD)
        libs = _run_all(lambda part: tvm.tirx.build(part, target=target, pipeline="default"), parts, threads)
    # the first part is the library the executable is linked with (VMLink makes an empty C module when there
    # is none), the others are imported beside it
    lib = relax_ffi.VMLink(builder, target, libs[0] if libs else None, libs[1:] + ext_libs, params)
    return relax.VMExecutable(lib)


def export_shared(executable: relax.VMExecutable, path: str | Path, threads: int | None = None) -> None:
    """`executable.export_library(path)` for a host `.so`, its object files written side by side.

    The same steps as TVM's export: one object per compiled module, the imports packed into one more, all
    linked by the system compiler."""
    from tvm.runtime import _ffi_api
    from tvm.support import cc

    threads = codegen_threads() if threads is None else threads
    root = executable.mod
    modules = root._collect_dso_modules()
    if any(m.kind != "llvm" for m in modules):
        raise ValueError(f"export_shared writes host llvm modules only, not {[m.kind for m in modules]}")
    with tempfile.TemporaryDirectory() as work:
        files = [os.path.join(work, f"lib{i}.o") for i in range(len(modules))]
        _run_all(lambda i: modules[i].write_to_file(files[i]), list(range(len(modules))), threads)
        if root.imports:
            llvm_target = modules[0].get_function("_get_target_string")()
            packed = _ffi_api.ModulePackImportsToLLVM(root, False, llvm_target, "")
            files.append(os.path.join(work, "devc.o"))
            packed.write_to_file(files[-1])
        cc.create_shared(str(path), files)
