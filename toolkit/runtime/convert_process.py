"""A first run's weight conversion in a process of its own, beside the library's compile in this one.

In a thread of the compiling process the two take turns at the GIL (TVMScript parsing and the pass pipeline
are Python, and so is much of the conversion's bookkeeping); a child process gets its own interpreter and
core. The child re-opens the model by its path, converts into the cache under the same lock as every other
writer, and hands an error back as a small JSON file, which the parent raises again as the same UserError or
OSError (one line at the CLI). A child killed midway leaves only temp folders, which the next writer clears.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError


def can_start() -> bool:
    """Whether this interpreter can start the child: not where `sys.executable` is no Python (a frozen app,
    an embedding host), which then converts after the compile instead."""
    return bool(sys.executable) and not getattr(sys, "frozen", False)


class ConversionProcess:
    """A running child conversion: `wait` for it (raising its error), or `stop` it."""

    def __init__(self, source, quantization: str) -> None:
        fd, name = tempfile.mkstemp(prefix="phi3-convert-", suffix=".json")
        os.close(fd)
        self._result = Path(name)
        self._path = source.path
        argv = [sys.executable, "-m", __name__, str(source.path), quantization, "--result", name]
        argv += ["--parent", str(os.getpid())]
        if getattr(source, "uses_pickle", False):  # opened with --allow-pickle, which found .bin files
            argv.append("--allow-pickle")
        env = dict(os.environ)
        # the child must import this very toolkit (a worktree on PYTHONPATH, a test's checkout), not another
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        # stdout stays the parent's alone (generated text goes there); the child's notices go to stderr. Its
        # own process group: a terminal's Ctrl-C reaches the parent only, which stops the child (`stop`), so
        # the child is never caught mid-import by a KeyboardInterrupt. Not its own session: Linux's autogroup
        # scheduler would then split the cores between the two sessions, not among their threads.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        self._proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=_stderr(), **group)

    def wait(self) -> None:
        """Block until the child is done; its error is raised here."""
        try:
            code = self._proc.wait()
            report = self._read_result()
        finally:
            self._result.unlink(missing_ok=True)
        if code == 0:
            return
        if "user" in report:
            raise UserError(report["user"])
        if "errno" in report:
            raise OSError(report["errno"], report["strerror"], report.get("filename"))
        if code < 0:  # a signal: the OOM killer, or someone's kill
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            raise UserError(f"the weight conversion was killed by {name} (out of memory?)", self._path)
        raise RuntimeError(f"the weight conversion of {self._path} failed (exit {code}); its output is above")

    def stop(self) -> None:
        """End the child now (the caller failed and will not use the weights)."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._result.unlink(missing_ok=True)

    def _read_result(self) -> dict:
        try:
            return json.loads(self._result.read_text() or "{}")
        except (OSError, ValueError):
            return {}


def _stderr():
    try:
        return sys.__stderr__.fileno()
    except (AttributeError, OSError, ValueError):  # no stderr (a GUI app's interpreter)
        return subprocess.DEVNULL


def _end_with_parent(parent: int) -> None:
    """On Linux the child gets SIGTERM when the thread that started it ends (a killed `phi3` does not leave
    a conversion running); elsewhere an orphan finishes its cache entry and exits."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the call above
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__name__}")
    ap.add_argument("model")
    ap.add_argument("quantization")
    ap.add_argument("--result", required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--allow-pickle", action="store_true")
    args = ap.parse_args(argv)
    _end_with_parent(args.parent)
    report: dict = {}
    try:
        _convert(args.model, args.quantization, args.allow_pickle)
        return 0
    except UserError as e:
        report = {"user": str(e)}
        return 1
    except OSError as e:
        report = {"errno": e.errno, "strerror": e.strerror or str(e), "filename": e.filename}
        return 1
    finally:
        if report:
            Path(args.result).write_text(json.dumps(report))


def _convert(model: str, quantization: str, allow_pickle: bool) -> None:
    from ..tvm_compat import tvm_without_torch

    tvm_without_torch()
    from ..checkpoint import open_model
    from ..quantization import get_scheme
    from .weight_cache import ensure_converted

    ensure_converted(open_model(model, allow_pickle=allow_pickle), get_scheme(quantization))


if __name__ == "__main__":
    sys.exit(main())
