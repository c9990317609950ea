"""`phi3 export-coreml` / `phi3 verify-coreml` on tiny checkpoints.

The packages are read back from disk (coremltools' milproto loader) and executed by our numpy interpreter
against our torch model (itself checked against transformers in test_coreml_model.py). Tolerances are those of
toolkit.coreml.verify: 3e-2 * max|logit| for fp16 storage (measured ~5e-3 relative), see its docstring.

The interface is checked against a table written down from swift-transformers 1.3.3's source (below), not
against the constants the exporter uses, so a rename on either side fails here.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import load_hf_model, make_tiny_checkpoint

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
from toolkit.coreml.mil_interpreter import MILInterpreter, load_program
from toolkit.coreml.verify import verify_package
from toolkit.errors import UserError

CONTEXT = 64
SWIFT_PACKAGE = Path(__file__).resolve().parents[1] / "examples" / "ios-coreml"

# swift-transformers 1.3.3, Sources/Models/LanguageModel.swift (LanguageModel.Keys, contextRange,
# kvCacheAvailability, LanguageModelWithStatefulKVCache.predictNextTokenScores):
# feature name -> (kind, Core ML data type it creates or reads)
SWIFT_TRANSFORMERS_FEATURES = {
    "inputIds": ("input", "INT32"),  # MLTensor of Int32, (1, q); context range = last axis of its shape range
    "causalMask": ("input", "FLOAT16"),  # MLTensor(zeros: [1, 1, 1, tokenCount + 1], Float16)
    "logits": ("output", "FLOAT16"),  # rank 3, row q - 1 scores the next token
    "keyCache": ("state", "FLOAT16"),  # both states present -> LanguageModelWithStatefulKVCache
    "valueCache": ("state", "FLOAT16"),
}
# features whose presence changes what it does: attentionMask is fed too, presentKeys/Values select the
# unsupported KV-cache-as-I/O path (fatalError)
SWIFT_TRANSFORMERS_ABSENT = {"attentionMask", "presentKeys", "presentValues"}
# user-defined metadata read (LanguageModel.modelName) and the rest of huggingface/exporters' keys
HF_METADATA = {
    "co.huggingface.exporters.name",
    "co.huggingface.exporters.task",
    "co.huggingface.exporters.architecture",
    "co.huggingface.exporters.framework",
    "co.huggingface.exporters.precision",
}
# Sources/Hub/Hub.swift loadConfig(modelFolder:): files read from the model folder
MODEL_FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """variant -> (checkpoint, package). phi4-mini int4 covers GQA, partial rotary, tied embeddings, longrope;
    mini-4k fp16 goes through the CLI and crosses its sliding window (16) within the 20 verified tokens."""
    root = tmp_path_factory.mktemp("coreml_export")
    out = {}
    ckpt = make_tiny_checkpoint(root / "phi4-mini", "phi4-mini")
    (root / "phi4_int4").mkdir()  # one folder per export: the tokenizer files go next to the package
    res = export_coreml(ckpt, root / "phi4_int4" / "phi4.mlpackage", context=CONTEXT, progress=False)
    out["int4"] = (ckpt, res.path)
    ckpt = make_tiny_checkpoint(root / "mini-4k", "mini-4k")
    (root / "mini4k_fp16").mkdir()
    pkg = root / "mini4k_fp16" / "mini4k.mlpackage"
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
    assert "wrote" in res.output and pkg.is_dir() and "tokenizer files" in res.output
    out["fp16"] = (ckpt, pkg)
    return out


def _ops(pkg: Path):
    spec, prog = load_program(pkg)
    return spec, prog, list(prog.functions["main"].operations)


def test_spec_has_the_interface_swift_transformers_reads(exports):
    for mode, (ckpt, pkg) in exports.items():
        import coremltools as ct

        spec = ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()
        _, prog = load_program(pkg)
        cfg = open_model(ckpt).config
        assert spec.WhichOneof("Type") == "mlProgram"
        desc = spec.description
        features = {
            **{f.name: ("input", f) for f in desc.input},
            **{f.name: ("output", f) for f in desc.output},
            **{f.name: ("state", f) for f in desc.state},
        }
        assert set(features) == set(SWIFT_TRANSFORMERS_FEATURES)
        assert not SWIFT_TRANSFORMERS_ABSENT & set(features)
        for name, (kind, dtype) in SWIFT_TRANSFORMERS_FEATURES.items():
            got_kind, f = features[name]
            assert got_kind == kind, name
            array = f.type.stateType.arrayType if kind == "state" else f.type.multiArrayType
            assert ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType) == dtype, (
                name
            )

        def ranges(name, f=features):
            return [
                (r.lowerBound, r.upperBound) for r in f[name][1].type.multiArrayType.shapeRange.sizeRanges
            ]

        # inputIds (1, q): swift-transformers takes min/max context from the last axis and needs max - min > 1
        assert ranges("inputIds") == [(1, 1), (1, CONTEXT)]
        # causalMask: one row whatever q is, width = tokens so far + 1, up to context + 1
        (r0, r1, rows, width) = ranges("causalMask")
        assert r0 == r1 == (1, 1) and rows == (1, CONTEXT) and width[0] <= 2 and width[1] == CONTEXT + 1
        assert prog.functions["main"].outputs[0].rank == 3  # logits (1, q, vocab)
        kv = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, CONTEXT, cfg.head_dim)
        for state in ("keyCache", "valueCache"):
            assert tuple(features[state][1].type.stateType.arrayType.shape) == kv
        meta = dict(desc.metadata.userDefined)
        assert HF_METADATA <= set(meta)
        assert meta["co.huggingface.exporters.name"] == Path(ckpt).name  # no Hub id in a tiny config
        assert meta["co.huggingface.exporters.task"] == "text-generation"
        assert meta["co.huggingface.exporters.architecture"] == "Phi3ForCausalLM"
        assert meta["co.huggingface.exporters.precision"] == mode
        assert desc.metadata.shortDescription  # LanguageModel.description
        ours = read_export_metadata(spec)
        assert ours["weights"] == mode and ours["context"] == CONTEXT


def test_tokenizer_files_next_to_the_package(exports):
    """What AutoTokenizer.from(modelFolder:) and LanguageModel read: tokenizer_class, one EOS (the turn end),
    integer bos/eos ids in config.json; the tokenizer.json encodes like the toolkit's tokenizer."""
    import tokenizers

    for ckpt, pkg in exports.values():
        folder = pkg.parent
        assert sorted(p.name for p in folder.iterdir()) == sorted([pkg.name, *MODEL_FOLDER_FILES])
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        ours = open_model(ckpt).tokenizer()
        assert tc["tokenizer_class"] in {"GPT2Tokenizer", "LlamaTokenizer", "PreTrainedTokenizer"}
        assert tc["eos_token"] == "<|end|>" and tk.token_to_id("<|end|>") == config["eos_token_id"]
        assert config["eos_token_id"] in ours.eos_token_ids
        assert set(tc["toolkit_eos_token_ids"]) == ours.eos_token_ids
        assert isinstance(config["bos_token_id"], int) and config["model_type"] == "phi3"
        assert tc["model_max_length"] == CONTEXT
        text = "Hello, my name is Phi. <|user|>naïve café 🙂<|end|>"
        assert tk.encode(text).ids == ours.encode(text)  # as swift-transformers encodes (special tokens on)


