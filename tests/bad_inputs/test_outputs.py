"""Output collisions: no command may write over its input, into a folder it did not write, or leave a partial
output. Every refusal happens before any model work, so these cases are fast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bad_util import assert_clean_failure, run, snapshot


@pytest.fixture
def work(tmp_path, ckpt) -> Path:
    """A private copy of the tiny checkpoint (cases point outputs into it), a user folder and a user file."""
    shutil.copytree(ckpt, tmp_path / "ckpt")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    (tmp_path / "photo.png").write_text("not really a png")
    (tmp_path / "data.txt").write_text("precious")
    (tmp_path / "mine2").mkdir()  # another model's files, where a package's tokenizer files would go
    (tmp_path / "mine2" / "config.json").write_text('{"model_type": "other"}')
    return tmp_path


def _earlier_output(folder: Path, marker: str, extra: str | None = "user-file.txt") -> Path:
    """Something that looks like an earlier output of ours (its marker file) holding a file the user added."""
    folder.mkdir(parents=True)
    (folder / marker).write_text(json.dumps({"files": {}}))
    if extra:
        (folder / extra).write_text("added by the user")
    return folder


COLLISIONS = [
    # (id, command with {w} = work folder, what the message names)
    ("compile_into_input", ["compile", "{w}/ckpt", "-o", "{w}/ckpt"], "is the input"),
    ("compile_inside_input", ["compile", "{w}/ckpt", "-o", "{w}/ckpt/build"], "inside the input"),
    ("compile_over_parent", ["compile", "{w}/ckpt", "-o", "{w}"], "contains the input"),
    ("compile_into_user_folder", ["compile", "{w}/ckpt", "-o", "{w}/mine"], "not empty"),
    ("compile_over_a_file", ["compile", "{w}/ckpt", "-o", "{w}/data.txt"], "data.txt"),
    (
        "compile_earlier_output_plus_user_file",
        ["compile", "{w}/ckpt", "-o", "{w}/prev-build"],
        "user-file.txt",
    ),
    ("convert_into_input", ["convert", "{w}/ckpt", "-o", "{w}/ckpt"], "is the input"),
    ("convert_inside_input", ["convert", "{w}/ckpt", "-o", "{w}/ckpt/q4"], "inside the input"),
    ("convert_over_parent", ["convert", "{w}/ckpt", "-o", "{w}"], "contains the input"),
    ("convert_into_user_folder", ["convert", "{w}/ckpt", "-o", "{w}/mine"], "not empty"),
    ("convert_over_a_file", ["convert", "{w}/ckpt", "-o", "{w}/data.txt"], "data.txt"),
    (
        "convert_earlier_output_plus_user_file",
        ["convert", "{w}/ckpt", "-o", "{w}/prev-conv"],
        "user-file.txt",
    ),
    (
        "convert_via_config_json_path",
        ["convert", "{w}/ckpt/config.json", "-o", "{w}/ckpt/out"],
        "inside the input",
    ),
    (
        "export_gguf_over_input_file",
        ["export-gguf", "{w}/ckpt/model.safetensors", "-o", "{w}/ckpt/x.gguf"],
        "inside",
    ),
    (
        "export_gguf_inside_input",
        ["export-gguf", "{w}/ckpt", "-o", "{w}/ckpt/model.gguf"],
        "inside the input",
    ),
    ("export_gguf_over_user_file", ["export-gguf", "{w}/ckpt", "-o", "{w}/data.txt"], "not a GGUF"),
    ("export_gguf_into_a_folder", ["export-gguf", "{w}/ckpt", "-o", "{w}/mine"], "mine"),
    ("export_gguf_missing_folder", ["export-gguf", "{w}/ckpt", "-o", "{w}/nope/x.gguf"], "does not exist"),
    ("export_coreml_over_input", ["export-coreml", "{w}/ckpt", "-o", "{w}/ckpt"], "is the input"),
    ("export_coreml_inside_input", ["export-coreml", "{w}/ckpt", "-o", "{w}/ckpt/x.mlpackage"], "inside"),
    ("export_coreml_into_user_folder", ["export-coreml", "{w}/ckpt", "-o", "{w}/mine"], "not empty"),
    ("export_coreml_over_a_file", ["export-coreml", "{w}/ckpt", "-o", "{w}/data.txt"], "data.txt"),
    (
        "export_coreml_next_to_user_config",
        ["export-coreml", "{w}/ckpt", "-o", "{w}/mine2/x.mlpackage"],
        "config.json",
    ),
    (
        "export_coreml_into_converted_folder",
        ["export-coreml", "{w}/ckpt", "-o", "{w}/prev-conv/x.mlpackage"],
        "convert",
    ),
    # a folder output where nothing can be made (under a file here; a read-only mount or /proc alike): refused
    # before the model is read, not after minutes of converting (export-coreml wrote only at the end)
    ("compile_under_a_file", ["compile", "{w}/ckpt", "-o", "{w}/data.txt/build"], "not a folder"),
    ("convert_under_a_file", ["convert", "{w}/ckpt", "-o", "{w}/data.txt/q4"], "not a folder"),
    # /proc refuses new folders with ENOENT: the line says that was making a folder, not a missing input
    ("compile_in_proc", ["compile", "{w}/ckpt", "-o", "/proc/phi3-x/build"], "making a folder in it"),
    (
        "export_coreml_under_a_file",
        ["export-coreml", "{w}/ckpt", "-o", "{w}/data.txt/x.mlpackage"],
        "not a folder",
    ),
    (
        "package_under_a_file",
        ["package", "{w}/ckpt", "--device", "iphone", "-o", "{w}/data.txt/p"],
        "not a folder",
    ),
    ("quant_report_missing_folder", ["quant-report", "{w}/ckpt", "-o", "{w}/nope/r.png"], "does not exist"),
    ("quant_report_over_user_file", ["quant-report", "{w}/ckpt", "-o", "{w}/photo.png"], "not a PNG"),
    ("quant_report_into_input", ["quant-report", "{w}/ckpt", "-o", "{w}/ckpt/r.png"], "inside the input"),
    ("quant_report_into_a_folder", ["quant-report", "{w}/ckpt", "-o", "{w}/mine"], "mine"),
    ("bench_plot_missing_folder", ["bench", "{w}/ckpt", "--plot", "{w}/nope/b.png"], "does not exist"),
    ("bench_plot_over_user_file", ["bench", "{w}/ckpt", "--plot", "{w}/data.txt"], "not a PNG"),
    ("verify_json_inside_build", ["verify", "{w}/prev-build", "--json", "{w}/prev-build/r.json"], "inside"),
    ("verify_json_over_user_file", ["verify", "{w}/prev-build", "--json", "{w}/data.txt"], "data.txt"),
]


@pytest.mark.parametrize("args, says", [(a, s) for _, a, s in COLLISIONS], ids=[i for i, _, _ in COLLISIONS])
def test_output_collision_is_refused_and_nothing_changes(work, args, says) -> None:
    _earlier_output(work / "prev-build", "manifest.json")
    _earlier_output(work / "prev-conv", "mlc-chat-config.json")
    before = snapshot(work)
    line = assert_clean_failure(run([a.format(w=work) for a in args]), says, before, work)
    assert "error:" in line


def test_output_through_a_symlink_to_the_input(work) -> None:
    (work / "link").symlink_to(work / "ckpt")
    before = snapshot(work)
    assert_clean_failure(run(["compile", work / "ckpt", "-o", work / "link"]), "is the input", before, work)


def test_output_dangling_symlink(work) -> None:
    (work / "dangling").symlink_to(work / "gone")
    before = snapshot(work)
    assert_clean_failure(run(["convert", work / "ckpt", "-o", work / "dangling"]), "symlink", before, work)


def test_export_gguf_over_its_own_gguf_input(work) -> None:
    gguf = work / "m.gguf"
    r = run(["export-gguf", work / "ckpt", "-o", gguf, "--type", "f16"])
    assert r.exit_code == 0, r.output
    before = snapshot(work)
    assert_clean_failure(run(["export-gguf", gguf, "-o", gguf]), "is the input", before, work)


def test_convert_over_earlier_conversion_keeps_user_files(work) -> None:
    """Replacing our own earlier output is fine; a file the user put into it stops the run."""
    out = work / "q"
    args = ["convert", work / "ckpt", "-o", out, "-q", "q0f32", "--no-progress"]
    assert run(args).exit_code == 0
    assert run(args).exit_code == 0  # our own output: replaced
    (out / "README.md").write_text("my notes about this conversion")
    before = snapshot(work)
    assert_clean_failure(run(args), "README.md", before, work)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs (Linux only)")
@pytest.mark.parametrize(
    "args",
    [
        ["export-gguf", "{w}/ckpt", "-o", "/sys/kernel/x.gguf"],
        ["quant-report", "{w}/ckpt", "-o", "/sys/kernel/r.png"],
    ],
)
def test_file_output_in_a_folder_that_takes_no_new_files(work, args) -> None:
    # sysfs: its permission bits let root write, the file system refuses; checked by trying, before any work
    before = snapshot(work)
    line = assert_clean_failure(run([a.format(w=work) for a in args]), "/sys/kernel", before, work)
    assert "cannot be written" in line, line
