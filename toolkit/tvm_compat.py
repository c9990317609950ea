"""Every place the toolkit changes TVM's own Python objects for the whole process, with why.

Kept here so they are found in one place and nowhere else patches TVM:

- `use_cpu_tensor_intrinsics_only`: TVM's tensor-intrinsic package registers every CUDA tensor-core
  intrinsic on import (297 s on a loaded 2-core machine); CPU tuning needs only the x86/ARM ones.
- `capture_schedules`: MetaSchedule replays a rule's trace only on the PrimFunc the trace was built from,
  and our host q4 rules schedule a rewritten copy; TVM offers no hook to see that copy, so `s_tir.Schedule`
  is wrapped while the rules run.

(Registering our `target.build.vulkan` over TVM's is the Vulkan backend itself: `toolkit.backends.vulkan`.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

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
