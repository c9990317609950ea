"""Code generators that the apache-tvm wheel lacks, registered into TVM's normal build.

`register_all()` makes every backend here available to `tvm.compile` / `relax.build`; importing a backend
sub-package (e.g. `toolkit.backends.vulkan`) registers that one.
"""

from __future__ import annotations


def register_all() -> list[str]:
    """Register every backend; returns the target kinds now served by this package."""
    from . import vulkan

    return ["vulkan"] if vulkan.register() else []