def test_tokenizer_json_adds_bos_when_the_model_wants_it(tmp_path):
    """GGUF-built tokenizers leave BOS to the toolkit; swift-transformers only adds it via tokenizer.json."""
    import tokenizers
    from tiny_tokenizer import build_tiny_tokenizer

    from toolkit.coreml.model_folder import write_model_folder
    from toolkit.tokenizer import Tokenizer

    tk = build_tiny_tokenizer(512)
    bos = tk.token_to_id("<|endoftext|>")
    tok = Tokenizer(tk, bos_token_id=bos, eos_token_ids={tk.token_to_id("<|end|>")}, add_bos=True)
    cfg = open_model(make_tiny_checkpoint(tmp_path / "ck", "mini-4k")).config
    src = SimpleNamespace(tokenizer=lambda: tok, kind="gguf", path=tmp_path / "m.gguf", config=cfg)
    write_model_folder(src, tmp_path, context=32)
    written = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert written.encode("Hello").ids == tok.encode("Hello") and tok.encode("Hello")[0] == bos
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True and tc["bos_token"] == "<|endoftext|>"
    assert tc["tokenizer_class"] == "GPT2Tokenizer"  # byte-level BPE
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == tk.token_to_id("<|end|>")
    assert tk.post_processor is None  # the source tokenizer was not modified


