"""`phi3 compile --cuda-graph`: decode / verify captured as CUDA graphs (compile/attach_cuda_graph.py).

No GPU here: the test checks the executable's bytecode. Each forward function that takes a graph replays
`layers + 1` captured runs (the KV cache's attention builtin, one per layer, can't be captured), decode keyed
by its batch size, and MLC's `cuda_graph_alloc_init` hook is exported. Running it needs a CUDA device
(examples/cuda_parity.py --cuda-graph)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from tiny import make_tiny_checkpoint

from toolkit.checkpoint import open_model
from toolkit.cli import main
from toolkit.compile import compile_model as cm
from toolkit.compile import pipeline


@pytest.fixture(scope="module")
def graph_build(tmp_path_factory):
    d = tmp_path_factory.mktemp("cg")
    src = open_model(make_tiny_checkpoint(d / "ckpt", "mini-4k"))
    captured = {}
    real_build = pipeline.build

    def spy(*a, **kw):  # keep the executable: its bytecode is what the VM will run
        ex, sched = real_build(*a, **kw)
        captured["ex"] = ex
        return ex, sched

    pipeline.build = spy
    try:
        compiled = cm.compile_model(src.config, "q4f16_1", "cuda-sm90", d / "lib", cuda_graph=True)
    finally:
        pipeline.build = real_build
    return src.config, compiled, captured["ex"].as_python()


def _body(text: str, name: str) -> str:
    start = text.index(f'ib.function("{name}"')
    nxt = text.find("ib.function(", start + 1)
    return text[start : nxt if nxt > 0 else len(text)]


@pytest.mark.slow  # a whole CUDA library build (nvcc over every kernel)
def test_forward_functions_replay_captured_graphs(graph_build):
    cfg, compiled, text = graph_build
    assert compiled.manifest["cuda_graph"] is True
    assert compiled.manifest["decode_attention"] == "ours"  # cuda-sm90's kernel, graphs as before
    assert "cuda_graph_alloc_init" in compiled.manifest["vm_functions"]
    for fn in ("decode", "batch_decode", "batch_verify"):
        body = _body(text, fn)
        assert body.count("vm.builtin.cuda_graph.run_or_capture") == cfg.num_hidden_layers + 1, fn
    # the fused steps (compile/attach_decode_sample.py): the forward's graphs, and one more for the sampler's
    # running sums; the kernels that read the ids or the draws' params (call arguments) launch outside
    for fn in ("decode_and_sample", "batch_decode_and_sample"):
        body = _body(text, fn)
        assert body.count("vm.builtin.cuda_graph.run_or_capture") == cfg.num_hidden_layers + 2, fn
    # prefill (one chunk of any length) keeps plain launches
    assert "run_or_capture" not in _body(text, "prefill")
    assert re.search(r"cuda_graph_capture\d*", text)


def test_cuda_graph_flag_needs_a_cuda_preset(tmp_path):
    r = CliRunner().invoke(main, ["compile", "--device", "vulkan", "--cuda-graph", "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "--cuda-graph needs a CUDA preset" in r.output
    assert not (tmp_path / "o").exists()


def test_the_gpu_kit_loads_where_tvm_ffi_has_no_package_metadata(monkeypatch):
    """On the GPU machine (and in `gpu_kit.py check`) tvm_ffi is the kit's copy, without metadata: the
    script must get past its imports there, and ask for tvm_ffi's version only when preparing the kit."""
    import importlib.util
    from importlib import metadata
    from pathlib import Path

    def no_metadata(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", no_metadata)
    path = Path(__file__).resolve().parent.parent / "examples" / "gpu_kit.py"
    spec = importlib.util.spec_from_file_location("gpu_kit_without_ffi_metadata", path)
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    assert callable(kit.run) and callable(kit.check_run)
    with pytest.raises(metadata.PackageNotFoundError):
        kit._ffi_requirement()
