"""The llama.cpp reference build is a cache we own: an install that no longer imports is put back from its
cached wheel, and a cached wheel that does not import is rebuilt. Real pip installs of a small stand-in wheel
(a `llama_cpp` module that reports a Zen 3 `system_info`): building the real one takes minutes."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from toolkit.bench import llama_cpp as lc
from toolkit.errors import UserError

ZEN3_INFO = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 |"
GOOD = f"def llama_print_system_info():\n    return {ZEN3_INFO!r}.encode()\n"
BROKEN = 'raise ImportError("libllama.so: cannot open shared object file")\n'


def make_wheel(folder: Path, module_source: str) -> Path:
    """A valid wheel of llama-cpp-python LLAMA_CPP_VERSION whose `llama_cpp` is `module_source`."""
    dist = f"llama_cpp_python-{lc.LLAMA_CPP_VERSION}"
    files = {
        "llama_cpp/__init__.py": module_source,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: llama_cpp_python\n"
        f"Version: {lc.LLAMA_CPP_VERSION}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


@pytest.fixture
def own_cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("PHI3_TOOLKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_a_variant_that_no_longer_imports_is_reinstalled_from_its_wheel(own_cache):
    make_wheel(lc.wheelhouse("znver3"), GOOD)
    logs: list[str] = []
    assert lc.ensure_llama_cpp(cpu="znver3", build=False, log=logs.append) == ZEN3_INFO
    init = lc.variant_site("znver3") / "llama_cpp" / "__init__.py"
    assert init.read_text() == GOOD and any("installing" in m for m in logs)

    init.write_text(BROKEN)  # e.g. a half-deleted folder, or a library the system lost
    logs.clear()
    assert lc.ensure_llama_cpp(cpu="znver3", build=False, log=logs.append) == ZEN3_INFO
    assert init.read_text() == GOOD
    assert any("does not import (ImportError: libllama.so" in m and "reinstalling" in m for m in logs), logs


def test_a_cached_wheel_that_does_not_import_is_rebuilt_once(own_cache, monkeypatch):
    make_wheel(lc.wheelhouse("znver3"), BROKEN)
    with pytest.raises(UserError, match="for -march=znver3 does not import: ImportError: libllama.so"):
        lc.ensure_llama_cpp(
            cpu="znver3", build=False, log=lambda m: None
        )  # no build allowed: said, not hidden

    builds = []

    def build_wheel(where=None, *, log=None, cpu=None):
        builds.append(cpu)
        return make_wheel(lc.wheelhouse(cpu), GOOD)

    monkeypatch.setattr(lc, "build_wheel", build_wheel)
    logs: list[str] = []
    assert lc.ensure_llama_cpp(cpu="znver3", log=logs.append) == ZEN3_INFO
    assert builds == ["znver3"] and any("from the cached" in m and "rebuilding" in m for m in logs), logs
    assert lc.ensure_llama_cpp(cpu="znver3", log=logs.append) == ZEN3_INFO and builds == ["znver3"]


def test_the_native_install_repairs_itself_too(own_cache, monkeypatch):
    """The native build lives in the environment's site-packages; here a folder on PYTHONPATH stands in."""
    site = own_cache / "site-packages"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(lc, "cpu_has_amx", lambda cpu=None: False)
    monkeypatch.setattr(
        lc, "installed_version", lambda: lc.LLAMA_CPP_VERSION if (site / "llama_cpp").is_dir() else None
    )

    def install_wheel(wheel):
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--upgrade",
            "--target",
            str(site),
            wheel,
        ]
        subprocess.run(cmd, check=True)

    monkeypatch.setattr(lc, "install_wheel", install_wheel)
    make_wheel(lc.wheelhouse(), GOOD)
    (site / "llama_cpp").mkdir(parents=True)
    (site / "llama_cpp" / "__init__.py").write_text(BROKEN)
    logs: list[str] = []
    assert lc.ensure_llama_cpp(build=False, log=logs.append) == ZEN3_INFO
    assert (site / "llama_cpp" / "__init__.py").read_text() == GOOD
    assert any("does not import" in m and "reinstalling" in m for m in logs), logs
