"""`phi3 quant-report --ppl` / `phi3 eval --schemes`: one row per scheme with bits per weight counted from the
converted params and perplexity from the engine; q0f32's perplexity checked against transformers."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import load_hf_model, make_tiny_checkpoint

from toolkit.cli import main

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them.\n"
)
CONTEXT = 32  # disjoint windows (stride == context): each window scores its own len-1 predictions


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qtable") / "ckpt", "mini-4k")


def _reference_ppl(ckpt: Path, ids: list[int]) -> float:
    """transformers fp32 over the same disjoint windows."""
    import torch

    model = load_hf_model(ckpt)
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), CONTEXT):
            w = ids[s : s + CONTEXT]
            if len(w) < 2:
                break
            logp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), -1).numpy()
            nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
            n += len(w) - 1
    return math.exp(nll / n)


def test_quant_report_ppl_table(ckpt, tmp_path, monkeypatch) -> None:
    from safetensors.numpy import load_file

    from toolkit.checkpoint import open_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the per-scheme folders go
    (tmp_path / "tmp").mkdir()
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    png, js = tmp_path / "q.png", tmp_path / "q.json"
    args = ["quant-report", str(ckpt), "--ppl", str(text), "--schemes", "q0f32,q4f16_1:rtn", "--no-progress"]
    args += ["--context", str(CONTEXT), "--stride", str(CONTEXT), "--plot", str(png), "--json-file", str(js)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads(js.read_text())
    rows = {(row["scheme"], row["method"]): row for row in report["rows"]}
    assert list(rows) == [("q0f32", "-"), ("q4f16_1", "rtn")]
    lines = r.output.splitlines()
    assert lines[1].split()[:3] == ["q0f32", "-", "32.0000"] and lines[2].split()[:3] == [
        "q4f16_1",
        "rtn",
        "4.5000",
    ]
    # hand count over the 2-D weight matrices of the checkpoint: 32 bits each in q0f32; q4f16_1 packs 4-bit
    # codes and one fp16 scale per group of 32 -> 4 + 16/32 = 4.5 (every K here is a multiple of 32)
    mats = [a for a in load_file(str(ckpt / "model.safetensors")).values() if a.ndim == 2]
    assert all(a.shape[1] % 32 == 0 for a in mats)
    count = sum(a.size for a in mats)
    assert rows[("q0f32", "-")]["weights_counted"] == count
    assert rows[("q0f32", "-")]["weight_bytes"] == 4 * count
    assert rows[("q4f16_1", "rtn")]["weight_bytes"] * 8 == count * 4 + count // 32 * 16
    assert rows[("q0f32", "-")]["bits_per_weight"] == 32.0
    assert rows[("q4f16_1", "rtn")]["bits_per_weight"] == 4.5
    # perplexities finite (no ordering asserted: random weights need not favour full precision)
    for row in rows.values():
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    ids = open_model(str(ckpt)).tokenizer().encode(TEXT)
    assert rows[("q0f32", "-")]["tokens_scored"] == len(ids) - math.ceil(len(ids) / CONTEXT)
    # fp32 engine vs fp32 torch: only summation order differs
    assert rows[("q0f32", "-")]["perplexity"] == pytest.approx(_reference_ppl(ckpt, ids), rel=1e-3)
    assert rows[("q0f32", "-")]["delta"] == 0.0
    q4 = rows[("q4f16_1", "rtn")]
    assert q4["delta"] == pytest.approx(q4["perplexity"] - rows[("q0f32", "-")]["perplexity"])
    # outputs complete, written under temp names then renamed; per-scheme folders removed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json", "q.png", "t.txt", "tmp"]
    assert list((tmp_path / "tmp").iterdir()) == []

    # `phi3 eval --schemes` runs the same code: the same row
    r = CliRunner().invoke(
        main,
        ["eval", str(ckpt), "--ppl", str(text), "--schemes", "q0f32", "--json"]
        + ["--context", str(CONTEXT), "--stride", str(CONTEXT)],
    )
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)["rows"]
    assert row["perplexity"] == pytest.approx(rows[("q0f32", "-")]["perplexity"], rel=1e-6)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--schemes", "q0f32,q5_nope"], "unknown scheme 'q5_nope'"),
        (["--schemes", "gguf_q4_0:rtn"], "only q4f16_1/q4f32_1 take a clip method"),
        (["--schemes", "q4f16_1:fast"], "unknown method 'fast'"),
        (["--schemes", ","], "no schemes given"),
    ],
)
def test_bad_schemes_exit_2_before_loading(tmp_path, extra, needle) -> None:
    # the model does not exist: a parse-time refusal must come first
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    for cmd in (
        ["quant-report", str(tmp_path / "nope"), "--ppl", str(text)],
        ["eval", str(tmp_path / "nope"), "--ppl", str(text)],
    ):
        r = CliRunner().invoke(main, cmd + extra)
        assert r.exit_code == 2, r.output
        assert needle in r.output and "Traceback" not in r.output


def test_ppl_only_flags_need_ppl(tmp_path) -> None:
    r = CliRunner().invoke(main, ["quant-report", str(tmp_path / "nope"), "--schemes", "q0f32"])
    assert r.exit_code == 2 and "--schemes needs --ppl" in r.output
