"""TVM's own Vulkan and OpenCL device runtimes, built as plugins for the installed apache-tvm wheel.

The wheel ships with USE_VULKAN/USE_OPENCL off, but `import tvm` already tries to load
`libtvm_runtime_vulkan.so` / `libtvm_runtime_opencl.so` next to `libtvm_runtime.so` (tvm/backend/<kind>/
__init__.py, via tvm_ffi.libinfo.load_lib_ctypes). A plugin is nothing more than that library: TVM's runtime
sources for the device (`src/backend/<kind>/runtime/*.cc` of a TVM source checkout) compiled against the
wheel's own headers (`tvm/include`, `tvm/src/runtime`, tvm_ffi's) and linked against the wheel's
`libtvm_runtime.so`. Loading it registers `device_api.<kind>` and `ffi.Module.load_from_bytes.<kind>`, after
which `tvm.runtime.load_module` runs our Vulkan/OpenCL libraries on this machine's driver (lavapipe, PoCL).

Plugins live in our cache (`<cache>/runtime/<wheel key>/`), never in site-packages; `load_plugins` loads the
ones built for the running wheel.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..locks import output_lock

BACKENDS = ("vulkan", "opencl")


@dataclass(frozen=True)
class _Backend:
    device_api: str  # the global function the plugin registers (also: present already = nothing to load)
    include: str  # a system header the sources need
    lib: str  # the system library to link
    debs: tuple[str, ...]  # Debian packages that provide `include` and `lib`
    defines: tuple[str, ...] = ()


_SPEC = {
    "vulkan": _Backend("device_api.vulkan", "vulkan/vulkan.h", "vulkan", ("libvulkan-dev",)),
    # OpenCL 1.2 is what PoCL and most mobile drivers implement; TVM's default too (opencl_common.h)
    "opencl": _Backend(
        "device_api.opencl",
        "CL/opencl.h",
        "OpenCL",
        ("opencl-headers", "ocl-icd-opencl-dev"),
        ("-DCL_TARGET_OPENCL_VERSION=120",),
    ),
}
_CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-DTVM_LOG_BEFORE_THROW=1")
_LOADED: dict[str, ctypes.CDLL] = {}


def library_name(backend: str) -> str:
    return f"libtvm_runtime_{backend}.so"


# -- where plugins live ----------------------------------------------------------------------------------
def _wheel() -> dict[str, str]:
    """What a plugin's ABI depends on: the TVM wheel (version and the commit it records) and tvm-ffi."""
    import tvm
    import tvm_ffi

    commit = getattr(getattr(tvm, "_version", None), "commit_id", None) or "unknown"
    return {"tvm": tvm.__version__, "tvm_commit": str(commit), "tvm_ffi": tvm_ffi.__version__}


def plugin_dir() -> Path:
    """`<cache>/runtime/tvm-<version>-<commit>-ffi-<version>`: one folder per wheel pair."""
    from ..locks import _cache_root

    w = _wheel()
    return _cache_root() / "runtime" / f"tvm-{w['tvm']}-{w['tvm_commit']}-ffi-{w['tvm_ffi']}"


def _manifest_path() -> Path:
    return plugin_dir() / "plugins.json"