def test_tokenizer_files_from_a_gguf_source(tmp_path):
    """A GGUF carries no tokenizer.json: it is rebuilt from the GGUF vocabulary and encodes the same."""
    import tokenizers

    from toolkit.checkpoint.gguf_export import export_gguf
    from toolkit.coreml.model_folder import write_model_folder

    gguf = tmp_path / "m.gguf"
    export_gguf(make_tiny_checkpoint(tmp_path / "ck", "mini-4k"), gguf, qtype="f16")
    src = open_model(gguf)
    out = tmp_path / "out"
    out.mkdir()
    assert [p.name for p in write_model_folder(src, out, context=CONTEXT)] == list(MODEL_FOLDER_FILES)
    tk = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "Hello, my name is Phi. <|user|>naïve café 🙂<|end|>"
    assert tk.encode(text).ids == src.tokenizer().encode(text)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi3" and config["eos_token_id"] == tk.token_to_id("<|end|>")
    assert sorted(p.name for p in out.iterdir()) == sorted(MODEL_FOLDER_FILES)  # no temp files left


def test_swift_transformers_call_pattern_generates_hf_greedy_tokens(exports):
    """The package driven exactly as LanguageModelWithStatefulKVCache drives it (whole prompt, then the last
    token; zero masks of width tokens + 1) produces transformers' greedy continuation; the 20 tokens cross
    mini-4k's sliding window (16)."""
    import torch

    ckpt, pkg = exports["fp16"]
    _, prog = load_program(pkg)
    interp = MILInterpreter(prog)
    prompt = np.random.default_rng(7).integers(0, 512, 12).tolist()
    tokens = list(prompt)
    while len(tokens) < 20:
        ids = tokens if len(tokens) == len(prompt) else tokens[-1:]
        mask = np.zeros((1, 1, 1, len(tokens) + 1), np.float16)
        logits = interp.predict({"inputIds": np.array([ids], np.int32), "causalMask": mask})["logits"]
        tokens.append(int(np.argmax(logits[0, -1])))
    hf = load_hf_model(ckpt)
    ref = list(prompt)
    with torch.no_grad():
        while len(ref) < 20:
            ref.append(int(hf(torch.tensor([ref])).logits[0, -1].argmax()))
    assert tokens == ref


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
    with pytest.raises(UserError, match="context"):
        export_coreml(ckpt, tmp_path / "x.mlpackage", context=2, progress=False)
    assert not list(tmp_path.iterdir())  # nothing partial left behind
    no_tok = make_tiny_checkpoint(tmp_path / "no_tok", "mini-4k", tokenizer=False)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="--no-tokenizer-files"):
        export_coreml(no_tok, out / "x.mlpackage", context=16, progress=False)
    assert not list(out.iterdir())


def test_swift_package_uses_swift_transformers_at_the_pinned_version():
    from toolkit.coreml.swift_transformers import SWIFT_TRANSFORMERS_VERSION

    manifest = (SWIFT_PACKAGE / "Package.swift").read_text()
    pin = re.search(r'swift-transformers", exact: "([\d.]+)"', manifest)
    assert pin and pin.group(1) == SWIFT_TRANSFORMERS_VERSION == "1.3.3"
    source = "\n".join(
        p.read_text() for p in sorted(SWIFT_PACKAGE.rglob("*.swift")) if p.name != "Package.swift"
    )
    # loading, tokenizer, state and generation all go through swift-transformers' API ...
    for call in (
        "LanguageModel.loadCompiled(",
        "AutoTokenizer.from(modelFolder:",
        "resetState()",
        "model.generate(config:",
        "applyChatTemplate(",
        "doSample",
    ):
        assert call in source, call
    # ... and no feature name or hand-made mask appears in the app code: LanguageModel owns the interface
    for name in SWIFT_TRANSFORMERS_FEATURES:
        assert f'"{name}"' not in source, name
    assert "MLMultiArray" not in source and "prediction(" not in source


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


def test_a_bad_output_name_is_one_line_in_a_fresh_process(tmp_path):
    """coremltools logs about ten lines when first imported on Linux (each Core ML class it cannot load, each
    untested torch / xgboost version): a fresh `phi3 export-coreml -o x.txt` prints only our one line (every
    import of coremltools goes through `toolkit.coreml.import_coremltools`)."""
    import subprocess
    import sys

    code = "import sys; from toolkit.cli import run; sys.argv = ['phi3', *sys.argv[1:]]; run()"
    args = [sys.executable, "-c", code, "export-coreml", "-o", str(tmp_path / "x.txt")]
    proc = subprocess.run(args, capture_output=True, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "x.txt: output must end in .mlpackage" in lines[0], proc.stderr
