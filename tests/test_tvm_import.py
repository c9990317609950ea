"""`phi3` imports TVM without torch (`tvm_compat.tvm_without_torch`): TVM's packages import torch when it is
installed, only for their optional torch interop, and that was most of a command's start-up time. Checked
in a fresh interpreter each: the test process has both imported already."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_a_phi3_command_imports_tvm_without_torch_and_torch_still_works_after():
    out = _run(
        """
        import sys
        import numpy as np
        from toolkit.cli import main

        main(["targets"], standalone_mode=False)  # any command: the group installs the import hook
        import tvm
        import tvm.relax
        print("torch after tvm:", "torch" in sys.modules)
        a = tvm.runtime.tensor(np.arange(4, dtype="float32"))
        import torch  # later imports get the real torch

        t = torch.from_numpy(a.numpy()) * 2
        print("sum:", float(t.sum()), "torch:", torch.__name__)
        """
    )
    assert "torch after tvm: False" in out and "sum: 12.0" in out and "torch: torch" in out, out


def test_without_the_hook_tvm_imports_torch():
    """The other side of the fact above: without the hook this TVM does import torch (if a TVM release stops
    doing so, the hook is dead code and can go)."""
    out = _run(
        """
        import sys
        import tvm
        print("torch after tvm:", "torch" in sys.modules)
        """
    )
    assert "torch after tvm: True" in out, out


def test_the_python_api_imports_tvm_without_torch_too():
    out = _run(
        """
        import sys
        import toolkit.api as phi3
        from toolkit.runtime import engine  # what phi3.load imports: TVM's runtime
        print("torch after tvm:", "torch" in sys.modules, "tvm" in sys.modules)
        """
    )
    assert "torch after tvm: False True" in out, out
