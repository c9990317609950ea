"""Damaged model files: safetensors and GGUF truncated at many offsets or with header bit flips, NaN/inf
weights on every path that reads them, and corrupted converted folders.

Each case runs a command that must read the damaged part and checks the shared contract: non-zero exit, one
line naming the file, no traceback, nothing changed or left behind.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from bad_util import TINY_CONFIG, assert_clean_failure, run, snapshot, tiny_tensors, write_checkpoint


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- safetensors ---------------------------------------------------------------------------------------
def _st_bytes(ckpt: Path) -> tuple[bytes, int]:
    data = (ckpt / "model.safetensors").read_bytes()
    return data, struct.unpack("<Q", data[:8])[0]


# offsets as fractions of: the 8-byte length, the JSON header, the data (resolved per file)
TRUNCATIONS = ["0", "4", "8", "9", "hdr/2", "hdr", "hdr+1", "data/2", "end-1"]
FLIPS = ["0", "3", "7", "8", "9", "hdr/2", "hdr-2", "hdr/3"]


def _offset(spec: str, size: int, hdr: int) -> int:
    return {
        "hdr/2": 8 + hdr // 2,
        "hdr/3": 8 + hdr // 3,
        "hdr": 8 + hdr,
        "hdr+1": 9 + hdr,
        "hdr-2": 8 + hdr - 2,
        "data/2": size // 2,
        "end-1": size - 1,
    }.get(spec, None) or int(spec)


@pytest.mark.parametrize("cmd", ["inspect", "export-gguf"])
@pytest.mark.parametrize("where", TRUNCATIONS)
def test_truncated_safetensors(tmp_path, ckpt, where, cmd) -> None:
    d = _copy(ckpt, tmp_path / "m")
    data, hdr = _st_bytes(ckpt)
    (d / "model.safetensors").write_bytes(data[: _offset(where, len(data), hdr)])
    before = snapshot(tmp_path)
    args = [cmd, d] + (["-o", tmp_path / "x.gguf"] if cmd == "export-gguf" else [])
    assert_clean_failure(run(args), "model.safetensors", before, tmp_path)


@pytest.mark.parametrize("where", FLIPS)
def test_safetensors_header_bit_flip(tmp_path, ckpt, where) -> None:
    d = _copy(ckpt, tmp_path / "m")
    data, hdr = _st_bytes(ckpt)
    b = bytearray(data)
    b[_offset(where, len(data), hdr)] ^= 0x40
    (d / "model.safetensors").write_bytes(bytes(b))
    before = snapshot(tmp_path)
    # a flip in a tensor name shows as a missing tensor (named with the folder), elsewhere as a bad header
    assert_clean_failure(run(["inspect", d]), [str(d)], before, tmp_path)


BAD_VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
POISONED = [
    "model.embed_tokens.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Checkpoints with one NaN/inf value in one tensor."""
    root = tmp_path_factory.mktemp("poisoned")
    out = {}
    for vname, v in BAD_VALUES.items():
        for t in POISONED:
            tensors = tiny_tensors(TINY_CONFIG)
            tensors[t].flat[3] = v
            out[(vname, t)] = write_checkpoint(root / f"{vname}-{t}", tensors=tensors)
    return out


NAN_COMMANDS = {
    "export-gguf-q4_0": ["export-gguf", "{m}", "-o", "{o}/x.gguf"],
    "export-gguf-f16": ["export-gguf", "{m}", "-o", "{o}/x.gguf", "--type", "f16"],
    "convert-q0f32": ["convert", "{m}", "-o", "{o}/c", "-q", "q0f32", "--no-progress"],
    "convert-q4f16_1": ["convert", "{m}", "-o", "{o}/c", "-q", "q4f16_1", "--clip", "rtn", "--no-progress"],
}


# every value x tensor through both exports; convert (same reader) gets the NaNs and one inf
NAN_CASES = [
    (c, v, t)
    for c in NAN_COMMANDS
    for v in BAD_VALUES
    for t in POISONED
    if not c.startswith("convert") or v == "nan" or t == POISONED[0]
]


@pytest.mark.parametrize("cmd, value, tensor", NAN_CASES, ids=[f"{c}-{v}-{t}" for c, v, t in NAN_CASES])
def test_nan_or_inf_weight_is_refused_naming_the_tensor(tmp_path, poisoned, cmd, value, tensor) -> None:
    m = poisoned[(value, tensor)]
    before = snapshot(tmp_path, m)
    args = [a.format(m=m, o=tmp_path) for a in NAN_COMMANDS[cmd]]
    line = assert_clean_failure(run(args), tensor, before, tmp_path, m)
    assert "NaN or inf" in line


def test_sharded_checkpoint_index_problems(tmp_path, ckpt) -> None:
    d = _copy(ckpt, tmp_path / "m")
    names = list(tiny_tensors(TINY_CONFIG))
    idx = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    before = snapshot(tmp_path)
    assert_clean_failure(run(["inspect", d]), "model-00001-of-00002.safetensors", before, tmp_path)
    (d / "model.safetensors.index.json").write_text("{not json")
    before = snapshot(tmp_path)
    assert_clean_failure(run(["inspect", d]), "model.safetensors.index.json", before, tmp_path)


# -- GGUF ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, ckpt) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    r = run(["export-gguf", ckpt, "-o", out, "--type", "f16"])
    assert r.exit_code == 0, r.output
    return out


