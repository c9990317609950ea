"""Faults: concurrent writers, killed runs, stale temp folders, damaged cache entries, a full disk, closed
stdin, prompts longer than the context window, `verify` that verified nothing, an unreachable RPC tracker
and MetaSchedule's logging crash. No model is compiled: the heavy step is replaced where the case is about
what happens around it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from bad_util import assert_clean_failure, run, snapshot

from toolkit.errors import UserError


def _env() -> dict[str, str]:
    # read at call time: the session fixture sets PHI3_TOOLKIT_CACHE (where the lock files live)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _hold_lock(target: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the writer lock of `target` (prints 'locked' once it has it)."""
    code = (
        "import sys, time; from toolkit.locks import output_lock\n"
        f"with output_lock({str(target)!r}):\n"
        "    print('locked', flush=True); time.sleep(float(sys.argv[1]))\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(seconds)], stdout=subprocess.PIPE, env=_env(), text=True
    )
    assert p.stdout.readline().strip() == "locked"
    return p


# -- locks and temp folders ----------------------------------------------------------------------------
def test_second_writer_times_out_with_one_line(tmp_path) -> None:
    from toolkit.locks import output_lock

    holder = _hold_lock(tmp_path / "out", 30)
    try:
        with (
            pytest.raises(UserError, match="still writing it after 0 s"),
            output_lock(tmp_path / "out", timeout=0.3),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_second_writer_waits_with_a_message_then_proceeds(tmp_path, capfd) -> None:
    from toolkit.locks import output_lock

    holder = _hold_lock(tmp_path / "out", 1.0)
    t0 = time.monotonic()
    with output_lock(tmp_path / "out", timeout=30):
        waited = time.monotonic() - t0
    holder.wait()
    assert waited > 0.3
    assert "another phi3 process is writing it; waiting" in capfd.readouterr().err


def test_two_tuners_of_one_machine_wait_and_merge_their_records(tmp_path, capfd) -> None:
    """`phi3 tune` writes this machine's MetaSchedule set and knob record by read-merge-replace: a second
    tuner waits for the first's lock, then merges over what it wrote (nothing is lost)."""
    from toolkit.compile.knobs import DEFAULTS, record_path
    from toolkit.compile.tuned_records import device_fingerprint, load_index, records_dir
    from toolkit.targets import load_preset
    from toolkit.tune.knob_search import SearchResult, write_knob_record
    from toolkit.tune.records import write_records
    from toolkit.tune.tuner import KernelResult

    preset = load_preset("host")
    fp = device_fingerprint(preset)
    folder = records_dir(preset, tmp_path, fp)
    write_records(preset, [KernelResult("rms_norm", 1, 1, 4, 1.0, 1.1, False, func_hash="a")], fp, tmp_path)
    holder = _hold_lock(folder, 1.0)
    t0 = time.monotonic()
    write_records(preset, [KernelResult("softmax", 1, 1, 4, 1.0, 1.1, False, func_hash="b")], fp, tmp_path)
    assert time.monotonic() - t0 > 0.3
    holder.wait()
    assert [k["name"] for k in load_index(folder)["kernels"]] == ["rms_norm", "softmax"]
    assert "another phi3 process is writing it; waiting" in capfd.readouterr().err

    gemv = dict(DEFAULTS["q4_gemv"])
    write_knob_record(preset, [SearchResult("q4_gemv", "64x64", gemv, {**gemv, "tile": 64}, True)], tmp_path)
    holder = _hold_lock(record_path(preset, fp, tmp_path), 1.0)
    t0 = time.monotonic()
    write_knob_record(preset, [SearchResult("q4_gemv", "32x32", gemv, {**gemv, "tile": 8}, True)], tmp_path)
    assert time.monotonic() - t0 > 0.3
    holder.wait()
    kernels = json.loads(record_path(preset, fp, tmp_path).read_text())["kernels"]["q4_gemv"]
    assert kernels["64x64"]["tile"] == 64 and kernels["32x32"]["tile"] == 8


def test_another_thread_of_this_process_waits_like_another_process(tmp_path) -> None:
    """Two threads of one process (an app loading two engines at once) that lock the same folder: the second
    waits for the first, not slipping in because this process holds the lock."""
    from toolkit.locks import output_lock

    events: list[str] = []
    entered = threading.Event()

    def writer() -> None:
        with output_lock(tmp_path / "out"):
            events.append("t1 in")
            entered.set()
            time.sleep(0.5)
            events.append("t1 out")

    t = threading.Thread(target=writer)
    t.start()
    assert entered.wait(30)
    with output_lock(tmp_path / "out", timeout=30):
        events.append("main in")
    t.join()
    assert events == ["t1 in", "t1 out", "main in"]


def test_killed_writer_does_not_block(tmp_path) -> None:
    from toolkit.locks import output_lock

    holder = _hold_lock(tmp_path / "out", 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    with output_lock(tmp_path / "out", timeout=5):  # the kernel dropped the dead process's lock
        pass
    assert time.monotonic() - t0 < 2


def test_stale_temps_of_dead_and_reused_pids_are_cleaned(tmp_path) -> None:
    from toolkit.locks import output_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a reused pid
    try:
        stale = [
            tmp_path / f"out.tmp-{dead.pid}",
            tmp_path / f"out.tmp-{alive.pid}",
            tmp_path / f"out.old-{dead.pid}",
            tmp_path / f".out.partial-{dead.pid}",
        ]
        for s in stale:
            s.mkdir()
            (s / "half-written.bin").write_bytes(b"\0" * 10)
        (tmp_path / "out.tmp-notes").mkdir()  # not one of our names: kept
        with output_lock(tmp_path / "out", timeout=5):
            pass
        assert not any(s.exists() for s in stale)
        assert (tmp_path / "out.tmp-notes").is_dir()
    finally:
        alive.kill()
        alive.wait()


def test_convert_killed_midway_leaves_nothing_and_the_rerun_works(tmp_path, ckpt) -> None:
    out = tmp_path / "q"
    code = (
        "import sys, time\n"
        "import toolkit.checkpoint.mlc_format.tensor_cache as tc\n"
        "real = tc.TensorCacheWriter.add\n"
        "def slow(self, n, a):\n"
        "    real(self, n, a); print('writing', flush=True); time.sleep(30)\n"
        "tc.TensorCacheWriter.add = slow\n"
        "from toolkit.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["convert", str(ckpt), "-o", str(out), "-q", "q0f32", "--no-progress"]
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=_env(), text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists() and list(tmp_path.glob("q.tmp-*"))  # only the dead run's temp folder
    r = run(args)
    assert r.exit_code == 0, r.output
    assert sorted(x.name for x in tmp_path.iterdir()) == ["q"]


# -- Ctrl-C --------------------------------------------------------------------------------------------
# A shell starts a background job (`scripts/test &`, nohup) with SIGINT ignored, and Python keeps that: these
# tests give themselves, and their child, the handler a terminal's `phi3` has.
@pytest.fixture
def terminal_sigint():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # a first run in a fresh cache: ~10-17 s; in-process tests below cover the CLI's handling
def test_ctrl_c_during_a_first_run_is_one_line_and_leaves_no_process(ckpt, tmp_path) -> None:
    """SIGINT to the command's process group (what a terminal's Ctrl-C sends) while it compiles and converts:
    exit 130 and `error: interrupted`, not a traceback (TVM hands a KeyboardInterrupt raised inside its
    callbacks back as a bare RuntimeError), and the command stops its conversion process."""
    env = dict(os.environ, PHI3_TOOLKIT_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "toolkit.cli", "generate", str(ckpt), "--prompt", "hi", "--max-tokens", "2"]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    deadline, writing = time.monotonic() + 60, False
    while not writing and time.monotonic() < deadline:
        time.sleep(0.02)
        writing = any((tmp_path / "cache" / "weights").glob("*.tmp-*"))
    assert writing and proc.poll() is None  # the conversion process is writing (its own group: no Ctrl-C)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    # the last words, and the only error (a progress bar of the conversion may end without a newline)
    assert err.rstrip().endswith("error: interrupted") and err.count("error:") == 1, err
    time.sleep(0.2)
    alive = subprocess.run(["pgrep", "-f", f"convert_process {ckpt}"], capture_output=True, text=True)
    assert alive.stdout == ""


def test_ctrl_c_leaves_error_interrupted_as_the_last_line_despite_tvm_destructors() -> None:
    """A Ctrl-C in the middle of a graph build leaves TVM objects half-built; their destructors, run as the
    process exits, logged "BlockBuilder destroyed with remaining blocks!" after our one line (seen in the
    first-run Ctrl-C test above when the signal landed in the compile). The `phi3` program sends what its
    exit prints after an interrupted command's line nowhere."""
    code = (
        "import os, signal, sys\n"
        "from tvm import relax\n"
        "import toolkit.cli.cmd_targets as cmd\n"
        "keep = []\n"
        "def build(*a, **k):\n"
        "    keep.append(relax.BlockBuilder())\n"
        "    keep[0]._begin_dataflow_block()\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "cmd.list_presets = build\n"
        "sys.argv = ['phi3', 'targets']\n"
        "from toolkit.cli import run\n"
        "run()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, preexec_fn=_default_sigint
    )
    assert proc.returncode == 130 and proc.stderr == "error: interrupted\n", proc.stderr


@pytest.mark.parametrize("then", ["swallows it", "raises RuntimeError"])
def test_ctrl_c_that_a_library_swallows_or_rewraps_still_ends_the_command_as_one_line(
    monkeypatch, then, terminal_sigint
):
    """TVM hands a KeyboardInterrupt raised in its callbacks back as a bare RuntimeError, and code that takes
    any error for "does not apply" may swallow that: either way the command ends, interrupted, in one line."""
    import toolkit.cli.cmd_targets as cmd

    real = cmd.list_presets

    def library_call():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises in here
        except KeyboardInterrupt:
            if then == "raises RuntimeError":
                raise RuntimeError from None
        return real()

    monkeypatch.setattr(cmd, "list_presets", library_call)
    r = run(["targets"])
    assert r.exit_code == 130 and r.stderr.strip() == "error: interrupted", r.output


def test_an_earlier_commands_ctrl_c_does_not_end_a_later_one_where_sigint_is_ignored(terminal_sigint) -> None:
    """In one process (a test runner started as a background job, SIGINT ignored; an app using the CLI in
    process) a command after an interrupted one ran with the old "fired" flag: it ended as "interrupted"."""
    from toolkit import interrupts

    with pytest.raises(KeyboardInterrupt), interrupts.watching():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler raises in here
    assert interrupts.fired()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the fixture puts back what was there
    r = run(["targets"])
    assert r.exit_code == 0 and "interrupted" not in r.output, r.output


EXIT_TIME_CTRL_C = """
import atexit, os, signal, sys, time
import toolkit.cli as cli

presses, sleep = int(sys.argv[1]), float(sys.argv[2])
sys.argv[1:] = sys.argv[3:]
real = cli._Group.invoke


def cleanup():
    for _ in range(presses):
        os.kill(os.getpid(), signal.SIGINT)
    time.sleep(sleep)
    print("cleanup went on", file=sys.stderr)


def invoke(self, ctx):
    result = real(self, ctx)
    atexit.register(cleanup)  # registered after the command: atexit runs it first, as exit-time cleanup
    return result


cli._Group.invoke = invoke
cli.run()
"""


@pytest.mark.parametrize("presses", [0, 1, 2])
def test_ctrl_c_while_the_process_exits_is_one_line_and_exit_130(presses) -> None:
    """After the command, during thread joins and atexit cleanup: one Ctrl-C lets the cleanup finish, then
    exits 130 with one line (Python alone prints "Exception ignored" and a traceback, and exits 0); a second
    exits at once (the cleanup here would sleep 60 s: the timeout fails the test)."""
    sleep = "60" if presses == 2 else "0.2"
    cmd = [sys.executable, "-c", EXIT_TIME_CTRL_C, str(presses), sleep, "targets", "host"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, preexec_fn=_default_sigint)
    assert "host" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
    if presses == 0:
        assert proc.returncode == 0 and proc.stderr == "cleanup went on\n", proc.stderr
    elif presses == 1:
        assert proc.returncode == 130, proc.stderr
        assert proc.stderr == "cleanup went on\nerror: interrupted\n", proc.stderr
    else:
        assert proc.returncode == 130 and proc.stderr == "error: interrupted\n", proc.stderr


# -- caches that heal ----------------------------------------------------------------------------------
@pytest.fixture
def fake_compile(monkeypatch, tmp_path):
    """compile_model's output handling with the TVM build replaced by two small files (own cache)."""
    monkeypatch.setenv("PHI3_TOOLKIT_CACHE", str(tmp_path / "cache"))
    import toolkit.compile.compile_model as cm
    from toolkit.compile.artifacts import write_manifest

    calls = []

    def fake_build(cfg, quantization, preset, out_dir, **_options):
        from toolkit.targets import load_preset

        tmp = cm._temp_dir(out_dir)
        tmp.mkdir(parents=True)
        (tmp / "model.so").write_bytes(b"\x7fELF" + b"\0" * 100)
        extra = {"library": "model.so", "params": [], "dtype": "f32"}
        preset = load_preset(preset) if isinstance(preset, str) else preset
        manifest = write_manifest(tmp, preset, quantization, cfg, [], extra=extra)
        cm.replace_dir(tmp, out_dir)
        calls.append(out_dir)
        return cm.CompiledModel(out_dir, manifest)

    monkeypatch.setattr(cm, "_build_library", fake_build)
    return calls


def _tiny_cfg():
    from bad_util import TINY_CONFIG

    from toolkit.config import parse_hf_config

    return parse_hf_config(TINY_CONFIG, Path("config.json"))


DAMAGE = {
    "truncated_library": lambda d: (d / "model.so").write_bytes(b"\x7fELF"),
    "missing_library": lambda d: (d / "model.so").unlink(),
    "bad_manifest_json": lambda d: (d / "manifest.json").write_text("{"),
    "manifest_without_library": lambda d: (d / "manifest.json").write_text(json.dumps({"files": {}})),
    "no_manifest": lambda d: (d / "manifest.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE.values()), ids=list(DAMAGE))
def test_damaged_compiled_cache_entry_is_rebuilt_with_a_notice(fake_compile, capfd, damage) -> None:
    from toolkit.compile.compile_model import compiled_for

    cfg = _tiny_cfg()
    first = compiled_for(cfg, "q0f32", "host")
    damage(first.folder)
    again = compiled_for(cfg, "q0f32", "host")
    assert again.folder == first.folder and (again.folder / "model.so").stat().st_size == 104
    assert len(fake_compile) == 2
    err = capfd.readouterr().err
    if damage is not DAMAGE["no_manifest"]:
        assert "is damaged" in err and "rebuilding" in err


def _cached_weights_entry(ckpt, tmp_path):
    """(source, its weights cache folder freshly converted as the JIT path converts, a CompiledModel asking
    for every converted tensor by name, shape and dtype, as a compiled library would)."""
    from toolkit.checkpoint import open_model
    from toolkit.checkpoint.mlc_format import read_cache_json
    from toolkit.compile.compile_model import CompiledModel
    from toolkit.convert.converter import convert
    from toolkit.runtime import weight_cache

    src = open_model(ckpt)
    folder = weight_cache.converted_weights_dir(src, "q4f16_1")
    shutil.rmtree(folder, ignore_errors=True)
    convert(src, "q4f16_1", folder, clip=weight_cache.JIT_CLIP, progress=False)  # as a rebuild will
    params = [
        {"name": p["name"], "shape": p["shape"], "dtype": p["dtype"]}
        for rec in read_cache_json(folder)["records"]
        for p in rec["records"]
    ]
    return src, folder, CompiledModel(tmp_path, {"quantization": "q4f16_1", "params": params})


def test_damaged_converted_weights_cache_is_rebuilt_with_a_notice(ckpt, tmp_path, capfd) -> None:
    import tvm

    from toolkit.runtime.weights import load_params

    src, folder, compiled = _cached_weights_entry(ckpt, tmp_path)
    shard = sorted(folder.glob("params_shard_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated
    got = load_params(src, compiled, tvm.cpu())
    assert len(got) == len(compiled.manifest["params"])
    assert "cached weights" in capfd.readouterr().err
    assert shard.stat().st_size > 7


def test_cached_weights_are_hashed_once_then_again_when_a_shard_changes(ckpt, tmp_path, capfd, monkeypatch):
    """The md5 of a cache entry's shards is checked on its first load; later loads trust shards whose
    size, mtime and inode are unchanged, and a shard changed in place (a flipped byte) is hashed again,
    found damaged and rebuilt."""
    import tvm

    import toolkit.runtime.weights as weights

    src, folder, compiled = _cached_weights_entry(ckpt, tmp_path)
    hashed = []
    real = weights.verify_tensor_cache
    monkeypatch.setattr(weights, "verify_tensor_cache", lambda d: hashed.append(d) or real(d))
    first = [t.numpy() for t in weights.load_params(src, compiled, tvm.cpu())]
    weights.load_params(src, compiled, tvm.cpu())
    assert len(hashed) == 1  # the second load trusted the unchanged shards
    shard = sorted(folder.glob("params_shard_*.bin"))[0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(shard, "r+b") as f:  # in place: same inode and size
        f.write(data)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = [t.numpy() for t in weights.load_params(src, compiled, tvm.cpu())]
    assert len(hashed) == 3  # hashed again: damaged; rebuilt and hashed once more
    assert "cached weights" in capfd.readouterr().err
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_a_first_run_conversion_is_not_hashed_again_on_its_first_load(ckpt, tmp_path, monkeypatch):
    """The conversion computed the md5 sums from the bytes it wrote, and stamps the entry: its first load
    hashes nothing, and a shard truncated afterwards is still caught (its size changed) and rebuilt."""
    import tvm

    import toolkit.runtime.weights as weights
    from toolkit.quantization import get_scheme
    from toolkit.runtime import weight_cache

    src, folder, compiled = _cached_weights_entry(ckpt, tmp_path)
    shutil.rmtree(folder)
    weight_cache.ensure_converted(src, get_scheme("q4f16_1"))
    hashed = []
    real = weights.verify_tensor_cache
    monkeypatch.setattr(weights, "verify_tensor_cache", lambda d: hashed.append(d) or real(d))
    weights.load_params(src, compiled, tvm.cpu())
    assert hashed == []
    shard = sorted(folder.glob("params_shard_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    got = weights.load_params(src, compiled, tvm.cpu())
    assert len(hashed) == 2 and len(got) == len(compiled.manifest["params"])  # damaged, rebuilt, hashed


def test_cached_weights_load_when_their_stamp_cannot_be_written(ckpt, tmp_path, monkeypatch):
    """The stamp of verified shards is a shortcut: a full disk (or a cache we may only read) while writing it
    leaves no stamp and no temp file, and the weights still load."""
    import errno
    from pathlib import Path

    import tvm

    import toolkit.runtime.weights as weights
    from toolkit.runtime import weight_cache

    src, folder, compiled = _cached_weights_entry(ckpt, tmp_path)
    real = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith(weight_cache.VERIFIED_STAMP):
            real(self, "")  # the temp file exists when the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    got = weights.load_params(src, compiled, tvm.cpu())
    assert len(got) == len(compiled.manifest["params"])
    assert not [p.name for p in folder.iterdir() if p.name.startswith(weight_cache.VERIFIED_STAMP)]


def test_weights_cache_key_follows_files_inside_the_checkpoint(tmp_path, ckpt) -> None:
    """Replacing model.safetensors (same size, same mtime) is a different model: a different cache entry."""
    from toolkit.checkpoint import open_model
    from toolkit.runtime.weight_cache import converted_weights_dir

    d = tmp_path / "m"
    shutil.copytree(ckpt, d)
    key1 = converted_weights_dir(open_model(d), "q4f16_1")
    f = d / "model.safetensors"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-4:] = b"\0\0\0\0"
    new = d / "model.safetensors.new"
    new.write_bytes(bytes(data))
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, f)
    os.utime(d, ns=(d.stat().st_atime_ns, d.stat().st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert converted_weights_dir(open_model(d), "q4f16_1") != key1


# -- full disk -----------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize(
    "cmd",
    [
        ["convert", "{m}", "-o", "{o}/q", "-q", "q0f32", "--no-progress"],
        ["export-gguf", "{m}", "-o", "{o}/m.gguf", "--type", "f16"],
    ],
    ids=["convert", "export-gguf"],
)
def test_full_disk_is_one_line_and_leaves_nothing(small_disk, ckpt, cmd) -> None:
    (small_disk / "keep.txt").write_text("already here")
    before = snapshot(small_disk)
    r = run([a.format(m=ckpt, o=small_disk) for a in cmd])
    assert_clean_failure(r, ["No space left", str(small_disk)], before, small_disk)


@pytest.mark.parametrize("where", ["file", "missing"])
def test_an_unusable_cache_folder_is_one_line_naming_the_variable(tmp_path, monkeypatch, where) -> None:
    """PHI3_TOOLKIT_CACHE on a file, or under a folder that cannot hold one: the user never named the path
    that failed, so the line says where it comes from."""
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    cache = blocker if where == "file" else Path("/proc/1/no-cache-here")
    monkeypatch.setenv("PHI3_TOOLKIT_CACHE", str(cache))
    before = snapshot(tmp_path)
    r = run(["generate", "--prompt", "hi", "--max-tokens", "1"])
    line = assert_clean_failure(r, f"PHI3_TOOLKIT_CACHE={cache}", before, tmp_path)
    assert line.startswith(f"error: {cache}"), line


@pytest.mark.parametrize("value", ["", "  "])
def test_a_blank_cache_variable_means_the_default_not_the_current_folder(monkeypatch, tmp_path, value):
    """`PHI3_TOOLKIT_CACHE= phi3 ...` put lib/, locks/ and weights/ into whatever folder the user was in."""
    from toolkit.paths import cache_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PHI3_TOOLKIT_CACHE", value)
    assert cache_root() == tmp_path / "home" / ".cache" / "phi3-toolkit"


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_a_bad_lock_timeout_is_one_line_when_a_lock_is_taken(monkeypatch, tmp_path, ckpt, value) -> None:
    """PHI3_TOOLKIT_LOCK_TIMEOUT was parsed at import: a typo was a traceback before any command ran."""
    monkeypatch.setenv("PHI3_TOOLKIT_LOCK_TIMEOUT", value)
    before = snapshot(tmp_path)
    r = run(["convert", ckpt, "-o", tmp_path / "out", "-q", "q0f32", "--no-progress"])
    assert_clean_failure(r, f"PHI3_TOOLKIT_LOCK_TIMEOUT={value!r}", before, tmp_path)


def test_a_blank_lock_timeout_is_the_default(monkeypatch) -> None:
    from toolkit.locks import DEFAULT_TIMEOUT_S, default_timeout_s

    monkeypatch.setenv("PHI3_TOOLKIT_LOCK_TIMEOUT", " ")
    assert default_timeout_s() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("PHI3_TOOLKIT_LOCK_TIMEOUT", "2.5")
    assert default_timeout_s() == 2.5


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_presets_folder_without_presets_is_one_line_naming_the_variable(tmp_path, where) -> None:
    """TOOLKIT_TARGETS_DIR is read at import, so each case is a fresh process: `targets` listed nothing
    through a traceback and every --device said "'host' is not one of ."."""
    folder = tmp_path / ("nowhere" if where == "missing" else "")
    env = {**_env(), "TOOLKIT_TARGETS_DIR": str(folder)}
    why = "is not a folder" if where == "missing" else "holds no presets"
    for args, code in ((["targets"], 1), (["generate", "--prompt", "hi"], 2)):
        cmd = [sys.executable, "-m", "toolkit.cli", *args]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == code and len(lines) == 1, p.stderr
        assert f"TOOLKIT_TARGETS_DIR={folder} {why}" in lines[0], lines
    blank = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "targets"],
        env={**_env(), "TOOLKIT_TARGETS_DIR": ""},
        capture_output=True,
        text=True,
    )
    assert blank.returncode == 0 and "host" in blank.stdout, blank.stderr


# -- runtime: stdin, prompts, context window ------------------------------------------------------------
def test_chat_with_stdin_closed_exits_cleanly(tmp_path) -> None:
    p = subprocess.run(
        f"{sys.executable} -m toolkit.cli chat /nonexistent-model <&-",
        shell=True,
        capture_output=True,
        env=_env(),
        cwd=tmp_path,
        timeout=60,
        text=True,
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr


class StubEngine:
    """What `phi3 generate` and `phi3 chat` need from an engine: a tiny context window, no model behind it."""

    def __init__(self, vocab: int, window: int = 40) -> None:
        self.vocab, self.context_window, self.seqs, self._n = vocab, window, {}, 0
        self.sampler = None  # logits come back to the host
        self.compiled = SimpleNamespace(manifest={"quantization": "q0f32"})

    def add_sequence(self) -> int:
        self._n += 1
        self.seqs[self._n] = SimpleNamespace(tokens=[], length=0)
        return self._n

    def remove_sequence(self, sid: int) -> None:
        del self.seqs[sid]

    def popn(self, sid: int, n: int) -> None:
        if n:
            del self.seqs[sid].tokens[-n:]

    def _logits(self) -> np.ndarray:
        z = np.zeros(self.vocab)
        z[ord("a")] = 10.0  # greedy: always the byte token "a"
        return z

    def prefill(self, sid: int, ids, draw=None) -> np.ndarray:
        from toolkit.runtime.engine import ContextFullError

        if len(self.seqs[sid].tokens) + len(ids) > self.context_window:
            raise ContextFullError("full")
        self.seqs[sid].tokens += list(ids)
        return self._logits()

    def decode(self, sid: int, tok: int, draw=None) -> np.ndarray:
        return self.prefill(sid, [tok])


@pytest.fixture
def stub_engine(monkeypatch, ckpt):
    from toolkit.checkpoint import open_model

    src = open_model(ckpt)
    eng = StubEngine(src.config.vocab_size)
    import toolkit.cli.options as opts

    mods = ("toolkit.cli.cmd_generate", "toolkit.cli.cmd_chat")
    for mod in mods:  # imported before any patch: one imported under the patch would keep the stub for good
        __import__(mod)
    monkeypatch.setattr(opts, "open_engine", lambda *a, **k: (eng, src))
    for mod in mods:
        monkeypatch.setattr(sys.modules[mod], "open_engine", lambda *a, **k: (eng, src))
    return eng


def test_generate_prompt_longer_than_the_context_window(tmp_path, stub_engine) -> None:
    before = snapshot(tmp_path)
    r = run(["generate", "-p", "word " * 200, "--temperature", "0", "--raw"])
    line = assert_clean_failure(r, "context window", before, tmp_path)
    assert "tokens" in line and r.stdout == ""


def test_chat_drops_a_message_that_does_not_fit(stub_engine) -> None:
    r = run(
        ["chat", "--temperature", "0", "--max-tokens", "2"], input="hi\n" + "long " * 200 + "\nhi again\n"
    )
    assert r.exit_code == 0, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "context window" in errors[0] and "dropped" in errors[0]
    assert len(r.stdout.splitlines()) == 2  # the turns before and after were answered


def test_chat_drops_a_line_of_bad_bytes_that_stdin_passed_on_as_surrogates(stub_engine, monkeypatch) -> None:
    """Under the C locale or Python's UTF-8 mode stdin decodes with surrogateescape: bytes that are not UTF-8
    arrive as lone surrogates, not as a UnicodeDecodeError. Such a line is one error and the chat goes on; it
    used to reach the tokenizer and end the chat in a TypeError traceback."""
    import toolkit.cli.cmd_chat as cmd_chat

    lines = iter([b"\xff\xfe hi".decode("utf-8", "surrogateescape"), "hi again"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(cmd_chat, "input", fake_input, raising=False)
    r = run(["chat", "--temperature", "0", "--max-tokens", "2"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "not valid UTF-8" in errors[0], r.stderr
    assert len(r.stdout.splitlines()) == 1  # the good line was answered


def test_ctrl_c_in_a_chat_stops_the_reply_and_the_chat_goes_on(
    stub_engine, monkeypatch, terminal_sigint
) -> None:
    """A real SIGINT during a reply (the engine's third step sends it to this process): the chat prints
    [stopped], answers the next message, and ends with exit 0, not as an interrupted command."""
    assert threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    steps = []
    real = stub_engine.decode

    def decode(sid, tok, draw=None):
        steps.append(tok)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(sid, tok)

    monkeypatch.setattr(stub_engine, "decode", decode)
    r = run(["chat", "--temperature", "0", "--max-tokens", "8"], input="hi\nhi again\n")
    assert r.exit_code == 0, r.output
    assert " [stopped]" in r.stderr and "interrupted" not in r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 2 and len(replies[0]) < len(replies[1]) == 8


def test_eval_text_file_problems(tmp_path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    before = snapshot(tmp_path)
    assert_clean_failure(
        run(["eval", "/nonexistent-model", "--ppl", tmp_path / "bad.txt"]), "bad.txt", before, tmp_path
    )
    assert_clean_failure(
        run(["eval", "/nonexistent-model", "--ppl", tmp_path / "nope.txt"]), "nope.txt", before, tmp_path
    )
    # a FIFO (or /dev/null) exists but is no text file: said so, not "no such file"
    (tmp_path / "pipe").mkdir()  # apart: reading a FIFO to snapshot it would block
    os.mkfifo(tmp_path / "pipe" / "fifo")
    r = run(["eval", "/nonexistent-model", "--ppl", tmp_path / "pipe" / "fifo"])
    assert_clean_failure(r, "fifo", {})
    assert "not a regular file" in r.stderr
    tmp_path = tmp_path / "files"
    tmp_path.mkdir()
    (tmp_path / "locked.txt").write_text("some text to score")
    with mock.patch("pathlib.Path.read_text", side_effect=PermissionError(13, "Permission denied")):
        r = run(["eval", "/nonexistent-model", "--ppl", tmp_path / "locked.txt"])
    assert_clean_failure(r, "locked.txt", snapshot(tmp_path), tmp_path)
    assert "cannot be read (Permission denied)" in r.stderr


def test_eval_of_a_text_with_fewer_than_two_tokens_is_one_line_before_a_compile(
    tmp_path, ckpt, monkeypatch
) -> None:
    """An empty --ppl text scores nothing: one line naming it, before the engine is built (it used to compile,
    then end in perplexity()'s ValueError traceback)."""
    import toolkit.cli.cmd_eval as cmd_eval

    monkeypatch.setattr(cmd_eval, "open_engine", lambda *a, **k: pytest.fail("built an engine"))
    (tmp_path / "empty.txt").write_text("")
    before = snapshot(tmp_path)
    r = run(["eval", ckpt, "--ppl", tmp_path / "empty.txt"])
    assert_clean_failure(r, "empty.txt", before, tmp_path)
    assert "fewer than 2 tokens" in r.stderr
    # a window longer than the model's positions: it used to end in ContextFullError after the build
    (tmp_path / "t.txt").write_text("some words to score")
    before = snapshot(tmp_path)
    for cmd in ("eval", "quant-report"):
        r = run([cmd, ckpt, "--ppl", tmp_path / "t.txt", "--context", "5000"])
        line = assert_clean_failure(r, "--context", before, tmp_path)
        assert "model's 256 positions" in line, line
    # without --context the window is 512 or, for this model, its 256 positions
    seen = {}

    def engine_asked(*a, **k):
        seen.update(k)
        raise UserError("stop here")

    monkeypatch.setattr(cmd_eval, "open_engine", engine_asked)
    run(["eval", ckpt, "--ppl", tmp_path / "t.txt"])
    assert seen["cache"].context_window == 256


# -- verify and tune -----------------------------------------------------------------------------------
def _fake_build(folder: Path, library: bool = True) -> Path:
    from toolkit.compile.artifacts import write_manifest
    from toolkit.targets import load_preset

    folder.mkdir()
    if library:
        (folder / "model.so").write_bytes(b"\x7fELF")
    write_manifest(
        folder, load_preset("host"), "q0f32", _tiny_cfg(), [], extra={"library": "model.so", "params": []}
    )
    return folder


def test_verify_missing_library(tmp_path) -> None:
    d = _fake_build(tmp_path / "b", library=False)
    before = snapshot(tmp_path)
    assert_clean_failure(run(["verify", d]), ["model.so", str(d)], before, tmp_path)


def test_verify_that_verified_nothing_fails(tmp_path, monkeypatch) -> None:
    import tvm

    import toolkit.verify.verify as v

    monkeypatch.setattr(v, "lowered_and_scheduled", lambda *a, **k: (tvm.IRModule(), tvm.IRModule()))
    d = _fake_build(tmp_path / "b")
    before = snapshot(tmp_path)
    r = run(["verify", d])
    assert "FAILED: 0 kernel(s) verified" in r.stdout
    assert_clean_failure(r, "nothing was verified", before, tmp_path)


def test_verify_not_a_build(tmp_path) -> None:
    (tmp_path / "x").mkdir()
    before = snapshot(tmp_path)
    assert_clean_failure(run(["verify", tmp_path / "x"]), "manifest.json", before, tmp_path)


def test_tune_unreachable_tracker_fails_fast(tmp_path) -> None:
    t0 = time.monotonic()
    r = run(["tune", "--rpc-tracker", "127.0.0.1:1", "--rpc-key", "k"])
    assert time.monotonic() - t0 < 30  # TVM import included; the old retry loop took over a minute
    assert_clean_failure(r, "--rpc-tracker 127.0.0.1:1", snapshot(tmp_path), tmp_path)


def test_tune_tracker_port_that_is_not_a_tracker(tmp_path) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def answer_garbage() -> None:
        conn, _ = srv.accept()
        conn.recv(4)
        conn.sendall(b"HTTP")
        conn.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        r = run(["tune", "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "k"])
    finally:
        srv.close()
    assert_clean_failure(r, "--rpc-tracker", snapshot(tmp_path), tmp_path)


@pytest.mark.parametrize("search", ["knobs", "metaschedule"])
def test_tune_refuses_a_records_folder_it_cannot_write_before_reading_the_model(tmp_path, search) -> None:
    """`--schedules-dir` under a file (or on a read-only or virtual file system): one line naming the flag
    before the model is read (it does not exist here), nothing left behind. It used to tune for minutes and
    then fail at writing the record."""
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    r = run(["tune", "/nonexistent-model", "--search", search, "--schedules-dir", tmp_path / "file" / "sub"])
    line = assert_clean_failure(r, "--schedules-dir", before, tmp_path)
    assert "cannot be written" in line and "file" in line, line


def _a_cpu_this_machine_lacks() -> str | None:
    from toolkit.targets import for_cpu, load_preset

    host = load_preset("host")
    for cpu in ("sapphirerapids", "graniterapids", "znver5"):
        if for_cpu(host, cpu).missing_features:
            return cpu
    return None


def test_tune_refuses_a_device_it_cannot_time_here_before_reading_the_model(tmp_path) -> None:
    """Without a tracker `phi3 tune` times kernels on this machine: a GPU preset with no such GPU here, or a
    CPU class whose instructions this CPU lacks, is one line naming --device (checked before the model,
    which does not exist here), and the records folder stays as it was. It used to tune on, every
    measurement failing, and end in exit 0 with "0 kernel(s) beat the default" and a new index entry."""
    import tvm

    devices = [] if tvm.cuda(0).exist else ["cuda-sm90"]
    devices += [] if tvm.vulkan(0).exist else ["vulkan"]
    devices += ["webgpu"]  # TVM has no WebGPU runtime to time with
    cpu = _a_cpu_this_machine_lacks()
    devices += [f"host:{cpu}"] if cpu else []
    records = tmp_path / "schedules"
    records.mkdir()
    before = snapshot(tmp_path)
    for device in devices:
        r = run(
            [
                "tune",
                "/nonexistent-model",
                "--device",
                device,
                "--search",
                "metaschedule",
                "--schedules-dir",
                records,
            ]
        )
        line = assert_clean_failure(r, f"--device {device}", before, tmp_path)
        assert "--rpc-tracker" in line, line  # the way around it


def test_running_a_cuda_preset_without_a_cuda_gpu_is_one_line(tmp_path) -> None:
    """generate / eval / bench / serve / chat on a CUDA preset where there is no CUDA GPU: one line naming
    the preset before anything is compiled. It used to compile, then end in the traceback of TVM's CUDA
    module loader."""
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA GPU: the preset runs here")
    text = tmp_path / "t.txt"
    text.write_text("some text to score")
    before = snapshot(tmp_path)
    for args in (
        ["generate", "--prompt", "hi", "--max-tokens", "2"],
        ["eval", "--ppl", text],
        ["bench", "--threads", "1"],
        ["serve", "--port", "0"],
        ["chat"],
    ):
        r = run([*args, "--device", "cuda-sm90"], input="")
        line = assert_clean_failure(r, "'cuda-sm90'", before, tmp_path)
        assert "no CUDA GPU" in line, line


def test_meta_schedule_logging_survives_a_foreign_unnamed_handler(tmp_path) -> None:
    from tvm.s_tir.meta_schedule.logging import create_loggers

    from toolkit.tune.guard import MS_LOGGER, meta_schedule_logging

    logger = logging.getLogger(MS_LOGGER)
    foreign = logging.StreamHandler()  # no name: what MetaSchedule's setup chokes on
    logger.addHandler(foreign)
    try:
        with pytest.raises(AttributeError):  # TVM as shipped (why the guard exists)
            create_loggers(str(tmp_path), [{"log_dir": str(tmp_path), "logger_name": f"{MS_LOGGER}.a"}])
        with meta_schedule_logging():
            create_loggers(str(tmp_path), [{"log_dir": str(tmp_path), "logger_name": f"{MS_LOGGER}.b"}])
        assert foreign in logger.handlers and len(logger.handlers) == 1
    finally:
        logger.removeHandler(foreign)


def test_a_code_generation_failure_is_one_line_and_leaves_nothing(monkeypatch, tmp_path, ckpt) -> None:
    """A kernel the code generator refuses (here: TVM's error from inside relax.build) ends `compile` as a
    UserError naming the preset and the first line of the reason, with no output folder or temp left."""
    from toolkit.checkpoint import open_model
    from toolkit.compile import compile_model as cm

    def refuse(*_a, **_k):
        raise RuntimeError("203520 bytes of shared memory (target allows 32768)\n  stack line")

    monkeypatch.setattr(cm.pipeline, "build", refuse)
    out = tmp_path / "lib"
    with pytest.raises(UserError, match=r"^compiling for vulkan failed in code generation .*: 203520 bytes"):
        cm.compile_model(open_model(ckpt).config, "q4f16_1", "vulkan", out)
    assert list(tmp_path.iterdir()) == []


def test_an_amx_library_where_the_os_refuses_the_tiles_is_one_line_before_any_compile(monkeypatch) -> None:
    """A Sapphire-Rapids-class preset on a Linux that refuses the AMX tiles (before 5.16, or a seccomp
    filter on arch_prctl): `open_device`, which a load runs before compiling, names the cause and a way
    out; the library's first prefill would otherwise die in the kernel's own check, a traceback."""
    import dataclasses

    import tvm

    from toolkit import hostinfo
    from toolkit.runtime.engine import open_device
    from toolkit.targets import load_preset

    amx = dataclasses.replace(load_preset("host:sapphirerapids"), missing_features=())  # as on that CPU
    monkeypatch.setattr(hostinfo, "amx_tiles_granted", lambda: False)
    with pytest.raises(UserError, match="refused this process the AMX tile registers.*host:icelake-server"):
        open_device(amx)
    monkeypatch.setattr(hostinfo, "amx_tiles_granted", lambda: True)
    assert open_device(amx) == tvm.cpu()
    monkeypatch.setattr(hostinfo, "amx_tiles_granted", lambda: pytest.fail("a non-AMX library asked"))
    open_device(load_preset("host:icelake-server"))


def test_the_os_grants_no_amx_tiles_to_a_cpu_without_them() -> None:
    from toolkit import hostinfo

    granted = hostinfo.amx_tiles_granted()
    assert granted in (True, False, None)
    if "amx_tile" not in hostinfo.cpu_flags():
        assert granted is not True
