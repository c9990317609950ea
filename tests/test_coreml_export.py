"""`phi3 export-coreml` / `phi3 verify-coreml` on tiny checkpoints.

The packages are read back from disk (coremltools' milproto loader) and executed by our numpy interpreter
against our torch model (itself checked against transformers in test_coreml_model.py). Tolerances are those of
toolkit.coreml.verify: 3e-2 * max|logit| for fp16 storage (measured ~5e-3 relative), see its docstring.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import make_tiny_checkpoint

from toolkit.checkpoint import expected_tensor_shapes, open_model
from toolkit.cli import main as cli
from toolkit.coreml import mil_interpreter
from toolkit.coreml.export import (
    INT4_BLOCK,
    export_coreml,
    quantize_rows,
    read_export_metadata,
    weight_op_name,
)
from toolkit.coreml.mil_interpreter import load_program
from toolkit.coreml.verify import verify_package
from toolkit.errors import UserError

CONTEXT = 64
SWIFT = Path(__file__).resolve().parents[1] / "examples" / "ios-coreml" / "Phi3Generator.swift"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """variant -> (checkpoint, package). phi4-mini int4 covers GQA, partial rotary, tied embeddings, longrope;
    mini-4k fp16 goes through the CLI and crosses its sliding window (16) within the 20 verified tokens."""
    root = tmp_path_factory.mktemp("coreml_export")
    out = {}
    ckpt = make_tiny_checkpoint(root / "phi4-mini", "phi4-mini")
    res = export_coreml(ckpt, root / "phi4_int4.mlpackage", context=CONTEXT, progress=False)
    out["int4"] = (ckpt, res.path)
    ckpt = make_tiny_checkpoint(root / "mini-4k", "mini-4k")
    pkg = root / "mini4k_fp16.mlpackage"
    args = [
        "export-coreml",
        str(ckpt),
        "-o",
        str(pkg),
        "--context",
        str(CONTEXT),
        "--weights",
        "fp16",
        "--quiet",
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and pkg.is_dir()
    out["fp16"] = (ckpt, pkg)
    return out


def _ops(pkg: Path):
    spec, prog = load_program(pkg)
    return spec, prog, list(prog.functions["main"].operations)


def test_spec_declares_inputs_states_and_flexible_length(exports):
    for mode, (ckpt, pkg) in exports.items():
        spec, _, _ = _ops(pkg)
        cfg = open_model(ckpt).config
        assert spec.WhichOneof("Type") == "mlProgram"
        inputs = {i.name: i for i in spec.description.input}
        assert set(inputs) == {"input_ids", "causal_mask"}
        rng = inputs["input_ids"].type.multiArrayType.shapeRange.sizeRanges
        assert (rng[1].lowerBound, rng[1].upperBound) == (1, CONTEXT)
        states = {s.name: s for s in spec.description.state}
        assert set(states) == {"keyCache", "valueCache"}
        shape = tuple(states["keyCache"].type.stateType.arrayType.shape)
        assert shape == (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, CONTEXT, cfg.head_dim)
        assert [o.name for o in spec.description.output] == ["logits"]
        meta = read_export_metadata(spec)
        assert meta["weights"] == mode and meta["context"] == CONTEXT


def test_int4_blockwise_on_linear_and_embedding_only(exports):
    from coremltools.converters.mil.mil import types

    ckpt, pkg = exports["int4"]
    cfg = open_model(ckpt).config
    _, _, ops = _ops(pkg)
    quant = [op for op in ops if op.op_type == "constexpr_blockwise_shift_scale"]
    matrices = [n for n, s in expected_tensor_shapes(cfg).items() if len(s) == 2]
    assert cfg.tie_word_embeddings  # one embedding matrix serves the gather and the lm_head linear
    assert sorted(op.name for op in quant) == sorted(weight_op_name(n) for n in matrices)
    for op in quant:
        assert op.data.dtype == types.int4
        n, k = op.data.shape
        assert op.scale.shape == (n, k // INT4_BLOCK)  # per block of 32 along the input axis
        assert op.scale.dtype == types.fp16 and op.offset is None  # symmetric
        users = {c.op_type for c in op.outputs[0].child_ops}
        assert users <= {"linear", "gather"}, (op.name, users)  # no leftover casts in between
    assert Counter(c.op_type for op in quant for c in op.outputs[0].child_ops)["gather"] == 1
    # the RoPE tables, norms and everything else stay plain fp16 consts
    for op in ops:
        val = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(val, np.ndarray) and val.ndim >= 2 and np.issubdtype(val.dtype, np.floating):
            assert op.outputs[0].dtype == types.fp16, op.name
    rope = [op for op in ops if op.op_type == "const" and "rope" in op.name]
    assert rope
    assert all(c.op_type in {"gather", "slice_by_index"} for op in rope for c in op.outputs[0].child_ops)


def test_fp16_export_has_no_quantization(exports):
    _, pkg = exports["fp16"]
    _, _, ops = _ops(pkg)
    assert not [op for op in ops if op.op_type.startswith("constexpr_")]
    assert (
        Counter(op.op_type for op in ops)["write_state"]
        + Counter(op.op_type for op in ops)["coreml_update_state"]
        >= 2
    )


@pytest.mark.parametrize("mode", ["int4", "fp16"])
def test_interpreter_matches_reference_prefill_and_8_decode_steps(exports, mode):
    ckpt, pkg = exports[mode]
    report = verify_package(pkg, ckpt, prompt_len=12, decode_steps=8)
    assert report.steps == 9
    assert report.passed, report.summary()
    assert max(report.interp_errors) <= report.tolerance
    # fp16 weights are exact to fp16 rounding; int4 carries the expected ~10% quantization error
    worst = max(report.weight_errors.values())
    assert (worst < 1e-3) if mode == "fp16" else (0.02 < worst < 0.2), report.summary()


def test_verification_catches_a_broken_state_update(exports, monkeypatch):
    """Negative control: if state writes were lost, prefill still matches but every decode step must fail."""
    _, pkg = exports["int4"]
    monkeypatch.setitem(mil_interpreter._OPS, "write_state", lambda it, a: ())
    monkeypatch.setitem(mil_interpreter._OPS, "coreml_update_state", lambda it, a: a["value"])
    report = verify_package(pkg, prompt_len=12, decode_steps=4)
    assert report.interp_errors[0] <= report.tolerance
    assert min(report.interp_errors[1:]) > report.tolerance
    assert not report.passed


def test_verify_cli(exports):
    _, pkg = exports["fp16"]
    res = CliRunner().invoke(cli, ["verify-coreml", str(pkg), "--decode-steps", "3"])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output


def test_corrupted_package_is_a_clear_error(exports, tmp_path):
    import shutil

    _, pkg = exports["fp16"]
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(pkg, broken)
    weights = next(broken.rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot read the Core ML package"):
        verify_package(broken)
    spec_file = next(broken.rglob("model.mlmodel"))
    spec_file.write_bytes(b"\x08garbage" * 10)
    res = CliRunner().invoke(cli, ["verify-coreml", str(broken)])
    assert res.exit_code == 1
    assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1
    empty = tmp_path / "empty.mlpackage"
    empty.mkdir()
    with pytest.raises(UserError, match="Manifest"):
        verify_package(empty)


def test_bad_export_arguments_are_user_errors(exports, tmp_path):
    ckpt, _ = exports["fp16"]
    with pytest.raises(UserError, match="mlpackage"):
        export_coreml(ckpt, tmp_path / "x.bin", context=16, progress=False)
    with pytest.raises(UserError, match="context"):
        export_coreml(ckpt, tmp_path / "x.mlpackage", context=10**6, progress=False)
    assert not list(tmp_path.iterdir())  # nothing partial left behind


def test_swift_example_names_match_the_spec(exports):
    _, pkg = exports["int4"]
    spec, _, _ = _ops(pkg)
    source = SWIFT.read_text()
    names = dict(re.findall(r'^let (\w+)Name = "(\w+)"', source, flags=re.M))
    assert names["inputIds"] == "input_ids" and names["causalMask"] == "causal_mask"
    assert {names["inputIds"], names["causalMask"]} == {i.name for i in spec.description.input}
    assert names["logits"] in {o.name for o in spec.description.output}
    assert {names["keyCacheState"], names["valueCacheState"]} == {s.name for s in spec.description.state}
    # every feature the Swift code passes or reads goes through these constants
    assert "makeState()" in source and "prediction(from: inputs, using: state)" in source
    for used in ("inputIdsName", "causalMaskName", "logitsName"):
        assert source.count(used) >= 2


@pytest.mark.parametrize("bits,block", [(4, INT4_BLOCK), (8, 0)])
def test_quantizer_matches_coremltools_linear_symmetric(bits, block):
    """Our streaming quantizer (row chunks, fp16-rounded scale) vs coremltools' own per-block quantizer."""
    from coremltools.converters.mil.mil import types
    from coremltools.optimize._utils import compute_qparams_by_dtype

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block: coremltools divides by zero there, we store scale 0 and data 0
    block = block or w.shape[1]  # int8: one block per output channel
    data, scale = quantize_rows(w, bits, block, rows_per_chunk=24)
    dtype = types.int4 if bits == 4 else types.int8
    with np.errstate(divide="ignore", invalid="ignore"):
        ref_data, ref_scale, _ = compute_qparams_by_dtype(w, dtype, "LINEAR_SYMMETRIC", [1, block])
    assert data.shape == w.shape and scale.shape == (64, 256 // block)
    assert data.dtype == ref_data.dtype  # int4 is int8 storage carrying the int4 marker
    valid = np.ones_like(scale, bool)
    if bits == 4:
        valid[3, 0] = False
        assert scale[3, 0] == 0 and not data[3, :32].any()
    np.testing.assert_array_equal(scale[valid], ref_scale[valid].astype(np.float16))
    # data may differ by one level where the fp16-rounded scale moves a value across a rounding boundary
    cols = np.repeat(valid, block, axis=1)
    diff = np.abs(data.astype(np.int32) - ref_data.astype(np.int32))[cols]
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    deq = data.astype(np.float32) * np.repeat(scale.astype(np.float32), block, axis=1)
    rel = np.sqrt(np.mean((deq - w) ** 2) / np.mean(w**2))
    assert rel < (0.12 if bits == 4 else 0.012)  # uniform-rounding error of 7 / 127 levels on Gaussian data


@pytest.mark.slow
def test_int8_export_of_gqa_model_verifies(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "medium", "medium")
    pkg = export_coreml(
        ckpt, tmp_path / "medium_int8.mlpackage", context=32, weights="int8", progress=False
    ).path
    _, _, ops = _ops(pkg)
    quant = [op for op in ops if op.op_type == "constexpr_blockwise_shift_scale"]
    assert quant and all(op.scale.shape[1] == 1 for op in quant)  # per output channel
    report = verify_package(pkg, ckpt)
    assert report.passed, report.summary()
