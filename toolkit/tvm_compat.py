"""Every place the toolkit changes TVM's own Python objects for the whole process, with why.

Kept here so they are found in one place and nowhere else patches TVM:

- `use_cpu_tensor_intrinsics_only`: TVM's tensor-intrinsic package registers every CUDA tensor-core
  intrinsic on import (297 s on a loaded 2-core machine); CPU tuning needs only the x86/ARM ones.
- `capture_schedules`: MetaSchedule replays a rule's trace only on the PrimFunc the trace was built from,
  and our host q4 rules schedule a rewritten copy; TVM offers no hook to see that copy, so `s_tir.Schedule`
  is wrapped while the rules run.
- `fast_script_frames`: TVMScript's parser takes `inspect.stack()` on every `@T.prim_func` / macro to
  resolve closure variables; the stdlib version looks up each frame's module by scanning `sys.modules`,
  which with torch/transformers loaded (tests, Core ML export) made parsing our kernels the larger part of
  a compile. The parser's `inspect` gets frames with their source line read from linecache instead.
- `memo_script_sources`: our kernel builders define their `@T.prim_func` and `@T.macro` functions inside
  the builder, so every build makes TVMScript find each function's source lines again (`inspect`) and
  parse them again (twice: once more for the names in its annotations), a quarter of a tiny model's
  compile. A function's source is fixed by its code object and the tree by the source text, and the parser
  only reads the tree, so both are kept for the process; the closure values, which do change from build
  to build, are still read at every parse.
- `memo_kv_cache_kernels`: TVM's paged KV cache builds its ~20 attention and copy kernels from TVMScript on
  every model export, host included (where ours then replace most of them). They are pure functions of head
  counts, dtype and target, so its module calls them through `kernel_memo.memo_kernel`: a second compile in
  the process (a knob search, compiles for several devices, the test suite) reuses them.
- `tvm_without_torch`: `import tvm` imports torch whenever it is installed (tvm_ffi and relax's Python
  module, for their optional torch interop), which is most of the time a `phi3` command spends importing
  TVM. `phi3` never hands torch tensors to TVM, so its first `import tvm` runs as if torch were not
  installed (a setup both support); torch itself stays importable afterwards.

(Registering our `target.build.vulkan` over TVM's is the Vulkan backend itself: `toolkit.backends.vulkan`.)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import linecache
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tvm.target import Target


def use_cpu_tensor_intrinsics_only(target: Target) -> None:
    """Make `import tvm.s_tir.tensor_intrin` (done by every TuneContext and by the default builder) register
    only the CPU intrinsics when tuning an llvm target. The full package also builds all CUDA tensor-core
    intrinsics: measured 297 s to import on this 2-core machine under load, against 6 s for x86 alone.
    No effect once the real package is imported, or for GPU targets."""
    import importlib
    import sys
    import types
    from pathlib import Path

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if target.kind.name != "llvm" or name in sys.modules:
        return
    light = types.ModuleType(name)
    light.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    sys.modules[name] = light
    tvm.s_tir.tensor_intrin = light
    triple = str(target.attrs.get("mtriple", "") or "")
    importlib.import_module(f"{name}.{'arm_cpu' if triple.startswith('aarch64') else 'x86'}")


@contextmanager
def capture_schedules(created: list) -> Iterator[None]:
    """Record (Schedule, input) for every s_tir.Schedule built inside: a rule may schedule a rewritten copy
    of its PrimFunc (the host q4 GEMV rule does), and the trace only replays on what it was built from."""
    from tvm import s_tir

    original = s_tir.Schedule

    def capturing(mod, *args, **kwargs):
        sch = original(mod, *args, **kwargs)
        created.append((sch, mod))
        return sch

    s_tir.Schedule = capturing
    try:
        yield
    finally:
        s_tir.Schedule = original


def _frame_infos(frame: types.FrameType | None, context: int = 1) -> list[inspect.FrameInfo]:
    """`inspect.getouterframes` with at most the current line as context, read through linecache."""
    infos = []
    while frame is not None:
        code, lineno = frame.f_code, frame.f_lineno
        line = linecache.getline(code.co_filename, lineno, frame.f_globals) if context > 0 else ""
        lines, index = ([line], 0) if line else (None, None)
        infos.append(inspect.FrameInfo(frame, code.co_filename, lineno, code.co_name, lines, index))
        frame = frame.f_back
    return infos


def _fast_inspect() -> types.ModuleType:
    fast = types.ModuleType("inspect")
    fast.__getattr__ = lambda name: getattr(inspect, name)  # everything else is the stdlib's
    fast.stack = lambda context=1: _frame_infos(sys._getframe(1), context)
    fast.getouterframes = _frame_infos
    return fast


# the TVM modules that take whole stacks while parsing TVMScript
_SCRIPT_MODULES = (
    "tvm.script.parser.core.parser",
    "tvm.script.parser.ir.entry",
    "tvm.tirx.script.parser.entry",
    "tvm.tirx.script.builder.ir",
    "tvm.relax.script.parser.entry",
)


def fast_script_frames() -> None:
    """Give TVMScript's parser modules a cheap `inspect.stack` (see the module docstring); idempotent."""
    import importlib

    fast = None
    for name in _SCRIPT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a TVM without that parser: nothing to speed up there
            continue
        if getattr(module, "inspect", None) is inspect:
            fast = fast or _fast_inspect()
            module.inspect = fast