def manifest() -> dict:
    """What `phi3 runtime build` recorded per backend (source, commit, build seconds); {} when none."""
    try:
        return json.loads(_manifest_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def available() -> dict[str, Path]:
    """Backend -> plugin path, for the plugins built for the running wheel."""
    recorded = manifest()
    out = {}
    for b in BACKENDS:
        p = plugin_dir() / library_name(b)
        if b in recorded and p.is_file():
            out[b] = p
    return out


# -- loading ---------------------------------------------------------------------------------------------
def load_plugins(backends: tuple[str, ...] = BACKENDS) -> dict[str, str]:
    """Load the plugins that exist for the running wheel. Returns backend -> "plugin" | "built-in" for each
    backend whose runtime is now registered (a TVM build with the runtime compiled in needs no plugin)."""
    import tvm

    out = {}
    found = available()
    for b in backends:
        if b in _LOADED:
            out[b] = "plugin"
        elif tvm.get_global_func(_SPEC[b].device_api, allow_missing=True) is not None:
            out[b] = "built-in"  # never load a second copy: its static registrations would clash
        elif b in found:
            # RTLD_LOCAL like the wheel's own loader: the plugin only needs its registration side effects
            _LOADED[b] = ctypes.CDLL(str(found[b]), mode=os.RTLD_LOCAL)
            out[b] = "plugin"
    return out


def require_device(backend: str):
    """A tvm.Device for `backend` (vulkan / opencl) here, loading its plugin; UserError saying what to do."""
    import tvm

    if backend not in _SPEC:
        raise UserError(f"no TVM runtime plugin for '{backend}'; plugins exist for {', '.join(BACKENDS)}")
    if backend not in load_plugins((backend,)):
        raise UserError(
            f"TVM's {backend} runtime is not built for this TVM wheel: run `phi3 runtime build --tvm-source "
            f"DIR --backends {backend}` with a TVM source checkout"
        )
    dev = tvm.vulkan(0) if backend == "vulkan" else tvm.opencl(0)
    if not dev.exist:
        drivers = "mesa-vulkan-drivers (lavapipe)" if backend == "vulkan" else "pocl-opencl-icd (PoCL)"
        raise UserError(f"no {backend} device found; install a driver, e.g. the Debian package {drivers}")
    return dev


# -- building --------------------------------------------------------------------------------------------
def _wheel_paths() -> dict[str, Path]:
    import tvm
    import tvm_ffi.libinfo

    root = Path(tvm.__file__).resolve().parent
    return {
        "include": root / "include",
        "src_runtime": root / "src" / "runtime",
        "lib": root / "lib",
        "ffi_include": Path(tvm_ffi.libinfo.find_include_path()),
        "ffi_lib": Path(tvm_ffi.libinfo.find_libtvm_ffi()).parent,
    }


def check_source(src: Path, backends: tuple[str, ...]) -> None:
    """`--tvm-source` must be an apache/tvm checkout with the device runtime sources."""
    if not src.is_dir():
        raise UserError("--tvm-source: not a folder", src)
    need = ["include/tvm/support", "src/runtime", "src/support"] + [
        f"src/backend/{b}/runtime" for b in backends
    ]
    missing = [n for n in need if not (src / n).is_dir()]
    if missing:
        what = ", ".join(missing)
        raise UserError(f"--tvm-source: not an apache/tvm source checkout (missing {what})", src)


def source_commit(src: Path) -> str | None:
    """The commit of a git checkout (None for an extracted archive)."""
    try:
        r = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 and src.joinpath(".git").exists() else None


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise UserError("no C++ compiler found: install the Debian package g++ (or set CXX)")
    return cxx


def check_system(backends: tuple[str, ...], cxx: str | None = None) -> None:
    """Every header and library the backends need, or one UserError naming the Debian packages to install."""
    cxx = cxx or _compiler()
    missing: list[str] = []
    for b in backends:
        spec = _SPEC[b]
        probe = subprocess.run(
            [cxx, "-E", "-x", "c++", *spec.defines, "-"],
            input=f"#include <{spec.include}>\n",
            capture_output=True,
            text=True,
        )
        # -print-file-name echoes the bare name back when the linker cannot find the library
        lib = subprocess.run([cxx, f"-print-file-name=lib{spec.lib}.so"], capture_output=True, text=True)
        if probe.returncode != 0 or os.sep not in lib.stdout.strip():
            missing += [d for d in spec.debs if d not in missing]
    if missing:
        raise UserError(
            f"the {'/'.join(backends)} runtime needs system headers and libraries that are missing: "
            f"install the Debian packages {' '.join(missing)} (apt-get install {' '.join(missing)})"
        )


def _stage(src: Path, backends: tuple[str, ...], stage: Path) -> None:
    """A header tree where the wheel's own runtime headers (which match its binaries) win over the
    checkout's, next to the checkout's device sources (their `../../../runtime/` includes resolve here)."""
    headers = shutil.ignore_patterns("*.cc", "*.cu", "*.mm", "*.py", "*.txt", "*.md", "*.cmake")
    w = _wheel_paths()
    shutil.copytree(src / "include", stage / "include", ignore=headers)
    shutil.copytree(w["include"], stage / "include", dirs_exist_ok=True)
    for sub in ("runtime", "support"):
        shutil.copytree(src / "src" / sub, stage / "src" / sub, ignore=headers)
    shutil.copytree(w["src_runtime"], stage / "src" / "runtime", ignore=headers, dirs_exist_ok=True)
    for b in backends:
        shutil.copytree(src / "src" / "backend" / b / "runtime", stage / "src" / "backend" / b / "runtime")


@dataclass
class BuildResult:
    backend: str
    path: Path
    seconds: float
    sources: int


def _sources_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def build_plugins(
    tvm_source: str | Path, backends: tuple[str, ...] = BACKENDS, jobs: int | None = None, log=None
) -> list[BuildResult]:
    """Compile and link each backend's plugin into `plugin_dir()` (replacing an older build). UserError for a
    bad source folder or missing system packages; the compiler's first error line when a source fails."""
    src = Path(tvm_source).expanduser().resolve()
    unknown = [b for b in backends if b not in _SPEC]
    if unknown:
        raise UserError(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    check_source(src, backends)
    cxx = _compiler()
    check_system(backends, cxx)
    w = _wheel_paths()
    out_dir = plugin_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    results = []
    # one builder per wheel folder: a second `phi3 runtime build` waits, then rebuilds over the first's
    with output_lock(out_dir), tempfile.TemporaryDirectory(prefix="phi3-runtime-build-") as tmp:
        stage = Path(tmp) / "stage"
        _stage(src, backends, stage)
        for b in backends:
            start = time.perf_counter()
            spec = _SPEC[b]
            files = sorted((stage / "src" / "backend" / b / "runtime").glob("*.cc"))
            if not files:
                raise UserError(f"--tvm-source: no sources in src/backend/{b}/runtime", src)
            includes = ["-I", str(stage / "include"), "-I", str(w["ffi_include"])]

            def compile_one(f: Path, spec=spec, includes=includes, b=b) -> Path:
                obj = f.with_suffix(".o")
                cmd = [cxx, *_CXX_FLAGS, *spec.defines, *includes, "-c", str(f), "-o", str(obj)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
                    first = errors[0] if errors else r.stderr.strip()[:300]
                    raise UserError(f"compiling {f.name} for the {b} runtime failed: {first}", src)
                return obj

            with ThreadPoolExecutor(max_workers=jobs) as pool:
                objs = list(pool.map(compile_one, files))
            final = out_dir / library_name(b)
            # linked under a temp name, then renamed: a process that has the old plugin loaded keeps it
            tmp_lib = final.with_name(f"{final.name}.tmp-{os.getpid()}")
            # --no-undefined: a header/ABI mismatch with the wheel fails here, not at dlopen in a user's run
            link = [cxx, "-shared", "-o", str(tmp_lib), *map(str, objs), "-Wl,--no-undefined"]
            link += [f"-L{w['lib']}", "-ltvm_runtime", f"-L{w['ffi_lib']}", "-ltvm_ffi", f"-l{spec.lib}"]
            link += [f"-Wl,-rpath,{w['lib']}", f"-Wl,-rpath,{w['ffi_lib']}"]
            r = subprocess.run(link, capture_output=True, text=True)
            if r.returncode != 0:
                tmp_lib.unlink(missing_ok=True)
                first = next((ln for ln in r.stderr.splitlines() if "undefined" in ln or "error" in ln), "")
                raise UserError(f"linking the {b} runtime failed: {first or r.stderr.strip()[:300]}")
            os.replace(tmp_lib, final)
            seconds = time.perf_counter() - start
            _record(b, src, files, seconds, cxx)
            if log:
                log(f"{b}: {final} ({len(files)} sources, {seconds:.1f} s)")
            results.append(BuildResult(b, final, seconds, len(files)))
    return results


def _record(backend: str, src: Path, files: list[Path], seconds: float, cxx: str) -> None:
    path = _manifest_path()
    with output_lock(path):
        data = manifest()
        data[backend] = {
            "tvm_source": str(src),
            "source_commit": source_commit(src),
            "sources_sha256": _sources_hash(files),
            "wheel": _wheel(),
            "compiler": cxx,
            "build_seconds": round(seconds, 2),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


def describe() -> list[str]:
    """One line per backend: built (source, commit, time) or not."""
    rec = manifest()
    lines = []
    for b in BACKENDS:
        p = plugin_dir() / library_name(b)
        if b in rec and p.is_file():
            r = rec[b]
            lines.append(
                f"{b}: {p} (from {r['tvm_source']} @ {r['source_commit'] or 'unknown commit'}, "
                f"{r['build_seconds']} s)"
            )
        else:
            lines.append(f"{b}: not built")
    return lines
