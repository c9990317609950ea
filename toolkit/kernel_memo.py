"""One build per kernel and arguments in a process.

A kernel written in TVMScript is parsed again on every call of its builder, and parsing is most of what a
build costs. One compile asks for the same kernel more than once (two quantized matmuls of one shape), and a
process that compiles several libraries (a knob search, the test suite, compiles for several devices) asks
for the same kernel many times. Builders are pure functions of their arguments and TVM's IR is immutable,
so a builder wrapped by `memo_kernel` hands back the function it built before for equal arguments.

Arguments are compared by value: TVM objects (a PrimFunc, a Buffer, an expression) by structural equality
(hashed, then confirmed), a Target by its exported attributes, containers and frozen dataclasses field by
field. An argument of another type makes the call go through unmemoized.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

MAX_ENTRIES = 256  # per builder; a Phi-3 compile builds about 40 distinct kernels


class _Unkeyable(Exception):
    pass


def _key(x: Any, objects: list) -> Any:
    """A hashable stand-in for `x`; the TVM objects met are appended to `objects` for the equality check."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return (type(x).__name__, x)  # 1, 1.0 and True build different kernels
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(_key(v, objects) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple(sorted((repr(k), _key(v, objects)) for k, v in x.items())))
    if dataclasses.is_dataclass(x) and not isinstance(x, type) and type(x).__hash__ is not None:
        fields = (_key(getattr(x, f.name), objects) for f in dataclasses.fields(x))
        return (type(x).__qualname__, tuple(fields))
    from tvm.target import Target

    if isinstance(x, Target):
        return ("Target", json.dumps(x.export(), sort_keys=True, default=str))
    import tvm_ffi

    if isinstance(x, tvm_ffi.Object):
        try:
            h = tvm_ffi.structural_hash(x)
        except Exception:  # an object without structural hashing: not memoized
            raise _Unkeyable from None
        objects.append(x)
        return ("Object", type(x).__name__, h)
    raise _Unkeyable


def _same(a: list, b: list) -> bool:
    import tvm_ffi

    return len(a) == len(b) and all(tvm_ffi.structural_equal(x, y) for x, y in zip(a, b))


def memo_kernel(builder: F | None = None, *, derived: Iterable[str] = ()) -> F:
    """`builder` with an in-process memo (see the module docstring). `derived` names keyword or positional
    parameters that are functions of the other arguments (a pattern match of the PrimFunc argument): they
    are left out of the key."""
    if builder is None:
        return functools.partial(memo_kernel, derived=derived)  # type: ignore[return-value]
    import inspect

    signature = inspect.signature(builder)
    skip = frozenset(derived)
    entries: OrderedDict[Any, list[tuple[list, Any]]] = OrderedDict()
    lock = threading.Lock()

    @functools.wraps(builder)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        objects: list = []
        try:
            key = tuple(
                (name, _key(value, objects)) for name, value in bound.arguments.items() if name not in skip
            )
        except _Unkeyable:
            return builder(*args, **kwargs)
        with lock:
            for seen, result in entries.get(key, ()):
                if _same(seen, objects):
                    entries.move_to_end(key)
                    return result
        result = builder(*args, **kwargs)
        with lock:
            entries.setdefault(key, []).append((objects, result))
            entries.move_to_end(key)
            while len(entries) > MAX_ENTRIES:
                entries.popitem(last=False)
        return result

    wrapper.memoized = True  # type: ignore[attr-defined]  (what tvm_compat.memo_kv_cache_kernels skips)
    return wrapper  # type: ignore[return-value]
