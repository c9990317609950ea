"""Device presets: the plain-data files in `targets/` turned into TVM targets.

A preset file holds the TVM target dict, the artifact kind (`.so`, `.tar`, `.dylib`), whether the library is a
system lib (static linking on iOS/Android/Web), GPU schedule parameters and a "why" section citing the source
of
every number. Device knowledge stays in the JSON files; this module only reads and checks them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import UserError

# targets/ sits next to the package in the repo; TOOLKIT_TARGETS_DIR lets an installed copy point elsewhere.
TARGETS_DIR = Path(os.environ.get("TOOLKIT_TARGETS_DIR", Path(__file__).resolve().parent.parent / "targets"))
OUTPUT_SUFFIXES = (".so", ".tar", ".dylib")
# CPU q4 GEMVs: fp32 activations, or int8 activations with integer dot products (llama.cpp's Q4 x Q8)
Q4_ACTIVATIONS = ("float32", "int8")
GPU_KINDS = ("cuda", "metal", "opencl", "vulkan", "webgpu", "rocm")
DLIGHT_RULES = (
    "Matmul",
    "GEMV",
    "LowBatchGEMV",
    "Reduction",
    "GeneralReduction",
    "RMSNorm",
    "Transpose",
    "Fallback",
)
_REQUIRED_KEYS = ("name", "description", "target", "output", "why")
# MLC-LLM's GPU rule order (compiler_pass/pipeline.py) plus LowBatchGEMV; used when a GPU preset names none
DEFAULT_GPU_RULES = ("Matmul", "GEMV", "LowBatchGEMV", "Reduction", "GeneralReduction", "Fallback")


@dataclass(frozen=True)
class Preset:
    """One device preset, validated. `target_dict` is the JSON target with host detection filled in."""

    name: str
    description: str
    target_dict: dict[str, Any] = field(hash=False, compare=False)
    output: str
    system_lib: bool
    dlight_rules: tuple[str, ...] = ()
    low_batch_gemv_bucket: int = 4
    matmul_config: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    cuda_gencode: tuple[str, ...] = ()
    q4_activations: str = "float32"  # CPU q4 GEMVs: "int8" = llama.cpp-style integer dot products
    runs_here: bool = False  # target detected from this machine (host presets): its code runs here
    why: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    path: str = ""

    @property
    def kind(self) -> str:
        return self.target_dict["kind"]

    @property
    def is_gpu(self) -> bool:
        return self.kind in GPU_KINDS

    @property
    def host_triple(self) -> str | None:
        host = self.target_dict.get("host") if self.is_gpu else self.target_dict
        return None if host is None else host.get("mtriple")

    @property
    def cuda_arch(self) -> str | None:
        return self.target_dict.get("arch") if self.kind == "cuda" else None

    @property
    def target(self):
        """The tvm.target.Target (built on each access: Target objects are cheap and not hashable data)."""
        import tvm

        return tvm.target.Target(self.target_dict)

    @property
    def schedule_dir(self) -> Path:
        """Where tuned MetaSchedule records for this preset live (filled by the tuning tools)."""
        return TARGETS_DIR.parent / "schedules" / self.name


def list_presets() -> list[str]:
    """Names of all presets in `targets/`, sorted."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.json"))


def load_preset(name: str) -> Preset:
    """Load and validate preset `name`; unknown names raise UserError listing the known ones."""
    path = TARGETS_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(list_presets()) or "(none)"
        raise UserError(f"unknown device preset '{name}'; known presets: {known}")
    return _load(path)


@cache
def _load(path: Path) -> Preset:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON: {e}", path) from e
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise UserError(f"preset is missing keys {missing}", path)
    if data["name"] != path.stem:
        raise UserError(f"preset name '{data['name']}' does not match its file name", path)
    if data["output"] not in OUTPUT_SUFFIXES:
        raise UserError(f"output must be one of {OUTPUT_SUFFIXES}, got {data['output']!r}", path)
    target = _fill_host_detection(dict(data["target"]), data.get("detect", []), path)
    dlight = data.get("dlight") or {}
    is_gpu = target["kind"] in GPU_KINDS
    rules = tuple(dlight.get("rules", DEFAULT_GPU_RULES if is_gpu else ()))
    unknown = [r for r in rules if r not in DLIGHT_RULES]
    if unknown:
        raise UserError(f"unknown dlight rules {unknown}; known: {list(DLIGHT_RULES)}", path)
    if is_gpu and "Fallback" not in rules:
        # A GPU build without rules leaves kernels unscheduled (they would run as host code and crash on
        # device).
        raise UserError("a GPU preset's dlight rules must end with 'Fallback'", path)
    q4_act = (data.get("cpu") or {}).get("q4_activations", "float32")
    if q4_act not in Q4_ACTIVATIONS or (q4_act != "float32" and is_gpu):
        raise UserError(f"cpu.q4_activations must be one of {Q4_ACTIVATIONS} (CPU presets only)", path)
    return Preset(
        name=data["name"],
        description=data["description"],
        target_dict=target,
        output=data["output"],
        system_lib=bool(data.get("system_lib", False)),
        dlight_rules=rules,
        low_batch_gemv_bucket=int(dlight.get("low_batch_gemv_bucket", 4)),
        matmul_config=dlight.get("matmul"),
        cuda_gencode=tuple((data.get("cuda") or {}).get("gencode", ())),
        q4_activations=q4_act,
        runs_here=bool(data.get("detect")),
        why=dict(data["why"]),
        path=str(path),
    )


def _fill_host_detection(target: dict[str, Any], detect: list[str], path: Path) -> dict[str, Any]:
    """Fill the keys listed in the preset's "detect" from this machine (only the `host` preset uses it)."""
    if not detect:
        return target
    import psutil
    from tvm.target import codegen

    found = {
        "mtriple": lambda: codegen.llvm_get_system_triple(),
        "mcpu": lambda: codegen.llvm_get_system_cpu(),
        # physical cores: SMT siblings share the vector units, extra threads only add contention
        "num-cores": lambda: psutil.cpu_count(logical=False) or os.cpu_count() or 1,
    }
    for key in detect:
        if key not in found:
            raise UserError(f"cannot detect target key '{key}'; detectable: {sorted(found)}", path)
        target.setdefault(key, found[key]())
    if "mcpu" in detect and str(target.get("mtriple", "")).startswith(("aarch64", "arm64")):
        extra = _arm_extensions_beyond_mcpu(target)
        if extra and "mattr" not in target:
            target["mattr"] = extra
    return target


# the arm64 extensions the host kernels use (`compile/cpu_isa.py`): DotProd (`sdot`) and i8mm (`smmla`)
ARM_KERNEL_EXTENSIONS = ("dotprod", "i8mm")


def _host_cpu_features() -> dict[str, bool]:
    """LLVM's view of this machine's CPU features (on arm64 Linux: /proc/cpuinfo's Features line)."""
    import tvm_ffi

    return dict(tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")().items())


def _arm_extensions_beyond_mcpu(target: dict[str, Any]) -> list[str]:
    """`+dotprod` / `+i8mm` where this arm64 host has them but its detected `mcpu` doesn't say so: LLVM names
    CPUs by part number, and a part it doesn't know comes out "generic" (Armv8.0, no dot products)."""
    import tvm

    features = _host_cpu_features()
    cpu = tvm.target.Target({k: v for k, v in target.items() if k in ("kind", "mtriple", "mcpu")})
    return [
        f"+{f}"
        for f in ARM_KERNEL_EXTENSIONS
        if features.get(f) and not tvm.target.codegen.llvm_cpu_has_features([f], cpu)
    ]
