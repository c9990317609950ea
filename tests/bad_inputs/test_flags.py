"""Every numeric flag at and past its bounds, bad prompts, and flag combinations that make no sense.

Past a bound: refused at parse time (before any model is opened: MODEL points at a folder that does not
exist, so a flag that slipped through would fail on the model instead and name the wrong thing). At a bound:
the flag parses (checked with Click's make_context, which runs no command).
"""

from __future__ import annotations

import pytest
from bad_util import assert_clean_failure, run, snapshot

from toolkit.cli import main
from toolkit.coreml import MAX_CONTEXT  # Core ML's uint16 index casts

M = "/nonexistent-model"

PAST = [
    # generate / chat sampling flags
    ("generate", ["-p", "hi", "--max-tokens", "0"], "--max-tokens"),
    # argv bytes that are not UTF-8 arrive as lone surrogates (--system reached the tokenizer's TypeError)
    ("generate", ["-p", "hi", "--system", "\udcff"], "--system"),
    ("generate", ["-p", "hi", "--stop", "\udcff"], "--stop"),
    ("chat", ["--system", "\udcff"], "--system"),
    ("generate", ["-p", "hi", "--max-tokens", "-1"], "--max-tokens"),
    ("generate", ["-p", "hi", "--max-tokens", "1.5"], "--max-tokens"),
    ("generate", ["-p", "hi", "--max-tokens", "many"], "--max-tokens"),
    ("generate", ["-p", "hi", "--temperature", "-0.1"], "--temperature"),
    ("generate", ["-p", "hi", "--temperature", "inf"], "--temperature"),
    ("generate", ["-p", "hi", "--temperature", "-inf"], "--temperature"),
    ("generate", ["-p", "hi", "--temperature", "nan"], "--temperature"),
    ("generate", ["-p", "hi", "--temperature", "warm"], "--temperature"),
    ("generate", ["-p", "hi", "--top-p", "0"], "--top-p"),
    ("generate", ["-p", "hi", "--top-p", "1.0001"], "--top-p"),
    ("generate", ["-p", "hi", "--top-p", "-0.5"], "--top-p"),
    ("generate", ["-p", "hi", "--top-p", "nan"], "--top-p"),
    ("generate", ["-p", "hi", "--top-p", "inf"], "--top-p"),
    ("generate", ["-p", "hi", "--seed", "-1"], "--seed"),
    ("generate", ["-p", "hi", "--seed", "1e3"], "--seed"),
    ("generate", ["-p", "hi", "--seed", str(2**64)], "--seed"),
    ("generate", ["-p", "hi", "--threads", "0"], "--threads"),
    ("generate", ["-p", "hi", "--threads", "-3"], "--threads"),
    ("generate", ["-p", "hi", "--threads", "100000"], "--threads"),
    # checked by the options' own rules, then named as the flag
    ("generate", ["-p", "hi", "--stop", ""], "--stop"),
    ("generate", ["-p", "hi", "--logit-bias", "5=1000"], "--logit-bias"),
    ("generate", ["-p", "", "--stop", "x"], "--prompt"),
    ("generate", ["-p", ""], "--prompt"),
    ("generate", ["-p", "   \n\t"], "--prompt"),
    ("generate", [], "--prompt"),
    ("chat", ["--max-tokens", "-1"], "--max-tokens"),
    ("chat", ["--temperature", "nan"], "--temperature"),
    ("chat", ["--top-p", "2"], "--top-p"),
    ("chat", ["--seed", "-5"], "--seed"),
    ("chat", ["--threads", "-3"], "--threads"),
    # eval
    ("eval", ["--ppl", "x.txt", "--context", "1"], "--context"),
    ("eval", ["--ppl", "x.txt", "--context", "0"], "--context"),
    ("eval", ["--ppl", "x.txt", "--context", "-5"], "--context"),
    ("eval", ["--ppl", "x.txt", "--stride", "0"], "--stride"),
    ("eval", ["--ppl", "x.txt", "--context", "64", "--stride", "65"], "--stride"),  # would skip tokens
    ("quant-report", ["--ppl", "x.txt", "--context", "64", "--stride", "65"], "--stride"),
    ("eval", ["--ppl", "x.txt", "--stride", "-1"], "--stride"),
    ("eval", ["--ppl", "x.txt", "--max-tokens", "0"], "--max-tokens"),
    ("eval", ["--ppl", "x.txt", "--threads", "0"], "--threads"),
    ("eval", ["--ppl", "x.txt", "--through", "sideways"], "--through"),
    # convert
    ("convert", ["-o", "out", "--context-window", "0"], "--context-window"),
    ("convert", ["-o", "out", "--context-window", "-5"], "--context-window"),
    ("convert", ["-o", "out", "--prefill-chunk", "0"], "--prefill-chunk"),
    ("convert", ["-o", "out", "--prefill-chunk", "-1"], "--prefill-chunk"),
    ("convert", ["-o", "out", "--context-window", "64", "--prefill-chunk", "128"], "--prefill-chunk"),
    ("convert", ["-o", "out", "--clip", "magic"], "--clip"),
    ("convert", ["-o", "out", "--param-names", "xx"], "--param-names"),
    ("convert", [], "--output"),
    # export-coreml / verify-coreml
    ("export-coreml", ["-o", "x.mlpackage", "--context", "0"], "--context"),
    ("export-coreml", ["-o", "x.mlpackage", "--context", "-1"], "--context"),
    ("export-coreml", ["-o", "x.mlpackage", "--context", str(MAX_CONTEXT + 1)], "--context"),
    ("export-coreml", ["-o", "x.mlpackage", "--weights", "int3"], "--weights"),
    ("verify-coreml", ["--decode-steps", "-1"], "--decode-steps"),
    ("verify-coreml", ["--prompt-len", "0"], "--prompt-len"),
    ("verify-coreml", ["--seed", "-1"], "--seed"),
    # export-gguf
    ("export-gguf", ["-o", "x.gguf", "--type", "q3_k"], "--type"),
    # bench
    ("bench", ["--threads", "0"], "--threads"),
    ("bench", ["--threads", "1,-2"], "--threads"),
    ("bench", ["--threads", "a,b"], "--threads"),
    ("bench", ["--threads", ","], "--threads"),
    ("bench", ["--prompt-lengths", "0"], "--prompt-lengths"),
    ("bench", ["--decode-tokens", "0"], "--decode-tokens"),
    ("bench", ["--repeats", "0"], "--repeats"),
    ("bench", ["--warmup", "-1"], "--warmup"),
    ("bench", ["--bandwidth-mib", "0"], "--bandwidth-mib"),
    ("bench", ["--llama-flash-attn", "maybe"], "--llama-flash-attn"),
    ("bench", ["--kv-cache", "float8"], "--kv-cache"),
    ("bench", ["--kv-cache", "float16,float16"], "--kv-cache"),
    ("bench", ["--kv-cache", "float16,"], "--kv-cache"),
    # tune
    ("tune", ["--trials", "0"], "--trials"),
    ("tune", ["--kernels", "0"], "--kernels"),
    ("tune", ["--min-gain", "nan"], "--min-gain"),
    ("tune", ["--min-gain", "-0.5"], "--min-gain"),
    ("tune", ["--cost-model", "oracle"], "--cost-model"),
    ("tune", ["--rpc-tracker", "nohostport", "--rpc-key", "k"], "--rpc-tracker"),
    ("tune", ["--rpc-tracker", "127.0.0.1:99999", "--rpc-key", "k"], "--rpc-tracker"),
    # verify
    ("verify", ["--seed", "-1"], "--seed"),
    # quant-report
    ("quant-report", ["-q", "q4f16_1", "--methods", "rtn,guess"], "guess"),
    # unknown flags and commands
    ("generate", ["-p", "hi", "--temprature", "0"], "--temprature"),
    ("no-such-command", [], "no-such-command"),
]

