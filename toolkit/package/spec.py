"""What to package: an `mlc-package-config.json`-style file, or flags, validated into a `PackageSpec`.

Field names and meanings follow MLC-LLM's package config (python/mlc_llm/interface/package.py and
docs/compilation/package_libraries_and_weights.rst at mlc-ai/mlc-llm
79d603f085f50500e9509fa01785ffa7ecfaaa93): top level `device` + `model_list`; per model `model`, `model_id`,
`estimated_vram_bytes`, `bundle_weight`, `overrides`, `model_lib`. Differences, all because nothing is
downloaded here: `model` is a local MODEL (HF folder, GGUF, `phi3 convert` folder) or absent for the embedded
default; `model_url` (where the app downloads weights that are not bundled) is given explicitly; optional
`quantization` per model and `preset` at the top level pick what to compile. Every problem is a one-line
UserError naming the file and field, raised before any conversion or compile starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..checkpoint.mlc_format import CHAT_CONFIG
from ..errors import UserError
from ..quantization import DEFAULT_QUANTIZATION, get_scheme
from ..targets import Preset, load_preset

# MLC's device names for app packaging (it also knows "macabi", which has no preset here) and the preset each
# compiles for by default: MLC's iphone target is Metal, its android target OpenCL (Adreno is the common GPU).
DEVICE_PRESETS = {"iphone": "iphone-a16", "android": "android-adreno"}
TOP_KEYS = ("device", "model_list", "preset")
ENTRY_KEYS = (
    "model",
    "model_id",
    "estimated_vram_bytes",
    "bundle_weight",
    "overrides",
    "model_lib",
    "model_url",
    "quantization",
)
OVERRIDE_KEYS = ("context_window_size", "prefill_chunk_size")
# model_id names a folder in the app bundle; model_lib becomes a C symbol prefix ('-' turned into '_')
_MODEL_ID = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_MODEL_LIB = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
# TVM 0.27's AttachGlobalSymbol fails on a system-lib prefix of 7 bytes or less (the FFI stores such strings
# inline and the pass expects a heap string object: "Cannot convert from type ffi.SmallStr to ffi.Object")
MIN_MODEL_LIB_LEN = 7


@dataclass(frozen=True)
class ModelEntry:
    model: Path | None  # None: the embedded default model
    model_id: str
    estimated_vram_bytes: int | None  # None: estimated from the compiled library
    bundle_weight: bool
    context_window_size: int | None
    prefill_chunk_size: int | None
    quantization: str | None  # None: a converted folder's own, else the default
    model_lib: str | None  # None: derived from model type, quantization and a hash of the library
    model_url: str | None


@dataclass(frozen=True)
class PackageSpec:
    device: str  # "iphone" | "android" (MLC's names; they decide the archive and app-config shape)
    preset: Preset
    models: tuple[ModelEntry, ...]
    origin: str  # the config file, or "flags", for messages


def _where(origin: str, field: str) -> str:
    return f"{origin}: {field}"


def check_device(device: Any, origin: str, field: str = "device") -> str:
    if device not in DEVICE_PRESETS:
        raise UserError(
            f"{_where(origin, field)}: expected one of {', '.join(DEVICE_PRESETS)}, got {device!r}"
        )
    return device


def resolve_preset(device: str, preset: str | None, origin: str) -> Preset:
    """The preset to compile for: must build the same kind of static library as the device's default."""
    default = load_preset(DEVICE_PRESETS[device])
    if preset is None:
        return default
    chosen = load_preset(preset)
    if not chosen.system_lib or chosen.output != ".tar" or chosen.host_triple != default.host_triple:
        raise UserError(
            f"{_where(origin, 'preset')}: {chosen.name} does not build a {device} static library "
            f"(need a system-lib .tar for {default.host_triple})"
        )
    return chosen


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _string(value: Any, where: str, pattern: re.Pattern | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: expected a non-empty string, got {value!r}")
    if pattern is not None and not pattern.fullmatch(value):
        raise UserError(f"{where}: {value!r} has characters that are not allowed ({pattern.pattern})")
    return value


def _url(value: Any, where: str) -> str:
    """An http(s) URL: the apps fetch the weights' files below it (a Hugging Face repository's address)."""
    url = _string(value, where)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"{where}: expected an http(s) URL the app downloads the weights from, got {url!r}")
    return url


