"""A first run of a checkpoint converts its weights in a child process while the library compiles
(`weights.converting_alongside` in `load_engine`), and an error on either side still reaches the caller."""

from __future__ import annotations

import errno
import signal
import time

import numpy as np
import pytest
from tiny import make_tiny_checkpoint

import toolkit.compile.compile_model as cm
from toolkit.checkpoint import open_model
from toolkit.errors import UserError
from toolkit.quantization import get_scheme
from toolkit.runtime import convert_process, weight_cache
from toolkit.runtime.engine import load_engine


@pytest.fixture
def ckpt(tmp_path):
    # a new checkpoint path: its conversion is not in the session cache (the library, keyed by config, may be)
    return make_tiny_checkpoint(tmp_path / "ckpt", "mini-4k")


@pytest.fixture
def compile_pending(monkeypatch):
    """`load_engine` sees no compiled library, as on a real first run (the session cache may hold it)."""
    monkeypatch.setattr(cm, "is_compiled", lambda *args: False)


@pytest.fixture
def children(monkeypatch):
    """The conversion processes started meanwhile."""
    started = []
    real_init = convert_process.ConversionProcess.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        started.append(self._proc)

    monkeypatch.setattr(convert_process.ConversionProcess, "__init__", init)
    return started


def test_weights_convert_while_the_library_compiles_and_in_line_once_it_is(ckpt, monkeypatch, children):
    """The compile step waits (up to 60 s) for the converted weights to appear: only a conversion running
    alongside it can end that wait; a conversion after the compile would leave it timing out. With the
    library compiled (the first load's), new weights of the same config convert in this process."""
    real = cm.compiled_for
    folder = weight_cache.converted_weights_dir(open_model(ckpt), "q4f16_1")
    seen = []

    def compiled_for(*args, **kwargs):
        deadline = time.monotonic() + 60
        while not (folder / "tensor-cache.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append((folder / "tensor-cache.json").is_file())
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(cm, "is_compiled", lambda *args: False)  # as on a real first run
        m.setattr(cm, "compiled_for", compiled_for)
        engine, _ = load_engine(str(ckpt), quantization="q4f16_1", threads=1)
    assert seen == [True]
    assert len(children) == 1 and children[0].returncode == 0
    assert len(engine.params) == len(engine.compiled.manifest["params"])

    other = make_tiny_checkpoint(ckpt.parent / "other", "mini-4k", seed=1)  # same config, new weights
    load_engine(str(other), quantization="q4f16_1", threads=1)
    assert len(children) == 1
    assert (weight_cache.converted_weights_dir(open_model(other), "q4f16_1") / "tensor-cache.json").is_file()


def _poison(ckpt, name="model.layers.0.mlp.down_proj.weight"):
    from safetensors.numpy import load_file, save_file

    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    tensors[name][0, 0] = np.nan
    save_file(tensors, f, metadata={"format": "pt"})
    return name


def test_a_conversion_error_reaches_the_caller_as_one_error(ckpt, monkeypatch, compile_pending, children):
    """The conversion runs in a child process: its UserError comes back as the same message."""
    name = _poison(ckpt)
    monkeypatch.setattr(cm, "compiled_for", lambda *args: None)  # the weights fail first
    with pytest.raises(UserError, match=rf"tensor {name} contains NaN or inf values"):
        load_engine(str(ckpt), quantization="q4f16_1", threads=1)
    assert len(children) == 1 and children[0].returncode == 1


def test_a_compile_error_wins_and_stops_the_conversion(ckpt, monkeypatch, compile_pending, children):
    def broken(*args, **kwargs):
        raise UserError("cannot compile this model")

    monkeypatch.setattr(cm, "compiled_for", broken)
    with pytest.raises(UserError, match="cannot compile this model"):
        load_engine(str(ckpt), quantization="q4f16_1", threads=1)
    assert len(children) == 1 and children[0].poll() is not None  # ended, not left converting


def test_an_os_error_of_the_child_comes_back_as_one(ckpt, tmp_path, monkeypatch):
    """A cache root under a regular file: the child's mkdir fails with ENOTDIR, and the parent raises that
    OSError (the CLI prints it as one line with the file)."""
    source = open_model(ckpt)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("PHI3_TOOLKIT_CACHE", str(tmp_path / "a-file" / "cache"))
    child = convert_process.ConversionProcess(source, "q4f16_1")
    with pytest.raises(OSError) as info:
        child.wait()
    assert info.value.errno == errno.ENOTDIR and "a-file" in info.value.filename


def test_a_killed_child_is_one_error_and_the_next_run_converts(ckpt):
    source = open_model(ckpt)
    child = convert_process.ConversionProcess(source, "q4f16_1")
    child._proc.send_signal(signal.SIGKILL)
    with pytest.raises(UserError, match="killed by SIGKILL"):
        child.wait()
    weight_cache.ensure_converted(source, get_scheme("q4f16_1"))
    assert (weight_cache.converted_weights_dir(source, "q4f16_1") / "tensor-cache.json").is_file()


def test_without_a_python_to_start_the_weights_convert_after_the_compile(ckpt, monkeypatch, compile_pending):
    """A frozen app or an embedding host (`sys.executable` empty) starts no child; the load still converts."""
    import sys

    monkeypatch.setattr(sys, "executable", "")
    monkeypatch.setattr(
        convert_process.ConversionProcess, "__init__", lambda *a: pytest.fail("child started")
    )
    engine, _ = load_engine(str(ckpt), quantization="q4f16_1", threads=1)
    assert len(engine.params) == len(engine.compiled.manifest["params"])
