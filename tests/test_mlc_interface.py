"""Our compiled libraries against MLC-LLM's model-library interface.

The tables below are written down from MLC-LLM's source at commit 79d603f085f50500e9509fa01785ffa7ecfaaa93:
cpp/serve/function_table.cc (`_InitFunctions`: the names looked up), cpp/serve/model.cc (how each one is
called), cpp/metadata/model.cc (`ModelMetadata::FromJSON`: the `_metadata` keys it requires and their
JSON types). They are not derived from our code, so a rename or a changed argument list here fails.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch
import tvm
from tiny import load_hf_model, make_tiny_checkpoint

from toolkit.checkpoint import open_model
from toolkit.compile.compile_model import compile_model
from toolkit.convert.converter import convert
from toolkit.runtime.engine import CacheOptions, Engine
from toolkit.runtime.weights import load_params
from toolkit.targets import load_preset

# function -> number of inputs as model.cc passes them (the packed params come last where present)
MLC_FUNCTIONS = {
    "embed": 2,  # TokenEmbed: (token_ids, params)
    "prefill": 3,  # BatchPrefill, one sequence: (embeddings [1, n, h], kv_cache, params)
    "decode": 3,  # BatchDecode, one sequence: (embeddings [1, 1, h], kv_cache, params)
    "batch_prefill": 4,  # (embeddings [1, n, h], logit_pos [b], kv_cache, params)
    "batch_decode": 3,  # (embeddings [b, 1, h], kv_cache, params)
    "batch_verify": 3,  # BatchVerify: (embeddings [1, n, h], kv_cache, params)
    "create_tir_paged_kv_cache": 5,  # CreateKVCache: five shape tuples
    "_metadata": 0,  # ModelMetadata::FromModule
    "softmax_with_temperature": 2,  # ComputeProbsFromLogits: (logits [b, 1, v], temperatures [b])
    "alloc_embedding_tensor": 0,  # the engine's embedding buffer
}
# kernels the engine fetches from the module itself (mod->GetFunction with imports), every target
MLC_KERNELS = ("apply_logit_bias_inplace", "apply_penalty_inplace", "apply_bitmask_inplace")

# key -> JSON type ModelMetadata::FromJSON reads it as (json::Lookup: required)
REQUIRED_METADATA = {
    "model_type": str,
    "quantization": str,
    "context_window_size": int,
    "prefill_chunk_size": int,
    "max_batch_size": int,
    "tensor_parallel_shards": int,
    "kv_cache": dict,
    "params": list,
    "memory_usage": dict,
}
# json::LookupOrDefault / count(): optional, but typed when present
OPTIONAL_METADATA = {
    "sliding_window_size": int,
    "attention_sink_size": int,
    "seqlen_padding_factor": int,
    "pipeline_parallel_stages": int,
    "disaggregation": bool,
    "model_task": str,
    "kv_state_kind": str,
}
KV_CACHE_KEYS = ("num_hidden_layers", "head_dim", "num_attention_heads", "num_key_value_heads")
PARAM_KEYS = {"name": str, "shape": list, "dtype": str, "preprocs": list}

# host runs by default; the two cross-compiled system libraries (75 s / 29 s on a loaded 2-core box) with
# --runslow
DEFAULT_PRESETS = [
    "host",
    *(pytest.param(p, marks=pytest.mark.slow) for p in ("iphone-a16", "android-adreno")),
]
SLOW_PRESETS = ["webgpu", "cuda-sm90", "vulkan", "macos-metal", "android-vulkan", "android-mali"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # mini-128k: LongRoPE, so the per-sequence long/short choice is part of what the functions compute
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", "mini-128k")


@pytest.fixture(scope="module")
def built(ckpt, tmp_path_factory):
    cache: dict[str, object] = {}

    def get(preset: str):
        if preset not in cache:
            out = tmp_path_factory.mktemp(preset) / "lib"
            cache[preset] = compile_model(open_model(ckpt).config, "q4f16_1", preset, out)
        return cache[preset]

    return get


def check_metadata(meta: dict, cfg, manifest_params: list[dict]) -> None:
    for key, typ in REQUIRED_METADATA.items():
        assert isinstance(meta.get(key), typ), key
    for key, typ in OPTIONAL_METADATA.items():
        if key in meta:
            assert isinstance(meta[key], typ) and not (typ is int and isinstance(meta[key], bool)), key
    assert meta["tensor_parallel_shards"] == 1 and meta.get("pipeline_parallel_stages", 1) == 1
    assert meta["kv_state_kind"] == "kv_cache" and meta["model_type"] == "phi3"
    assert meta["sliding_window_size"] == -1  # MLC's engine must never roll the cache (see attach_metadata)
    assert {k: meta["kv_cache"][k] for k in KV_CACHE_KEYS} == {
        "num_hidden_layers": cfg.num_hidden_layers,
        "head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
    }
    for p in meta["params"]:
        for key, typ in PARAM_KEYS.items():
            assert isinstance(p[key], typ), (p.get("name"), key)
    assert [(p["name"], p["shape"], p["dtype"]) for p in meta["params"]] == [
        (p["name"], p["shape"], p["dtype"]) for p in manifest_params
    ]
    # every Relax function has an estimate; the forward functions plan real buffers at their bounds
    assert set(MLC_FUNCTIONS) - {"_metadata", "softmax_with_temperature", "alloc_embedding_tensor"} <= set(
        meta["memory_usage"]
    )
    assert all(isinstance(v, int) and v >= 0 for v in meta["memory_usage"].values())
    assert meta["memory_usage"]["batch_prefill"] > meta["memory_usage"]["decode"] > 0


def defined_symbols(library, tmp_path) -> str:
    """`llvm-nm --defined-only` over every object of a .tar library."""
    with tarfile.open(library) as t:
        t.extractall(tmp_path, filter="data")
        members = [tmp_path / m.name for m in t.getmembers() if m.isfile()]
    cmd = ["llvm-nm-15", "--defined-only", *map(str, members)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _check_preset(built, ckpt, preset: str, tmp_path) -> None:
    compiled = built(preset)
    m = compiled.manifest
    assert {f: m["vm_functions"].get(f) for f in MLC_FUNCTIONS} == MLC_FUNCTIONS
    check_metadata(m["mlc_metadata"], open_model(ckpt).config, m["params"])
    if load_preset(preset).system_lib:
        prefix = m["system_lib_prefix"]
        assert prefix == "phi3_q4f16_1_"
        names = defined_symbols(compiled.library, tmp_path)
        # the library's registration symbol carries the prefix: ffi.SystemLib("phi3_q4f16_1_") finds it
        assert f"{prefix}__tvm_ffi__library_bin" in names


@pytest.mark.parametrize("preset", DEFAULT_PRESETS)
def test_exports_and_metadata_follow_mlc(built, ckpt, preset, tmp_path):
    _check_preset(built, ckpt, preset, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("preset", SLOW_PRESETS)
def test_exports_and_metadata_follow_mlc_gpu(built, ckpt, preset, tmp_path):
    _check_preset(built, ckpt, preset, tmp_path)


def test_host_library_as_mlc_loads_it(built, ckpt):
    """The file itself (not our manifest): every function MLC looks up, with MLC's arity, and `_metadata`
    parses to what the manifest recorded."""
    compiled = built("host")
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(compiled.library)), tvm.cpu())
    arity = vm._get_function_arity
    assert {f: arity(f) for f in MLC_FUNCTIONS} == MLC_FUNCTIONS
    meta = json.loads(vm["_metadata"]())
    assert meta == compiled.manifest["mlc_metadata"]
    lib = tvm.runtime.load_module(str(compiled.library))
    assert all(lib.get_function(k, query_imports=True) is not None for k in MLC_KERNELS)
    check_metadata(meta, open_model(ckpt).config, compiled.manifest["params"])


def _system_lib(compiled, tmp_path, name: str) -> tvm.runtime.Module:
    """Link a system-lib .tar's objects into a shared object, load it globally (its static initialisers
    register the prefixed library) and fetch it as MLC's engine does for `system://`."""
    objs = tmp_path / name
    objs.mkdir()
    with tarfile.open(compiled.library) as t:
        t.extractall(objs, filter="data")
    so = tmp_path / f"{name}.so"
    subprocess.run(["clang-15", "-shared", "-o", str(so), *map(str, sorted(objs.iterdir()))], check=True)
    ctypes.CDLL(str(so), mode=ctypes.RTLD_GLOBAL)
    return tvm.runtime.system_lib(compiled.manifest["system_lib_prefix"])


