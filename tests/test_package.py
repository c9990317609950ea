"""`phi3 package`: MLC-LLM's dist/ layout for iOS and Android apps, from tiny checkpoints.

What the apps consume is checked from the outside: files on disk, the app config's JSON, and the archive
through llvm-ar / llvm-nm (the objects' headers, the registration symbol each model_lib needs, no symbol
defined twice). Facts from mlc-ai/mlc-llm 79d603f085f50500e9509fa01785ffa7ecfaaa93: archive names
(interface/package.py), `system://<model_lib>` -> prefix `<model_lib with '-' as '_'>_`
(cpp/serve/function_table.cc), blob symbol `<prefix>__tvm_ffi__library_bin`, app-config keys (ios AppConfig).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import make_tiny_checkpoint

from toolkit.checkpoint import open_model
from toolkit.cli import main
from toolkit.compile.objfile import read_header
from toolkit.convert.converter import convert
from toolkit.errors import UserError
from toolkit.package import load_spec_file, spec_from_flags
from toolkit.package.plan import plan_all

NM = shutil.which("llvm-nm-15") or shutil.which("llvm-nm")
AR = shutil.which("llvm-ar-15") or shutil.which("llvm-ar")
needs_llvm = pytest.mark.skipif(not (NM and AR), reason="needs llvm-nm and llvm-ar (apt-get install llvm-15)")
APP_KEYS_BUNDLED_IOS = ["model_id", "model_lib", "model_path", "estimated_vram_bytes"]
APP_KEYS_URL = ["model_id", "model_lib", "model_url", "estimated_vram_bytes"]
EXPECTED = {  # device -> (archive, object format, CPU, Mach-O's C symbol underscore)
    "iphone": ("libmodel_iphone.a", "macho", "arm64", "_"),
    "android": ("libmodel_android.a", "elf", "aarch64", ""),
}


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """A fresh library cache for this module (module scope: the module-scoped builds must see it too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3_TOOLKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An HF checkpoint (mini-4k) and a converted folder of another variant (medium, GQA), both tiny."""
    root = tmp_path_factory.mktemp("models")
    hf = make_tiny_checkpoint(root / "mini4k")
    medium = make_tiny_checkpoint(root / "medium-hf", "medium", seed=1)
    converted = root / "medium-q0f32"
    convert(medium, "q0f32", converted, progress=False)
    return hf, converted


# Model A's quantization: MLC's phone default
Q4 = {"iphone": "q4f16_1", "android": "q4f16_1"}
A_ID = "tiny-mini4k-q4-MLC"


def write_config(path: Path, device: str, hf: Path, converted: Path) -> Path:
    """Model A from the HF folder, q4, bundled, sizes overridden; model B the converted folder, not
    bundled, downloaded from model_url, with a given VRAM number. Relative paths resolve from the file."""
    entries = [
        {
            "model": str(hf),
            "model_id": A_ID,
            "quantization": Q4[device],
            "bundle_weight": True,
            "overrides": {"context_window_size": 128, "prefill_chunk_size": 32},
        },
        {
            "model": f"../{converted.parent.name}/{converted.name}",
            "model_id": "tiny-medium-q0f32-MLC",
            "estimated_vram_bytes": 123456789,
            "model_url": "https://huggingface.co/example/tiny-medium-q0f32-MLC",
        },
    ]
    if device == "android":  # the Android app always reads model_url
        entries[0]["model_url"] = f"https://huggingface.co/example/{A_ID}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device, "model_list": entries}))
    return path


def archive_symbols(archive: Path) -> list[tuple[str, str]]:
    """(member, symbol) for every defined global symbol, straight from llvm-nm."""
    out = subprocess.run(
        [NM, "-A", "-g", "--defined-only", str(archive)], check=True, capture_output=True, text=True
    )
    rows = []
    for line in out.stdout.splitlines():
        head, _, rest = line.partition(": ")
        rows.append((head.split(":", 1)[1], rest.split()[-1]))
    return rows


# android by default; the iOS archive (127 s of a loaded 2-core box, cross-compiled) with --runslow
@pytest.fixture(scope="module", params=[pytest.param("iphone", marks=pytest.mark.slow), "android"])
def packaged(request, models, tmp_path_factory):
    """dist/ for each device, built through the CLI from a config file; about 30 s per device here."""
    if not (NM and AR):
        pytest.skip("needs llvm-nm and llvm-ar")
    device = request.param
    hf, converted = models
    root = converted.parent.parent
    config = write_config(root / f"app-{device}" / "mlc-package-config.json", device, hf, converted)
    dist = root / f"dist-{device}"
    res = CliRunner().invoke(main, ["package", "--config", str(config), "-o", str(dist)])
    assert res.exit_code == 0, res.output
    return device, dist, res.output


@needs_llvm
def test_layout(packaged):
    device, dist, output = packaged
    files = sorted(str(p.relative_to(dist)) for p in dist.rglob("*") if p.is_file())
    a = f"bundle/{A_ID}/"
    assert f"lib/{EXPECTED[device][0]}" in files
    assert {"bundle/mlc-app-config.json", "phi3-package.json", a + "mlc-chat-config.json"} <= set(files)
    assert {a + "tensor-cache.json", a + "params_shard_0.bin", a + "tokenizer.json"} <= set(files)
    assert not any("tiny-medium" in f for f in files)  # not bundled: the app downloads it
    assert [p.name for p in dist.parent.iterdir() if p.name.startswith(dist.name + ".")] == []  # no temp left
    assert f"model_lib phi3_{Q4[device]}_" in output and "model_lib phi3_q0f32_" in output
    assert output.count("compile phi3_") == 2  # fresh cache: both libraries built
    # the bundled weights are a valid converted folder with the library's quantization and sizes
    chat = json.loads((dist / a / "mlc-chat-config.json").read_text())
    assert (chat["quantization"], chat["context_window_size"], chat["prefill_chunk_size"]) == (
        Q4[device],
        128,
        32,
    )
    assert open_model(dist / a).scheme.name == Q4[device]


@needs_llvm
def test_app_config(packaged):
    device, dist, _ = packaged
    app = json.loads((dist / "bundle" / "mlc-app-config.json").read_text())
    first, second = app["model_list"]
    assert list(first) == (APP_KEYS_BUNDLED_IOS if device == "iphone" else APP_KEYS_URL)
    assert list(second) == APP_KEYS_URL
    assert first["model_id"] == A_ID
    if device == "iphone":
        assert first["model_path"] == A_ID  # a folder in the app's bundle
    else:
        assert first["model_url"] == f"https://huggingface.co/example/{A_ID}"
    assert second["model_url"] == "https://huggingface.co/example/tiny-medium-q0f32-MLC"
    assert second["estimated_vram_bytes"] == 123456789
    # estimated: at least the weights folder plus the KV cache (2 x layers x kv heads x dim x ctx x bytes)
    weights = sum(p.stat().st_size for p in (dist / "bundle" / first["model_id"]).glob("params_shard_*.bin"))
    kv = 2 * 2 * 4 * 32 * 128 * (2 if Q4[device] == "q4f16_1" else 4)
    assert weights + kv <= first["estimated_vram_bytes"] < weights + kv + 64 * 2**20
    libs = [m["model_lib"] for m in app["model_list"]]
    assert (
        libs[0].startswith(f"phi3_{Q4[device]}_") and libs[1].startswith("phi3_q0f32_") and libs[0] != libs[1]
    )


@needs_llvm
def test_archive_symbols_and_objects(packaged):
    device, dist, _ = packaged
    name, fmt, cpu, underscore = EXPECTED[device]
    archive = dist / "lib" / name
    assert archive.read_bytes()[:8] == b"!<arch>\n"
    # the symbol table the linkers need, in their flavour: BSD __.SYMDEF for Apple, GNU "/" for the NDK
    head = archive.read_bytes()[8:100]
    assert (b"__.SYMDEF" in head) if fmt == "macho" else head.startswith(b"/ ")
    members = subprocess.run(
        [AR, "t", str(archive)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert len(members) == len(set(members)) >= 4  # two objects per model, none shadowing another
    for m in members:
        data = subprocess.run([AR, "p", str(archive), m], check=True, capture_output=True).stdout
        h = read_header(data[:64])
        assert (h.format, h.arch, h.kind) == (fmt, cpu, "relocatable"), m
    symbols = archive_symbols(archive)
    names = {s for _, s in symbols}
    app = json.loads((dist / "bundle" / "mlc-app-config.json").read_text())
    prefixes = [m["model_lib"].replace("-", "_") + "_" for m in app["model_list"]]
    for prefix in prefixes:
        # what MLC's package step and the engine's system:// loader look for
        assert f"{underscore}{prefix}__tvm_ffi__library_bin" in names  # prefix ends in "_"
        # and the model's own compiled functions, under its prefix only
        assert any(s.startswith(f"{underscore}__tvm_ffi_{prefix}") for s in names)
    owner = {s: m for m, s in symbols if s.endswith("__tvm_ffi__library_bin")}
    assert len(owner) == 2 and len(set(owner.values())) == 2  # two registrations, in two members


@needs_llvm
def test_repackage_replaces_earlier_output(packaged, models):
    """An earlier package output is replaced whole (cached libraries: no recompile); other folders are not."""
    device, dist, _ = packaged
    hf, _ = models
    again = dist.parent / f"again-{device}"
    shutil.copytree(dist, again)
    args = ["package", str(hf), "--device", device, "-q", Q4[device], "--context-window", "128"]
    args += ["--prefill-chunk", "32", "--model-id", "only-one", "-o", str(again)]
    if device == "android":
        args += ["--model-url", "https://example.org/only-one"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "compile " not in res.output and "cached library" in res.output  # model A's library
    app = json.loads((again / "bundle" / "mlc-app-config.json").read_text())
    assert [m["model_id"] for m in app["model_list"]] == ["only-one"]
    assert not (again / "bundle" / A_ID).exists()
    prefix = app["model_list"][0]["model_lib"] + "_"
    owner = [s for _, s in archive_symbols(again / "lib" / EXPECTED[device][0]) if s.endswith("library_bin")]
    assert owner == [EXPECTED[device][3] + prefix + "__tvm_ffi__library_bin"]


CLANG = shutil.which("clang-15")
LINKERS = {"iphone": shutil.which("ld64.lld-15"), "android": shutil.which("ld.lld-15")}


@needs_llvm
def test_archive_links_whole(packaged, tmp_path):
    """Link the archive the way the apps do (iOS `-all_load`, mlc4j `--whole-archive`) into a shared library
    with LLVM's linkers: both models' objects load together and keep their registration symbols."""
    device, dist, _ = packaged
    if not (CLANG and LINKERS[device]):
        pytest.skip("needs clang-15 and lld-15 (scripts/test installs them)")
    archive = str(dist / "lib" / EXPECTED[device][0])
    out = tmp_path / "linked"
    if device == "iphone":
        flags = ["-target", "arm64-apple-ios14.0", "-dynamiclib", f"--ld-path={LINKERS[device]}"]
        flags += [
            "-Wl,-platform_version,ios,14.0,14.0",
            "-Wl,-all_load",
            archive,
            "-Wl,-undefined,dynamic_lookup",
        ]
    else:
        flags = [
            "-target",
            "aarch64-linux-android24",
            "-shared",
            "-fuse-ld=lld",
            "-Wl,--whole-archive",
            archive,
        ]
        flags += ["-Wl,--no-whole-archive", "-Wl,--unresolved-symbols=ignore-all"]
    proc = subprocess.run([CLANG, "-nostdlib", *flags, "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    h = read_header(out.read_bytes()[:64])
    assert (h.format, h.arch, h.kind) == (EXPECTED[device][1], EXPECTED[device][2], "shared")
    syms = subprocess.run([NM, "-g", "--defined-only", str(out)], check=True, capture_output=True, text=True)
    assert syms.stdout.count("___tvm_ffi__library_bin") == 2


@needs_llvm
def test_check_archive_refuses_a_symbol_defined_twice(packaged, tmp_path):
    """Negative control for the package's own check: one model's objects twice under other member names
    (what a whole-archive link rejects) is refused, naming the symbol."""
    from toolkit.package.staticlib import check_archive, create_archive

    device, dist, _ = packaged
    archive = dist / "lib" / EXPECTED[device][0]
    members = subprocess.run(
        [AR, "t", str(archive)], check=True, capture_output=True, text=True
    ).stdout.split()
    objects = []
    for i, m in enumerate(members[:2] * 2):
        path = tmp_path / f"copy{i}-{m}"
        path.write_bytes(subprocess.run([AR, "p", str(archive), m], check=True, capture_output=True).stdout)
        objects.append(path)
    bad = tmp_path / "bad.a"
    create_archive(bad, objects, EXPECTED[device][1])
    with pytest.raises(UserError, match="is defined by both copy"):
        check_archive(bad, [], EXPECTED[device][1])


# -- validation: one-line errors naming the file and field, before any work ------------------------------
def _spec_error(tmp_path: Path, content) -> str:
    path = tmp_path / "mlc-package-config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError) as e:
        load_spec_file(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def _entry(**kw):
    return {"model_id": "m", "bundle_weight": True, **kw}


@pytest.mark.parametrize(
    "content, expect",
    [
        ("{not json", "not a readable JSON file"),
        ({"model_list": [_entry()]}, "device: required"),
        ({"device": "macabi", "model_list": [_entry()]}, "device: expected one of iphone, android"),
        ({"device": "iphone", "model_list": {}}, "model_list: expected a list"),
        ({"device": "iphone", "model_list": []}, "model_list: no models"),
        ({"device": "iphone", "model_list": [_entry(mdoel="x")]}, "model_list[0]: unknown field 'mdoel'"),
        ({"device": "iphone", "model_list": [{"bundle_weight": True}]}, "model_list[0].model_id: required"),
        ({"device": "iphone", "model_list": [_entry(model_id="../x")]}, "model_list[0].model_id"),
        (
            {"device": "iphone", "model_list": [_entry(), _entry()]},
            "model_list[1].model_id: 'm' is used twice",
        ),
        ({"device": "iphone", "model_list": [_entry(model="HF://mlc-ai/x")]}, "model_list[0].model: HF://"),
        ({"device": "iphone", "model_list": [_entry(estimated_vram_bytes="3GB")]}, ".estimated_vram_bytes:"),
        ({"device": "iphone", "model_list": [_entry(bundle_weight="yes")]}, ".bundle_weight: expected true"),
        ({"device": "iphone", "model_list": [_entry(quantization="q3")]}, ".quantization: unknown"),
        ({"device": "iphone", "model_list": [_entry(model_lib="9lib")]}, ".model_lib: '9lib'"),
        ({"device": "iphone", "model_list": [_entry(model_lib="phi3")]}, ".model_lib: 'phi3' is too short"),
        (
            {"device": "iphone", "model_list": [_entry(overrides={"sliding_window_size": 768})]},
            ".overrides: 'sliding_window_size' is not supported",
        ),
        (
            {"device": "iphone", "model_list": [_entry(overrides={"context_window_size": 0})]},
            ".overrides.context_window_size: expected a positive integer",
        ),
        (
            {"device": "iphone", "model_list": [_entry(bundle_weight=False)]},
            "model_url: required (weights are not",
        ),
        ({"device": "android", "model_list": [_entry()]}, "model_url: required (the Android app"),
        (  # the apps fetch the weights below it: a name or a local path would fail on the phone
            {"device": "android", "model_list": [_entry(model_url="notaurl")]},
            "model_url: expected an http(s) URL the app downloads the weights from, got 'notaurl'",
        ),
        (
            {"device": "android", "model_list": [_entry(model_url="file:///x/m")]},
            ".model_url: expected an http(s)",
        ),
        ({"device": "iphone", "model_list": [_entry()], "preset": "host"}, "preset: host does not build"),
        (
            {"device": "iphone", "model_list": [_entry()], "model_lib_path_for_prepare_libs": {}},
            "prebuilt libraries are not supported",
        ),
    ],
)
def test_config_errors(tmp_path, content, expect):
    assert expect in _spec_error(tmp_path, content)


def test_config_values_and_relative_paths(tmp_path):
    path = tmp_path / "app" / "cfg.json"
    path.parent.mkdir()
    entries = [
        _entry(model="../m", overrides={"prefill_chunk_size": 128}, estimated_vram_bytes=3043000000),
        {"model_id": "n", "model_url": "https://x/n"},
    ]
    path.write_text(json.dumps({"device": "android", "preset": "android-mali", "model_list": entries}))
    with pytest.raises(UserError, match=r"model_list\[0\].model_url: required"):
        load_spec_file(path)
    entries[0]["model_url"] = "https://x/m"
    path.write_text(json.dumps({"device": "android", "preset": "android-mali", "model_list": entries}))
    spec = load_spec_file(path)
    assert (spec.device, spec.preset.name) == ("android", "android-mali")
    a, b = spec.models
    assert (
        a.model == (tmp_path / "app" / "../m")
        and a.prefill_chunk_size == 128
        and a.context_window_size is None
    )
    assert (a.estimated_vram_bytes, a.bundle_weight, b.bundle_weight, b.model) == (
        3043000000,
        True,
        False,
        None,
    )
    assert load_spec_file(path, device="iphone", preset=None).preset.name == "iphone-a16"  # --device wins


def test_flags_spec_defaults():
    spec = spec_from_flags([None], "iphone")
    (e,) = spec.models
    assert (e.model, e.model_id, e.bundle_weight) == (None, "SmolLM2-135M-Instruct-q4f16_1-MLC", True)
    with pytest.raises(UserError, match="--model-id: given 1 times for 2 model"):
        spec_from_flags(["a", "b"], "iphone", model_ids=["x"])
    with pytest.raises(UserError, match="flags: --model-url for model 1: required"):
        spec_from_flags([None], "android")


def test_model_lib_per_library(tmp_path, models):
    """Default model_libs differ when the libraries differ and are shared when identical; a model_lib given
    for two different libraries is refused (one prefix cannot register two libraries)."""
    hf, converted = models

    def plans(entries):
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps({"device": "iphone", "model_list": entries}))
        return plan_all(load_spec_file(path))

    a = _entry(model=str(hf), model_id="a", quantization="q0f32")
    p = plans([a, {**a, "model_id": "b"}, {**a, "model_id": "c", "overrides": {"context_window_size": 64}}])
    assert p[0].model_lib == p[1].model_lib != p[2].model_lib
    assert p[0].model_lib.startswith("phi3_q0f32_") and p[0].system_lib_prefix == p[0].model_lib + "_"
    with pytest.raises(
        UserError, match=r"model_list\[1\].model_lib: 'same-lib' is also the model_lib of 'a'"
    ):
        plans(
            [{**a, "model_lib": "same-lib"}, _entry(model=str(converted), model_id="d", model_lib="same-lib")]
        )
    with pytest.raises(UserError, match="differs from the converted folder's q0f32"):
        plans([_entry(model=str(converted), model_id="d", quantization="q4f16_1")])


def test_cli_refuses_foreign_output_before_work(tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = CliRunner().invoke(
        main, ["package", str(tmp_path / "missing"), "--device", "iphone", "-o", str(out)]
    )
    assert res.exit_code == 1 and "(no phi3-package.json); refusing to overwrite" in res.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = CliRunner().invoke(main, ["package", "x", "--config", "c.json", "-o", str(out)])
    assert res.exit_code == 1 and "MODEL arguments: set per-model values in c.json" in res.output
    res = CliRunner().invoke(main, ["package", "-o", str(tmp_path / "d2")])
    assert res.exit_code == 1 and "--device: required" in res.output