def _quantization(value: Any, where: str) -> str:
    name = _string(value, where)
    try:
        return get_scheme(name).name
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _model_lib(value: Any, where: str) -> str:
    lib = _string(value, where, _MODEL_LIB)
    if len(lib) < MIN_MODEL_LIB_LEN:
        raise UserError(
            f"{where}: {lib!r} is too short; TVM needs at least {MIN_MODEL_LIB_LEN} characters here"
        )
    return lib


def parse_entry(raw: Any, index: int, origin: str, base: Path) -> ModelEntry:
    """One `model_list` element; relative `model` paths are relative to `base` (the config's folder)."""
    at = f"model_list[{index}]"
    if not isinstance(raw, dict):
        raise UserError(f"{_where(origin, at)}: expected an object")
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    if unknown:
        raise UserError(
            f"{_where(origin, at)}: unknown field {unknown[0]!r} (known: {', '.join(ENTRY_KEYS)})"
        )
    if "model_id" not in raw:
        raise UserError(f"{_where(origin, at + '.model_id')}: required")
    model = raw.get("model")
    path = None
    if model is not None:
        model = _string(model, _where(origin, at + ".model"))
        if model.startswith(("HF://", "http://", "https://")):
            raise UserError(
                f"{_where(origin, at + '.model')}: {model} is remote; this toolkit downloads nothing: give a "
                "local checkpoint or converted folder (model_url says where the app fetches weights)"
            )
        path = Path(model).expanduser()
        path = path if path.is_absolute() else base / path
    overrides = raw.get("overrides", {})
    if not isinstance(overrides, dict):
        raise UserError(f"{_where(origin, at + '.overrides')}: expected an object")
    bad = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if bad:
        raise UserError(
            f"{_where(origin, at + '.overrides')}: {bad[0]!r} is not supported (supported: "
            f"{', '.join(OVERRIDE_KEYS)})"
        )
    sizes = {
        k: _positive_int(overrides[k], _where(origin, f"{at}.overrides.{k}"))
        for k in OVERRIDE_KEYS
        if k in overrides
    }
    bundle = raw.get("bundle_weight", False)
    if not isinstance(bundle, bool):
        raise UserError(f"{_where(origin, at + '.bundle_weight')}: expected true or false, got {bundle!r}")
    vram = raw.get("estimated_vram_bytes")
    return ModelEntry(
        model=path,
        model_id=_string(raw["model_id"], _where(origin, at + ".model_id"), _MODEL_ID),
        estimated_vram_bytes=None
        if vram is None
        else _positive_int(vram, _where(origin, at + ".estimated_vram_bytes")),
        bundle_weight=bundle,
        context_window_size=sizes.get("context_window_size"),
        prefill_chunk_size=sizes.get("prefill_chunk_size"),
        quantization=None
        if raw.get("quantization") is None
        else _quantization(raw["quantization"], _where(origin, at + ".quantization")),
        model_lib=None
        if raw.get("model_lib") is None
        else _model_lib(raw["model_lib"], _where(origin, at + ".model_lib")),
        model_url=None
        if raw.get("model_url") is None
        else _url(raw["model_url"], _where(origin, at + ".model_url")),
    )


def check_entries(device: str, models: tuple[ModelEntry, ...], origin: str) -> None:
    """Rules across entries and the ones that depend on the device (how the app finds the weights)."""
    if not models:
        raise UserError(f"{_where(origin, 'model_list')}: no models to package")
    seen: set[str] = set()
    for i, m in enumerate(models):
        at = f"model_list[{i}]"
        if m.model_id in seen:
            raise UserError(f"{_where(origin, at + '.model_id')}: {m.model_id!r} is used twice")
        seen.add(m.model_id)
        # the iOS app opens bundled weights by model_path; otherwise both apps download from model_url (the
        # Android app always reads model_url, and looks for pushed weights under model_id first)
        if m.model_url is None and (device == "android" or not m.bundle_weight):
            why = "the Android app needs one" if device == "android" else "weights are not bundled"
            field = f"--model-url for model {i + 1}" if origin == "flags" else at + ".model_url"
            raise UserError(f"{_where(origin, field)}: required ({why})")