@pytest.mark.slow  # two extra compiles; the symbol prefix is checked by default in test_package's archives
def test_two_system_libraries_in_one_process_give_transformers_tokens(ckpt, tmp_path):
    """MLC's static-library path on this CPU: two models' libraries (distinct prefixes) linked into one
    process, each found by its prefix (`system://` in MLC's engine), weights loaded from the converted
    folder through MLC's tensor-cache builtins with the names from `_metadata`, and the engine (which calls
    only MLC's functions) reproduces transformers' greedy generate() across the LongRoPE switch."""
    src = open_model(ckpt)
    weights = tmp_path / "weights"
    convert(src, "q0f32", weights, progress=False)
    base = dataclasses.replace(load_preset("host-exact"), system_lib=True, output=".tar", name="host-syslib")
    libs = {
        name: compile_model(
            src.config, "q0f32", base, tmp_path / f"lib-{name}", lib_prefix=f"tiny_{name}_model_"
        )
        for name in ("first", "second")
    }
    hf = load_hf_model(ckpt)
    hf.generation_config.eos_token_id = None
    prompt = np.random.default_rng(11).integers(3, src.config.vocab_size, 12).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ref[0, len(prompt) :].tolist()
    mods = {name: _system_lib(c, tmp_path, name) for name, c in libs.items()}
    for name, compiled in libs.items():
        vm = tvm.runtime.vm.VirtualMachine(mods[name], tvm.cpu())
        meta = json.loads(vm["_metadata"]())
        params = load_params(open_model(weights), compiled, tvm.cpu(), meta["params"])
        eng = Engine(mods[name], params, src.config, cache=CacheOptions(max_batch_size=1, context_window=64))
        sid = eng.add_sequence()
        logits, toks = eng.prefill(sid, prompt), []
        for _ in range(8):
            toks.append(int(np.argmax(logits)))
            logits = eng.decode(sid, toks[-1])
        assert toks == want, name