def _gguf_case(tmp_path: Path, blob: bytes, expect: list[str] | None = None) -> None:
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    before = snapshot(tmp_path)
    assert_clean_failure(run(["inspect", p]), expect or [str(p)], before, tmp_path)


@pytest.mark.parametrize(
    "where", ["0", "3", "4", "8", "16", "24", "100", "kv/2", "data-1", "data", "data+100", "end-1"]
)
def test_truncated_gguf(tmp_path, gguf_file, where) -> None:
    from gguf import GGUFReader

    data = gguf_file.read_bytes()
    start = GGUFReader(gguf_file).data_offset
    off = {"kv/2": start // 2, "data-1": start - 1, "data": start, "data+100": start + 100}.get(where)
    off = len(data) - 1 if where == "end-1" else (off if off is not None else int(where))
    _gguf_case(tmp_path, data[:off])


@pytest.mark.parametrize(
    "pos, bit", [(0, 1), (2, 0x10), (8, 0x80), (15, 0x80), (16, 0x80), (23, 0x80), (24, 0x80)]
)
def test_gguf_header_bit_flip(tmp_path, gguf_file, pos, bit) -> None:
    b = bytearray(gguf_file.read_bytes())
    b[pos] ^= bit
    _gguf_case(tmp_path, bytes(b))


REQUIRED_KEYS = [
    "general.architecture",
    "phi3.block_count",
    "phi3.embedding_length",
    "phi3.attention.head_count",
    "phi3.feed_forward_length",
]


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_gguf_missing_metadata_key(tmp_path, gguf_file, key) -> None:
    """A same-length rename of the key in the file: the key is gone, nothing else moves."""
    data = gguf_file.read_bytes()
    i = data.find(key.encode())
    b = bytearray(data)
    b[i + len(key) - 2] ^= 0x01
    _gguf_case(tmp_path, bytes(b))


ZERO_KEYS = [
    "phi3.block_count",
    "phi3.embedding_length",
    "phi3.attention.head_count",
    "phi3.attention.head_count_kv",
    "phi3.feed_forward_length",
    "phi3.context_length",
    "phi3.rope.dimension_count",
]


@pytest.mark.parametrize("key", ZERO_KEYS)
def test_gguf_zero_metadata_value(tmp_path, gguf_file, key) -> None:
    data = gguf_file.read_bytes()
    i = data.find(key.encode()) + len(key)
    assert struct.unpack("<I", data[i : i + 4])[0] == 4  # uint32 value follows its type
    b = bytearray(data)
    b[i + 4 : i + 8] = b"\0\0\0\0"
    _gguf_case(tmp_path, bytes(b))


# -- converted folders ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory, ckpt) -> Path:
    out = tmp_path_factory.mktemp("conv") / "q4"
    r = run(["convert", ckpt, "-o", out, "-q", "q4f16_1", "--clip", "rtn", "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def _shard(d: Path) -> Path:
    return sorted(d.glob("params_shard_*.bin"))[0]


def _mc(patch: dict):
    def mutate(d: Path) -> None:
        c = json.loads((d / "mlc-chat-config.json").read_text())
        c["model_config"].update(patch)
        (d / "mlc-chat-config.json").write_text(json.dumps(c))

    return mutate


CONVERTED = {
    "truncated_shard": (lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:-10]), "params_shard_0.bin"),
    "flipped_shard": (
        lambda d: _shard(d).write_bytes(
            bytes([_shard(d).read_bytes()[0] ^ 0xFF]) + _shard(d).read_bytes()[1:]
        ),
        "params_shard_0.bin",
    ),
    "missing_shard": (lambda d: _shard(d).unlink(), "params_shard_0.bin"),
    "empty_shard": (lambda d: _shard(d).write_bytes(b""), "params_shard_0.bin"),
    "no_tensor_cache": (lambda d: (d / "tensor-cache.json").unlink(), "tensor-cache.json"),
    "bad_tensor_cache": (lambda d: (d / "tensor-cache.json").write_text("{"), "tensor-cache.json"),
    "empty_records": (
        lambda d: (d / "tensor-cache.json").write_text(json.dumps({"metadata": {}, "records": []})),
        "tensor-cache.json",
    ),
    "bad_chat_config": (lambda d: (d / "mlc-chat-config.json").write_text("{"), "mlc-chat-config.json"),
    "chat_config_array": (lambda d: (d / "mlc-chat-config.json").write_text("[]"), "mlc-chat-config.json"),
    "max_position_0": (_mc({"max_position_embeddings": 0}), "max_position_embeddings"),
    "hidden_size_str": (_mc({"hidden_size": "x"}), "hidden_size"),
    "tie_str": (_mc({"tie_word_embeddings": "false"}), "tie_word_embeddings"),
    "rms_eps_negative": (_mc({"rms_norm_eps": -1.0}), "rms_norm_eps"),
}


@pytest.mark.parametrize("mutate, names", list(CONVERTED.values()), ids=list(CONVERTED))
def test_corrupted_converted_folder(tmp_path, converted, mutate, names) -> None:
    d = _copy(converted, tmp_path / "conv")
    mutate(d)
    before = snapshot(tmp_path)
    assert_clean_failure(run(["export-gguf", d, "-o", tmp_path / "x.gguf"]), names, before, tmp_path)


def test_quantization_flag_differs_from_converted_scheme(tmp_path, converted) -> None:
    before = snapshot(tmp_path, converted)
    r = run(["generate", converted, "-p", "hi", "-q", "q0f32"])
    assert_clean_failure(r, [str(converted)], before, tmp_path, converted)
