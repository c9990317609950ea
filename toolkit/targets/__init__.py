"""Device presets: the plain-data files in `toolkit/targets/*.json` turned into TVM targets.

A preset file holds the TVM target dict, the artifact kind (`.so`, `.tar`, `.dylib`), whether the library is a
system lib (static linking on iOS/Android/Web), GPU schedule parameters and a "why" section citing the source
of
every number. Device knowledge stays in the JSON files; this module only reads and checks them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from ..cpu_threads import physical_cores
from ..errors import UserError

# the preset files ship inside the package (toolkit/targets/*.json, tuned records in toolkit/schedules/), so a
# non-editable install finds them; TOOLKIT_TARGETS_DIR points at another folder of presets.
TARGETS_DIR = Path(os.environ.get("TOOLKIT_TARGETS_DIR", "").strip() or Path(__file__).resolve().parent)
OUTPUT_SUFFIXES = (".so", ".tar", ".dylib")
# CPU q4 GEMVs: fp32 activations, or int8 activations with integer dot products (llama.cpp's Q4 x Q8)
Q4_ACTIVATIONS = ("float32", "int8")
KV_CACHE_DTYPES = ("float32", "float16")
DECODE_ATTENTION = ("tvm", "ours")  # whose paged-KV decode attention kernel a GPU build runs
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
# batch ranges and LowBatchGEMV buckets, MLC-LLM's (compiler_pass/low_batch_specialization.py, 79d603f0)
LOW_BATCH_RANGES = ((2, 2), (8, 4))
DEFAULT_GPU_RULES = ("Matmul", "GEMV", "LowBatchGEMV", "Reduction", "GeneralReduction", "Fallback")


@dataclass(frozen=True)
class Preset:
    """One device preset, validated. `target_dict` is the JSON target with host detection filled in (on
    first use: detection asks LLVM through TVM, which listing presets does not need)."""

    name: str
    description: str
    target_json: dict[str, Any] = field(hash=False, compare=False)  # as written in the file
    output: str
    system_lib: bool
    dlight_rules: tuple[str, ...] = ()
    low_batch_gemv_bucket: int = 4
    # ((n_max, bucket), ...): matmuls over a symbolic batch n take LowBatchGEMV(bucket) for the first
    # n <= n_max, the other rules above (compile/low_batch_gemv.py); empty without LowBatchGEMV
    low_batch_gemv: tuple[tuple[int, int], ...] = ()
    matmul_config: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    cuda_gencode: tuple[str, ...] = ()
    q4_activations: str = "float32"  # CPU q4 GEMVs: "int8" = llama.cpp-style integer dot products
    kv_cache_dtype: str | None = None  # CPU presets: the paged cache's dtype; None = the activation dtype
    decode_attention: str = "tvm"  # GPU presets: "ours" swaps in compile/gpu_decode_attention.py
    runs_here: bool = False  # target detected from this machine (host presets): its code runs here
    why: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    path: str = ""
    detect: tuple[str, ...] = ()  # target keys filled from this machine (`host` preset)
    cpu: str | None = None  # `host:CPU`: built for that LLVM CPU instead of this machine's (`for_cpu`)
    missing_features: tuple[str, ...] = ()  # that CPU's features this machine lacks (its code can't run here)

    @property
    def spec(self) -> str:
        """The `--device` value that names this preset (`host:znver3` for a pinned CPU)."""
        return f"{self.name}:{self.cpu}" if self.cpu else self.name

    @property
    def target_dict(self) -> dict[str, Any]:
        return json.loads(_filled_target(json.dumps(self.target_json, sort_keys=True), self.detect))

    @property
    def kind(self) -> str:
        return self.target_json["kind"]

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

    def with_kv_cache(self, dtype: str) -> Preset:
        """This preset with its KV cache in `dtype` (CPU presets only, like `cpu.kv_cache`)."""
        if dtype not in KV_CACHE_DTYPES or self.is_gpu:
            choices = "/".join(KV_CACHE_DTYPES)
            raise UserError(f"--kv-cache {dtype}: needs {choices} and a CPU preset, not {self.name}")
        return replace(self, kv_cache_dtype=dtype)

    @property
    def schedule_dir(self) -> Path:
        """Where tuned MetaSchedule records for this preset live (filled by the tuning tools)."""
        return TARGETS_DIR.parent / "schedules" / self.name


def list_presets() -> list[str]:
    """Names of all presets in `targets/`, sorted."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.json"))


def no_presets_reason() -> str | None:
    """Why there is no preset to pick (TOOLKIT_TARGETS_DIR pointing at the wrong folder), else None."""
    if list_presets():
        return None
    where = f"TOOLKIT_TARGETS_DIR={TARGETS_DIR}"
    return f"{where} is not a folder" if not TARGETS_DIR.is_dir() else f"{where} holds no presets (*.json)"