# commands whose MODEL is an option or that take a different first argument
_FIRST_ARG = {"verify-coreml": "pkg.mlpackage", "verify": "/nonexistent-build", "no-such-command": None}


def _args(cmd: str, flags: list[str]) -> list[str]:
    first = _FIRST_ARG.get(cmd, M)
    return [cmd, *([first] if first else []), *flags]


@pytest.mark.parametrize(
    "cmd, flags, flag", PAST, ids=[f"{c}:{' '.join(f) or '(none)'}"[:60] for c, f, _ in PAST]
)
def test_flag_past_its_bound_is_refused_at_parse_time(tmp_path, monkeypatch, cmd, flags, flag) -> None:
    monkeypatch.chdir(tmp_path)  # relative outputs (out, x.gguf) land here; nothing may appear
    before = snapshot(tmp_path)
    assert_clean_failure(run(_args(cmd, flags)), flag, before, tmp_path)


AT_BOUND = [
    ("generate", ["-p", "x", "--max-tokens", "1", "--temperature", "0", "--top-p", "1", "--seed", "0"]),
    ("generate", ["-p", "x", "--top-p", "1e-9", "--threads", "1"]),
    ("chat", ["--max-tokens", "1", "--temperature", "0"]),
    ("eval", ["--ppl", "x", "--context", "2", "--stride", "1", "--max-tokens", "2"]),
    ("convert", ["-o", "o", "--context-window", "1", "--prefill-chunk", "1"]),
    ("export-coreml", ["-o", "x.mlpackage", "--context", "1"]),
    ("export-coreml", ["-o", "x.mlpackage", "--context", str(MAX_CONTEXT)]),
    ("verify-coreml", ["--decode-steps", "0", "--prompt-len", "1", "--seed", "0"]),
    ("bench", ["--threads", "1", "--decode-tokens", "1", "--repeats", "1", "--warmup", "0"]),
    ("bench", ["--kv-cache", "float16,float32"]),
    ("tune", ["--trials", "1", "--kernels", "1", "--min-gain", "0"]),
]


@pytest.mark.parametrize("cmd, flags", AT_BOUND, ids=[f"{c}:{' '.join(f)}"[:60] for c, f in AT_BOUND])
def test_flag_at_its_bound_parses(cmd, flags) -> None:
    ctx = main.make_context("phi3", [cmd, *([] if cmd == "verify-coreml" else [M]), *flags])
    sub = main.get_command(ctx, cmd)
    args = (["pkg"] if cmd == "verify-coreml" else [M]) + flags
    sub.make_context(cmd, args, parent=ctx)  # raises on a refused value; runs nothing


def test_invalid_utf8_prompt_in_a_subprocess(tmp_path) -> None:
    """argv bytes that are not UTF-8 reach Python as surrogates: one line, no traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "toolkit.cli",
            "generate",
            M,
            "-p",
            b"\xff\xfe bad".decode("utf-8", "surrogateescape"),
        ],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    err = p.stderr.decode(errors="replace").strip().splitlines()
    assert p.returncode != 0 and len(err) == 1 and "--prompt" in err[0] and "UTF-8" in err[0], err
    assert list(tmp_path.iterdir()) == []
