"""A first run of a checkpoint converts its weights while the library compiles (`weights.converting_alongside`
in `load_engine`), and an error on either side still reaches the caller."""

from __future__ import annotations

import time

import pytest
from tiny import make_tiny_checkpoint

import toolkit.compile.compile_model as cm
from toolkit.checkpoint import open_model
from toolkit.errors import UserError
from toolkit.runtime import weights
from toolkit.runtime.engine import load_engine


@pytest.fixture
def ckpt(tmp_path):
    # a new checkpoint path: its conversion is not in the session cache (the library, keyed by config, may be)
    return make_tiny_checkpoint(tmp_path / "ckpt", "mini-4k")


def test_weights_convert_while_the_library_compiles(ckpt, monkeypatch):
    """The compile step waits (up to 60 s) for the converted weights to appear: only a conversion running
    alongside it can end that wait; a conversion after the compile would leave it timing out."""
    real = cm.compiled_for
    folder = weights.converted_weights_dir(open_model(ckpt), "q4f16_1")
    seen = []

    def compiled_for(*args, **kwargs):
        deadline = time.monotonic() + 60
        while not (folder / "tensor-cache.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append((folder / "tensor-cache.json").is_file())
        return real(*args, **kwargs)

    monkeypatch.setattr(cm, "compiled_for", compiled_for)
    engine, _ = load_engine(str(ckpt), quantization="q4f16_1", threads=1)
    assert seen == [True]
    assert len(engine.params) == len(engine.compiled.manifest["params"])


def test_a_conversion_error_reaches_the_caller(ckpt, monkeypatch):
    def broken(source, scheme, folder):
        raise UserError("cannot convert these weights", source.path)

    monkeypatch.setattr(weights, "_convert_into_cache", broken)
    with pytest.raises(UserError, match="cannot convert these weights"):
        load_engine(str(ckpt), quantization="q4f16_1", threads=1)


def test_a_compile_error_wins_over_the_conversion(ckpt, monkeypatch):
    def broken(*args, **kwargs):
        raise UserError("cannot compile this model")

    monkeypatch.setattr(cm, "compiled_for", broken)
    with pytest.raises(UserError, match="cannot compile this model"):
        load_engine(str(ckpt), quantization="q4f16_1", threads=1)