def load_preset(name: str) -> Preset:
    """Load and validate preset `name`; unknown names raise UserError listing the known ones. `PRESET:CPU`
    pins a detecting preset's CPU (`for_cpu`)."""
    if ":" in name:
        base, cpu = name.split(":", 1)
        return for_cpu(load_preset(base), cpu)
    path = TARGETS_DIR / f"{name}.json"
    if not path.is_file():
        reason = no_presets_reason()
        if reason:
            raise UserError(f"no device preset '{name}': {reason}")
        raise UserError(f"unknown device preset '{name}'; known presets: {', '.join(list_presets())}")
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
    target = dict(data["target"])
    detect = tuple(data.get("detect", []))
    unknown_keys = [k for k in detect if k not in _DETECTABLE]
    if unknown_keys:
        known = sorted(_DETECTABLE)
        raise UserError(f"cannot detect target key '{unknown_keys[0]}'; detectable: {known}", path)
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
    low_batch = _low_batch_ranges(dlight.get("low_batch_gemv", LOW_BATCH_RANGES), path)
    if "LowBatchGEMV" not in rules:
        low_batch = ()
    q4_act = (data.get("cpu") or {}).get("q4_activations", "float32")
    if q4_act not in Q4_ACTIVATIONS or (q4_act != "float32" and is_gpu):
        raise UserError(f"cpu.q4_activations must be one of {Q4_ACTIVATIONS} (CPU presets only)", path)
    kv_cache = (data.get("cpu") or {}).get("kv_cache")
    if kv_cache is not None and (kv_cache not in KV_CACHE_DTYPES or is_gpu):
        raise UserError(f"cpu.kv_cache must be one of {KV_CACHE_DTYPES} (CPU presets only)", path)
    decode_attention = data.get("decode_attention", "tvm")
    if decode_attention not in DECODE_ATTENTION or (decode_attention != "tvm" and not is_gpu):
        choices = DECODE_ATTENTION
        raise UserError(f"decode_attention must be one of {choices} ('ours' on GPU presets only)", path)
    return Preset(
        name=data["name"],
        description=data["description"],
        target_json=target,
        output=data["output"],
        system_lib=bool(data.get("system_lib", False)),
        dlight_rules=rules,
        low_batch_gemv_bucket=int(dlight.get("low_batch_gemv_bucket", 4)),
        low_batch_gemv=low_batch,
        matmul_config=dlight.get("matmul"),
        cuda_gencode=tuple((data.get("cuda") or {}).get("gencode", ())),
        q4_activations=q4_act,
        kv_cache_dtype=kv_cache,
        decode_attention=decode_attention,
        runs_here=bool(detect),
        why=dict(data["why"]),
        path=str(path),
        detect=detect,
    )


# x86 features of OS, virtualization and power-management instructions: a compiler emits them only for their
# intrinsics (none in our kernels), and virtual machines often hide them (a Zen 4 guest lacks Zen 3's mwaitx)
SYSTEM_ONLY_FEATURES = frozenset(
    "cldemote clflushopt clwb clzero enqcmd fsgsbase hreset invpcid kl lwp movdir64b movdiri mwaitx pconfig "
    "pku prefetchi ptwrite rdpid rdpru rdseed rtm serialize sgx shstk tsxldtrk uintr waitpkg wbnoinvd widekl "
    "xsave xsavec xsaveopt xsaves".split()
)


def for_cpu(preset: Preset, cpu: str) -> Preset:
    """`preset` built for the LLVM CPU `cpu` (`-mcpu`: znver3, skylake-avx512, sapphirerapids, ...) instead of
    this machine's: its kernels take that CPU's ISA paths and heuristics, none of this machine's tuned records
    (their fingerprint holds the target), and no extension this machine adds beyond its own CPU name. For
    deploying to another server, and for measuring another CPU class's code on a machine that has all its
    features (`missing_features` empty; otherwise the code is compiled but not run here)."""
    if "mcpu" not in preset.detect:
        raise UserError(f"--device {preset.name}:{cpu}: only 'host' takes a CPU")
    import tvm
    from tvm.target import codegen

    triple = preset.target_dict["mtriple"]
    probe = tvm.target.Target({"kind": "llvm", "mtriple": triple})
    known = sorted(str(c) for c in codegen.llvm_get_cpu_archlist(probe))
    if cpu not in known:
        near = [c for c in known if c.startswith(cpu[:3])][:8] or known[:8]
        raise UserError(f"--device {preset.name}:{cpu}: LLVM knows no CPU {cpu!r} for {triple} (e.g. {near})")
    target = {**preset.target_json, "mcpu": cpu}
    pinned = tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": cpu})
    missing = _lacked(pinned, _host_cpu_features() if preset.runs_here else {})
    return replace(
        preset,
        target_json=target,
        detect=tuple(k for k in preset.detect if k != "mcpu"),
        cpu=cpu,
        missing_features=missing,
        runs_here=preset.runs_here and not missing,
    )


