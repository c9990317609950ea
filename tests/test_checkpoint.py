"""HF checkpoint reader: streaming, sharding, dtypes, and one-line errors naming the file for bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import make_tiny_checkpoint
from tiny_tokenizer import write_tiny_tokenizer

from toolkit.checkpoint import expected_tensor_shapes, open_model
from toolkit.cli import main
from toolkit.errors import UserError


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {
        "single": make_tiny_checkpoint(root / "single", "medium", tokenizer=False),
        # ~100 KB shards: the 2-layer model spreads over several files, tensors never split
        "sharded": make_tiny_checkpoint(root / "sharded", "medium", max_shard_size="100KB", tokenizer=False),
        "bf16": make_tiny_checkpoint(
            root / "bf16", "medium", dtype="bfloat16", max_shard_size="100KB", tokenizer=False
        ),
        "fp16": make_tiny_checkpoint(root / "fp16", "medium", dtype="float16", tokenizer=False),
        "tied": make_tiny_checkpoint(root / "tied", "phi4-mini", tokenizer=False),
    }
    write_tiny_tokenizer(out["single"], 512)
    return out


def _safetensors_reference(folder: Path) -> dict[str, np.ndarray]:
    """All tensors via safetensors.torch.load_file (whole files, upcast by torch): the reference."""
    from safetensors.torch import load_file

    ref = {}
    for f in sorted(folder.glob("*.safetensors")):
        ref.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return ref


def test_single_and_sharded_give_identical_tensors(ckpts) -> None:
    a, b = open_model(ckpts["single"]), open_model(ckpts["sharded"])
    assert len(list(ckpts["sharded"].glob("model-*.safetensors"))) > 2
    assert a.kind == b.kind == "hf" and a.config == b.config
    assert a.tensor_names() == b.tensor_names() == list(expected_tensor_shapes(a.config))
    ref = _safetensors_reference(ckpts["single"])
    for (na, ta), (nb, tb) in zip(a.iter_tensors(), b.iter_tensors(), strict=True):
        assert na == nb and ta.dtype == np.float32 and ta.shape == a.tensor_shape(na)
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ta, ref[na])
    qkv = a.get_tensor("model.layers.1.self_attn.qkv_proj.weight")
    assert qkv.shape == ((8 + 2 * 2) * 16, 128)


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_half_precision_inputs_upcast_exactly(ckpts, kind: str) -> None:
    src = open_model(ckpts[kind])
    ref = _safetensors_reference(ckpts[kind])
    names = src.tensor_names()
    assert set(names) == set(ref)
    for name, t in src.iter_tensors():
        assert t.dtype == np.float32
        np.testing.assert_array_equal(t, ref[name])  # bf16/fp16 -> fp32 is exact
    # the half-precision checkpoint is the fp32 one rounded: differences stay within half-precision rounding
    fp32 = open_model(ckpts["single"]).get_tensor(names[1])
    rel = 2.0**-8 if kind == "bf16" else 2.0**-11
    np.testing.assert_allclose(src.get_tensor(names[1]), fp32, rtol=rel, atol=0)


def test_file_inside_a_folder_opens_the_folder(ckpts) -> None:
    for f in (ckpts["single"] / "model.safetensors", ckpts["sharded"] / "model.safetensors.index.json"):
        src = open_model(f)
        assert src.kind == "hf" and src.path == f.parent


def test_tied_has_no_lm_head(ckpts) -> None:
    src = open_model(ckpts["tied"])
    assert src.config.tie_word_embeddings and src.config.rotary_dim == 24
    assert "lm_head.weight" not in src.tensor_names()
    assert src.tensor_names()[-1] == "model.norm.weight"


def test_iter_tensors_is_lazy_and_ordered(ckpts) -> None:
    src = open_model(ckpts["sharded"])
    wanted = ["model.norm.weight", "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"]
    it = src.iter_tensors(wanted)
    assert not isinstance(it, list | tuple)
    assert [n for n, _ in it] == wanted
    with pytest.raises(KeyError):
        list(src.iter_tensors(["model.layers.9.mlp.down_proj.weight"]))


def test_tokenizer_and_template_of_hf_folder(ckpts) -> None:
    src = open_model(ckpts["single"])
    tok = src.tokenizer()
    assert src.conv_template == "phi3"
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    assert tok.token_to_id("<|end|>") in tok.eos_token_ids and 2 in tok.eos_token_ids
    with pytest.raises(UserError, match="no tokenizer.json"):
        open_model(ckpts["sharded"]).tokenizer()


def test_inspect_cli(ckpts) -> None:
    r = CliRunner().invoke(main, ["inspect", str(ckpts["single"]), "--json", "--tensors"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["kind"] == "hf" and info["tensors"] == 15 and info["config"]["num_key_value_heads"] == 2
    assert info["tokenizer"]["eos_token_ids"][0] == 2
    assert info["tensor_shapes"]["model.layers.0.mlp.gate_up_proj.weight"] == [512, 128]
    r = CliRunner().invoke(main, ["inspect", str(ckpts["tied"])])
    assert r.exit_code == 0 and "tie_word_embeddings: True" in r.stdout and "unavailable" in r.stdout


# ---- bad input ---------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _expect_error(path: Path, blamed: Path, match: str, allow_pickle: bool = False) -> None:
    """Bad input is a one-line UserError naming `blamed`, through the API and through `phi3 inspect`."""
    with pytest.raises(UserError, match=match) as e:
        open_model(path, allow_pickle=allow_pickle)
    assert e.value.path == str(blamed)
    args = ["inspect", str(path)] + (["--allow-pickle"] if allow_pickle else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {blamed}: "), r.stderr
    assert "Traceback" not in r.output


def test_missing_config(ckpts, tmp_path) -> None:
    d = _copy(ckpts["single"], tmp_path / "m")
    (d / "config.json").unlink()
    _expect_error(d, d, "not a model folder")
    with pytest.raises(UserError, match="no config.json"):
        from toolkit.checkpoint.safetensors_source import HFSource

        HFSource(d)


def test_unknown_architecture(ckpts, tmp_path) -> None:
    d = _copy(ckpts["single"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_error(d, d / "config.json", "unsupported architecture")


def test_missing_shard(ckpts, tmp_path) -> None:
    d = _copy(ckpts["sharded"], tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    _expect_error(d, shard, "shard named in model.safetensors.index.json is missing")


def test_truncated_safetensors(ckpts, tmp_path) -> None:
    d = _copy(ckpts["sharded"], tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    _expect_error(d, shard, "corrupt or truncated safetensors")
    shard.write_bytes(data[:5])
    _expect_error(d, shard, "corrupt or truncated safetensors")
    shard.write_bytes(b"\x00" * 64)
    _expect_error(d, shard, "corrupt or truncated safetensors")


def test_a_shard_changed_after_opening_fails_at_its_tensor(ckpts, tmp_path) -> None:
    # the header was read and checked when the folder opened; the data is read later, tensor by tensor, at
    # the offsets of that header
    d = _copy(ckpts["sharded"], tmp_path / "m")
    src = open_model(d)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(UserError, match="changed since the checkpoint was opened") as e:
        dict(src.iter_tensors())
    assert e.value.path == str(shard)


def test_shape_mismatch(ckpts, tmp_path) -> None:
    d = _copy(ckpts["single"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 300
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_error(
        d, d / "model.safetensors", r"gate_up_proj.weight has shape \[512, 128\], config.json implies \[600"
    )


def _rewrite(d: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_and_unexpected_tensors(ckpts, tmp_path) -> None:
    import torch

    d = _copy(ckpts["single"], tmp_path / "missing")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    _expect_error(d, d, "lacks 1 tensor.*model.layers.1.mlp.down_proj.weight")
    d = _copy(ckpts["single"], tmp_path / "unexpected")
    _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}))
    _expect_error(d, d / "model.safetensors", "unexpected tensor model.layers.0.self_attn.q_proj.bias")
    d = _copy(ckpts["single"], tmp_path / "int8")
    _rewrite(d, lambda t: t.update({"model.norm.weight": torch.ones(128, dtype=torch.int8)}))
    _expect_error(d, d / "model.safetensors", "dtype I8")


def test_missing_tensor_promised_by_index(ckpts, tmp_path) -> None:
    d = _copy(ckpts["sharded"], tmp_path / "m")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    name, shard = next(iter(idx["weight_map"].items()))
    other = next(s for s in sorted(set(idx["weight_map"].values())) if s != shard)
    idx["weight_map"][name] = other
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    _expect_error(d, d / other, f"the index says {name} is in this shard")


def test_pickle_refused_unless_allowed(ckpts, tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    d = _copy(ckpts["single"], tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    _expect_error(d, d / "pytorch_model.bin", "pickle .bin checkpoint refused")
    src = open_model(d, allow_pickle=True)
    for name, t in src.iter_tensors():
        np.testing.assert_array_equal(t, sd[name].numpy())
    r = CliRunner().invoke(main, ["inspect", str(d), "--allow-pickle"])
    assert r.exit_code == 0, r.output
    # the pre-1.6 (non-zip) format cannot be memory-mapped; it is read whole
    torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    name, t = next(open_model(d, allow_pickle=True).iter_tensors())
    np.testing.assert_array_equal(t, sd[name].numpy())


def test_not_a_model(tmp_path) -> None:
    _expect_error(tmp_path / "nope", tmp_path / "nope", "no such file")
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", tmp_path / "empty", "not a model folder")
    (tmp_path / "x.txt").write_text("hi")
    _expect_error(tmp_path / "x.txt", tmp_path / "x.txt", "not a model")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    _expect_error(tmp_path / "bad.gguf", tmp_path / "bad.gguf", "not a readable GGUF")


def test_no_weights(ckpts, tmp_path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(ckpts["single"] / "config.json", d / "config.json")
    _expect_error(d, d, "no weights")


def test_converted_folder_goes_to_the_converter_reader(tmp_path) -> None:
    """A folder with mlc-chat-config.json goes to the converter's reader (or a clear error), never HF."""
    (tmp_path / "config.json").write_text("{}")  # would be an HF error if dispatch went the wrong way
    (tmp_path / "mlc-chat-config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError) as e:
        open_model(tmp_path)
    if importlib.util.find_spec("toolkit.checkpoint.mlc_source") is None:
        assert "no reader" in str(e.value) and e.value.path == str(tmp_path)
    else:
        assert e.value.path == str(tmp_path / "mlc-chat-config.json")