def load_spec_file(path: str | Path, device: str | None = None, preset: str | None = None) -> PackageSpec:
    """Read and validate a package config; `device` / `preset` (flags) replace the file's values."""
    path = Path(path)
    origin = str(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("no such file", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"not a readable JSON file ({e})", path) from None
    if not isinstance(raw, dict):
        raise UserError("expected a JSON object with device and model_list", path)
    if "model_lib_path_for_prepare_libs" in raw:
        raise UserError(
            f"{_where(origin, 'model_lib_path_for_prepare_libs')}: prebuilt libraries are not supported; "
            "remove it (every model_lib is compiled here)"
        )
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"{_where(origin, unknown[0])}: unknown field (known: {', '.join(TOP_KEYS)})")
    if device is None and "device" not in raw:
        raise UserError(f"{_where(origin, 'device')}: required (or pass --device)")
    file_device = raw.get("device")
    device = check_device(device if device is not None else file_device, origin)
    # the file's preset belongs to the file's device: a --device naming another one uses that one's default
    if preset is None and raw.get("preset") is not None and device == file_device:
        preset = _string(raw["preset"], _where(origin, "preset"))
    entries = raw.get("model_list")
    if not isinstance(entries, list):
        raise UserError(f"{_where(origin, 'model_list')}: expected a list of models")
    base = path.resolve().parent
    models = tuple(parse_entry(e, i, origin, base) for i, e in enumerate(entries))
    check_entries(device, models, origin)
    return PackageSpec(device, resolve_preset(device, preset, origin), models, origin)


def spec_from_flags(
    models: list[str | None],
    device: str,
    *,
    preset: str | None = None,
    model_ids: list[str] | None = None,
    model_urls: list[str] | None = None,
    quantization: str | None = None,
    context_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
    estimated_vram_bytes: int | None = None,
    bundle_weight: bool = True,
) -> PackageSpec:
    """The same spec from command-line flags: one entry per MODEL (None = the embedded default); ids and urls
    pair with the models in order."""
    origin = "flags"
    device = check_device(device, origin, "--device")
    for flag, values in (("--model-id", model_ids), ("--model-url", model_urls)):
        if values and len(values) != len(models):
            raise UserError(
                f"{flag}: given {len(values)} times for {len(models)} model(s); give one per model"
            )
    raw_entries: list[dict[str, Any]] = []
    for i, model in enumerate(models):
        entry: dict[str, Any] = {"bundle_weight": bundle_weight}
        if model is not None:
            entry["model"] = model
        entry["model_id"] = model_ids[i] if model_ids else None  # filled in by the planner when None
        overrides = {"context_window_size": context_window_size, "prefill_chunk_size": prefill_chunk_size}
        entry["overrides"] = {k: v for k, v in overrides.items() if v is not None}
        for key, value in (
            ("quantization", quantization),
            ("estimated_vram_bytes", estimated_vram_bytes),
            ("model_url", model_urls[i] if model_urls else None),
        ):
            if value is not None:
                entry[key] = value
        raw_entries.append(entry)
    parsed = []
    for i, e in enumerate(raw_entries):
        if e["model_id"] is None:
            e["model_id"] = default_model_id(e.get("model"), e.get("quantization"))
        parsed.append(parse_entry(e, i, origin, Path.cwd()))
    entries = tuple(parsed)
    check_entries(device, entries, origin)
    return PackageSpec(device, resolve_preset(device, preset, origin), entries, origin)


def default_model_id(model: str | None, quantization: str | None) -> str:
    """`<folder or file stem>-<quantization>-MLC`, the naming of MLC's published model ids; the embedded model
    is `SmolLM2-135M-Instruct`."""
    quant = quantization
    if model is None:
        name = "SmolLM2-135M-Instruct"
    else:
        p = Path(model).expanduser()
        name = (p.stem if p.is_file() else p.resolve().name) or "model"
        if quant is None and (p / CHAT_CONFIG).is_file():  # a converted folder keeps its quantization
            try:
                quant = json.loads((p / CHAT_CONFIG).read_text()).get("quantization")
            except (OSError, ValueError):
                pass  # the planner reports the unreadable config with its reason
    name = re.sub(r"[^A-Za-z0-9._+-]", "-", name).lstrip(".") or "model"
    quant = quant or DEFAULT_QUANTIZATION
    return name if name.endswith(f"{quant}-MLC") else f"{name}-{quant}-MLC"