_SOURCE_MEMO = 1024  # functions and source texts kept: a compile parses about 100


def _per_code(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`fn(obj)` computed once per code object for functions (their source is fixed by it), up to
    `_SOURCE_MEMO` of them; anything else goes through."""
    seen: dict[types.CodeType, Any] = {}

    def per_code(obj: Any) -> Any:
        code = getattr(obj, "__code__", None)
        if code is None or (code not in seen and len(seen) >= _SOURCE_MEMO):
            return fn(obj)
        if code not in seen:
            seen[code] = fn(obj)
        return seen[code]

    return per_code


def memo_script_sources() -> None:
    """Make TVMScript read each function's source and parse each source text once per process (see the
    module docstring); idempotent."""
    import functools

    from tvm.script.parser.core import diagnostics, doc, utils

    source = diagnostics.Source
    if getattr(source, "memoized", False):
        return
    init = source.__init__

    def read(program: Any) -> dict:
        fresh = source.__new__(source)
        init(fresh, program)
        return dict(vars(fresh))

    fields = _per_code(read)
    names = _per_code(utils._collect_annotation_names)  # parses the source again, for PEP 563 annotations
    parse = functools.lru_cache(maxsize=_SOURCE_MEMO)(doc.parse)
    source.__init__ = lambda self, program: vars(self).update(fields(program))
    source.as_ast = lambda self: parse(self.source)
    utils._collect_annotation_names = lambda obj: set(names(obj))
    source.memoized = True


def memo_kv_cache_kernels() -> None:
    """Route `tvm.relax.frontend.nn.llm.kv_cache`'s kernel builders (TVM's, and the drop-ins of
    model/kv_kernels.py) through `memo_kernel` (see the module docstring); idempotent."""
    from tvm.relax.frontend.nn.llm import kv_cache

    from .kernel_memo import memo_kernel

    owners = ("tvm.relax.frontend.nn.llm.", "toolkit.")  # the kernel modules; not typing's or math's
    for name, value in list(vars(kv_cache).items()):
        module = getattr(value, "__module__", "")
        builder = inspect.isfunction(value) and module.startswith(owners) and module != kv_cache.__name__
        if builder and not getattr(value, "memoized", False):
            setattr(kv_cache, name, memo_kernel(value))


class _TvmWithoutTorch(importlib.abc.MetaPathFinder):
    """Finds `tvm_ffi` and `tvm` through the normal path finder and runs each package's import with torch
    hidden; answers nothing else (None: the next finder looks)."""

    def __init__(self) -> None:
        self.pending = {"tvm_ffi", "tvm"}

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_without_torch(module: types.ModuleType) -> None:
            hidden = "torch" not in sys.modules
            if hidden:
                sys.modules["torch"] = None  # `import torch` raises ImportError, as when it is not installed
            try:
                exec_module(module)
            finally:
                if hidden and "torch" in sys.modules and sys.modules["torch"] is None:
                    del sys.modules["torch"]

        spec.loader.exec_module = exec_without_torch
        return spec


def tvm_without_torch() -> None:
    """Make this process's first `import tvm` (and `import tvm_ffi`) skip torch (see the module docstring).
    No effect once TVM or torch is imported; idempotent."""
    if "tvm" in sys.modules or "torch" in sys.modules:
        return
    if not any(isinstance(f, _TvmWithoutTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _TvmWithoutTorch())
