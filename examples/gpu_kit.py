"""All that one call of the device tool needs to measure the CUDA build on a lent GPU, prepared here.

    python examples/gpu_kit.py prepare [--python 3.12] [--keep-libraries]  # .whl/gpu-kit (git-ignored)
    python examples/gpu_kit.py check    # the kit's runtime under that Python, here on the CPU
    # then the device tool: run(command="python3 examples/gpu_kit.py run", carry=[".whl/gpu-kit"])

The GPU machines have a Python (3.12 as seen; numpy, torch, safetensors, tokenizers, jinja2 in it) but no
TVM and no network. The kit holds TVM's runtime: the installed `tvm` package without its compiler library
(the engine needs only the runtime, which TVM_USE_RUNTIME_LIB=1 loads) and apache-tvm-ffi's wheel for that
Python. And it holds Phi-3-mini q4f16_1 libraries for cuda-sm90 (weights are made at random there):
- `graph`: `--cuda-graph` with the preset's own decode attention (ours);
- `plain`: the same without CUDA graphs;
- `graph-tvm-attention`: `--cuda-graph` with TVM's decode attention, for our kernel's effect on a step.
`run` hands them to examples/cuda_speed.py (decode / prefill tok/s, host vs device sampling vs the fused
step, batch kernels against batch-1 ones, a kernel profile) and writes $OUT/cuda_speed.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".whl" / "gpu-kit"
SITE, LIBS = KIT / "site", KIT / "libs"
CARRY_LIMIT = 64 * 2**20  # what the device tool carries: working tree and carried paths together


def _ffi_requirement() -> str:
    """The apache-tvm-ffi installed here (pyproject.toml's pin). Asked only when preparing: where the kit
    runs (`check-run`, the GPU machine's `run`) tvm_ffi is the kit's copy, with no package metadata."""
    return f"apache-tvm-ffi=={metadata.version('apache-tvm-ffi')}"


def _runtime(python: str) -> None:
    """SITE: tvm without its compiler library, and tvm_ffi built for `python` (its extension is per
    version)."""
    import tvm

    shutil.rmtree(SITE, ignore_errors=True)
    src = Path(tvm.__file__).parent
    # C++ sources and headers are for building against TVM, not for running a library
    skip = ("__pycache__", "*.pyc", "libtvm_compiler.so", "3rdparty", "src", "include", "cmake", "web")
    shutil.copytree(src, SITE / "tvm", ignore=shutil.ignore_patterns(*skip))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
            + ["--python-version", python, "--platform", "manylinux_2_28_x86_64", "-d", tmp]
            + [_ffi_requirement()],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        zipfile.ZipFile(wheel).extractall(SITE)
    for sub in ("3rdparty", "src", "include", "cmake"):
        shutil.rmtree(SITE / "tvm_ffi" / sub, ignore_errors=True)


def _libraries() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import cuda_speed

    from toolkit.targets import load_preset

    sm90 = load_preset("cuda-sm90")
    cases = {
        "graph": (True, sm90),
        "plain": (False, sm90),
        "graph-tvm-attention": (True, dataclasses.replace(sm90, decode_attention="tvm")),
    }
    shutil.rmtree(LIBS, ignore_errors=True)
    for name, (graph, preset) in cases.items():
        cuda_speed.prepare(LIBS, graph, name, preset=preset)
        print(name, json.loads((LIBS / name / "case.json").read_text())["compile_s"], "s", flush=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare(python: str, libraries: bool = True) -> None:
    _runtime(python)
    if libraries or not LIBS.exists():
        _libraries()
    (KIT / "python.txt").write_text(python)
    tree = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tracked = sum((ROOT / f).stat().st_size for f in tree.decode().split("\0") if f and (ROOT / f).is_file())
    kit = _size(KIT)
    print(f"kit {kit / 2**20:.1f} MiB + tracked tree {tracked / 2**20:.1f} MiB (the tool carries 64 MiB)")
    if kit + tracked > CARRY_LIMIT:
        raise SystemExit("the kit and the working tree exceed what the device tool carries")


def _use_kit() -> None:
    if not (KIT / "python.txt").exists():
        raise SystemExit(f"{KIT}: no kit; run `python examples/gpu_kit.py prepare` first")
    want, have = (KIT / "python.txt").read_text(), f"{sys.version_info.major}.{sys.version_info.minor}"
    if want != have:
        raise SystemExit(f"{KIT}: the kit's tvm_ffi is for Python {want}, this is {have}")
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    sys.path[:0] = [str(SITE), str(ROOT), str(ROOT / "examples")]


def check() -> None:
    """The kit's runtime and the engine under the kit's Python, without TVM's compiler, on the CPU: a tiny
    host library (built here with the sampler) greedy-decodes through the fused step and through three
    calls to the same tokens."""
    python = (KIT / "python.txt").read_text()
    lib = KIT / "check"
    shutil.rmtree(lib, ignore_errors=True)
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    import tvm
    from tiny import make_tiny_checkpoint

    from toolkit.checkpoint import open_model
    from toolkit.compile.compile_model import compile_model
    from toolkit.runtime.weights import load_params

    src = open_model(make_tiny_checkpoint(lib / "ckpt", "mini-4k"))
    compiled = compile_model(src.config, "q0f32", "host-exact", lib / "lib", gpu_sampler=True)
    np.savez(lib / "weights.npz", *[p.numpy() for p in load_params(src, compiled, tvm.cpu())])
    case = {"cfg": src.config.to_dict(), "library": str(compiled.library)}
    (lib / "case.json").write_text(json.dumps(case))
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([_interpreter(python), "-m", "venv", str(venv)], check=True)
        # of what the GPU machines' image holds (the device tool's KINDS.md), what the runtime imports
        pkgs = ["numpy>=2.4", "ml-dtypes", "psutil", "filelock", "tqdm", "click", "typing-extensions"]
        subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", *pkgs], check=True)
        res = subprocess.run([venv / "bin" / "python", __file__, "check-run"], capture_output=True, text=True)
    print(res.stdout + res.stderr)
    if res.returncode:
        raise SystemExit("the kit's runtime failed on the CPU")


def _interpreter(version: str) -> str:
    """A python`version` that runs here: on PATH, or one of pyenv's (whose shim refuses versions not
    selected)."""
    found = [shutil.which(f"python{version}")]
    found += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}"))
    for exe in filter(None, found):
        if subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    raise SystemExit(f"no python{version} here to check the kit with")


def check_run() -> None:
    _use_kit()
    import numpy as np
    import tvm

    from toolkit.config import Phi3Config
    from toolkit.runtime.device_sampling import Draw
    from toolkit.runtime.engine import CacheOptions, Engine

    assert not (SITE / "tvm" / "lib" / "libtvm_compiler.so").exists(), "the kit holds TVM's compiler"
    lib = KIT / "check"
    case = json.loads((lib / "case.json").read_text())
    weights = np.load(lib / "weights.npz")
    params = [tvm.runtime.tensor(weights[f"arr_{i}"]) for i in range(len(weights.files))]
    eng = Engine(
        tvm.runtime.load_module(case["library"]),
        params,
        Phi3Config.from_dict(case["cfg"]),
        cache=CacheOptions(max_batch_size=2, context_window=64, prefill_chunk=16),
        device_sampling=True,
    )
    runs = []
    for fused in (eng._fused, {}):
        eng._fused = fused
        sid = eng.add_sequence()
        toks = [eng.prefill(sid, [5, 17, 99, 3], draw=Draw(0.0, 0.0))]
        for i in range(12):
            toks.append(eng.decode(sid, toks[-1], Draw(0.9, (0.37 * i) % 1, 0.95)))
        eng.remove_sequence(sid)
        runs.append(toks)
    print("python", sys.version.split()[0], "tvm", tvm.__file__, "tokens", runs[0])
    if runs[0] != runs[1]:
        raise SystemExit(f"fused {runs[0]} != three calls {runs[1]}")


def run() -> None:
    _use_kit()
    import cuda_speed

    out = os.environ.get("OUT")
    if out:
        os.environ.setdefault("OUT_JSON", str(Path(out) / "cuda_speed.json"))
    cuda_speed.run(LIBS)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "prepare":
        python = sys.argv[sys.argv.index("--python") + 1] if "--python" in sys.argv else "3.12"
        prepare(python, libraries="--keep-libraries" not in sys.argv)
    elif cmd in ("check", "check-run", "run"):
        {"check": check, "check-run": check_run, "run": run}[cmd]()
    else:
        raise SystemExit(__doc__)