def _low_batch_ranges(raw: Any, path: Path) -> tuple[tuple[int, int], ...]:
    """dlight.low_batch_gemv: [[n_max, bucket], ...], n_max increasing, both positive integers."""
    try:
        ranges = tuple((int(a), int(b)) for a, b in raw)
    except (TypeError, ValueError):
        ranges = None
    ok = ranges is not None and all(
        type(v) is int and v > 0
        for pair in raw
        for v in pair  # noqa: E721 - no bools, no floats
    )
    if not ok or [a for a, _ in ranges] != sorted({a for a, _ in ranges}):
        raise UserError(
            f"dlight.low_batch_gemv must be [[n_max, bucket], ...] with positive integers and increasing "
            f"n_max, not {raw!r}",
            path,
        )
    return ranges


def _system_triple() -> str:
    from tvm.target import codegen

    return codegen.llvm_get_system_triple()


def _system_cpu() -> str:
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


_DETECTABLE = {"mtriple": _system_triple, "mcpu": _system_cpu, "num-cores": physical_cores}


@cache
def _filled_target(target_json: str, detect: tuple[str, ...]) -> str:
    """The target with host detection filled in, once per process (like the presets themselves), as JSON so
    that every caller gets its own copy."""
    return json.dumps(_fill_host_detection(json.loads(target_json), detect))


def _fill_host_detection(target: dict[str, Any], detect: tuple[str, ...]) -> dict[str, Any]:
    """Fill the keys listed in the preset's "detect" from this machine (only the `host` preset uses it)."""
    for key in detect:
        if key not in target:
            target[key] = _DETECTABLE[key]()
    if "mcpu" in detect and "mattr" not in target:
        import tvm

        features = _host_cpu_features()
        named = tvm.target.Target({k: v for k, v in target.items() if k in ("kind", "mtriple", "mcpu")})
        # beyond the name: what the kernels use that the CPU name does not imply (a part LLVM does not know);
        # below it: what the name promises but this machine lacks (LLVM names an x86 CPU by its model
        # number, and a VM may hide that model's units: an Emerald Rapids guest, model 207, without AMX,
        # AVX-512 FP16/BF16 or AVX-VNNI, whose code built for the name alone took the AMX path and faulted)
        mattr = _extensions_beyond_mcpu(named, str(target.get("mtriple", "")), features)
        mattr += [f"-{f}" for f in _lacked(named, features)]
        if mattr:
            target["mattr"] = mattr
    return target


def _lacked(cpu: Any, have: dict[str, bool]) -> tuple[str, ...]:
    """The features LLVM's table gives the CPU `cpu` (a Target with an mcpu) that `have` (this machine's
    feature list) names as absent. Only names that list holds (LLVM's CPU lists also hold tuning flags such as
    fast-lzcnt), and not the system instructions a hypervisor hides, which generated code never uses."""
    from tvm.target import codegen

    wanted = map(str, codegen.llvm_get_cpu_features(cpu))
    return tuple(sorted(f for f in wanted if f in have and not have[f] and f not in SYSTEM_ONLY_FEATURES))


# the extensions the host kernels use (`compile/cpu_isa.py`) that LLVM's CPU name may not imply: on arm64
# DotProd (`sdot`) and i8mm (`smmla`), on x86 the AMX tiles (`tdpbssd`)
KERNEL_EXTENSIONS = {"arm64": ("dotprod", "i8mm"), "x86": ("amx-tile", "amx-int8")}


def _host_cpu_features() -> dict[str, bool]:
    """LLVM's view of this machine's CPU features (on arm64 Linux: /proc/cpuinfo's Features line; on x86
    CPUID, with AMX only where the OS enables the tile state)."""
    import tvm_ffi

    return dict(tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")().items())


def _extensions_beyond_mcpu(cpu: Any, triple: str, features: dict[str, bool]) -> list[str]:
    """`+feature` for the kernels' extensions this host has but its detected CPU `cpu` (a Target) doesn't
    say so. arm64: LLVM names CPUs by part number, and a part it doesn't know comes out "generic" (Armv8.0,
    no dot products). x86: a virtual machine may report an older model number than its CPU (a Sapphire
    Rapids guest seen as family 6 model 167, which LLVM calls rocketlake: no AMX)."""
    from tvm.target import codegen

    arch = (
        "arm64" if triple.startswith(("aarch64", "arm64")) else "x86" if triple.startswith("x86_64") else None
    )
    if arch is None:
        return []
    return [
        f"+{f}"
        for f in KERNEL_EXTENSIONS[arch]
        if features.get(f) and not codegen.llvm_cpu_has_features([f], cpu)
    ]
