"""Serving benchmark: `phi3 serve` vs llama-cpp-python's OpenAI server on the same GGUF and thread count.

Both servers run as child processes for the whole run, loaded side by side; at each concurrency level
(e.g. 1, 4, 16 streams) the same client code drives one, then the other (which one goes first alternates
by level, so a drift in machine load hits both alike). A stream is a client that sends `rounds` streaming
`/v1/completions` requests one after another; per level: aggregate completion tokens/s (all tokens over the
wall time of the level) and time to first token (p50/p99 over every request).

Every request asks for exactly `max_tokens` greedy tokens: the model's stop tokens get a logit bias of -100,
and a request that does not finish with `length` fails the run (its token count would be a guess).

llama_cpp.server runs with `interrupt_requests=False` (its default cuts a running stream off whenever
another request arrives; it then serves requests one at a time, which is what it does) and
`logits_all=False` (no logprobs are asked for; its default computes logits for every prompt token).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ..errors import UserError
from ..hostinfo import cpu_name, isa_flags
from ..outputs import save_figure

# distinct story openers: streams do not share a prompt (no server caches prefixes here, but to be sure)
PROMPTS = [
    f"Once upon a time, in a small village near the {place}, there lived a young {who} who"
    for place in ("sea", "mountains", "forest", "desert")
    for who in ("baker", "sailor", "painter", "teacher")
]
SERVER_EXTRA = "server"  # llama-cpp-python's extra that holds its server's dependencies


@dataclass
class ServeBenchSettings:
    gguf: Path
    threads: int
    streams: list[int] = field(default_factory=lambda: [1, 4, 16])
    max_tokens: int = 128
    rounds: int = 3
    context_window: int = 1024
    prefill_chunk: int = 256
    startup_timeout_s: float = 900.0  # ours compiles the model on first use

    def validate(self) -> None:
        if not self.streams or min(self.streams) < 1:
            raise UserError("--streams: every value must be >= 1")
        if self.threads < 1 or self.max_tokens < 1 or self.rounds < 1:
            raise UserError("--threads, --max-tokens and --rounds must be >= 1")
        if self.max_tokens >= self.context_window:
            raise UserError(
                f"--max-tokens {self.max_tokens} leaves no room in --context-window {self.context_window}"
            )
        if not 1 <= self.prefill_chunk <= self.context_window:
            raise UserError(f"--prefill-chunk must be between 1 and --context-window {self.context_window}")
        if not self.gguf.is_file():
            raise UserError("no such GGUF file", self.gguf)


@dataclass
class RequestRecord:
    ttft_s: float  # request sent -> first chunk with text
    total_s: float  # request sent -> stream end
    tokens: int
    finish_reason: str | None


# ---- what to install ----


def llama_server_requirements() -> list[str]:
    """The requirements of llama-cpp-python's `server` extra, as its installed metadata lists them."""
    reqs = importlib.metadata.requires("llama-cpp-python") or []
    return [r.split(";")[0].strip() for r in reqs if f'extra == "{SERVER_EXTRA}"' in r]


def check_llama_server_importable() -> None:
    """llama_cpp.server imports in a fresh interpreter, else a UserError saying exactly what to install."""
    from .llama_cpp import LLAMA_CPP_VERSION, installed_version

    if installed_version() is None:
        raise UserError(
            f"llama-cpp-python is not installed; build and install {LLAMA_CPP_VERSION} with: "
            "python -m toolkit.bench.llama_cpp install"
        )
    proc = subprocess.run(
        [sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        reqs = " ".join(f"'{r}'" for r in llama_server_requirements())
        raise UserError(f"llama_cpp.server does not import ({last}); install its extras: pip install {reqs}")


# ---- servers ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours_command(st: ServeBenchSettings, port: int) -> list[str]:
    return [
        sys.executable, "-m", "toolkit.cli", "serve", str(st.gguf), "--host", "127.0.0.1",
        "--port", str(port), "--threads", str(st.threads), "--max-sequences", str(max(st.streams)),
        "--max-queue", str(4 * max(st.streams)), "--context-window", str(st.context_window),
        "--prefill-chunk", str(st.prefill_chunk),
    ]  # fmt: skip


def llama_cpp_command(st: ServeBenchSettings, port: int) -> list[str]:
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", str(st.gguf), "--host", "127.0.0.1",
        "--port", str(port), "--n_threads", str(st.threads), "--n_threads_batch", str(st.threads),
        "--n_ctx", str(st.context_window), "--interrupt_requests", "False", "--logits_all", "False",
        "--verbose", "False",
    ]  # fmt: skip


class ServerProcess:
    """An OpenAI-compatible server in a child process, ready once GET /v1/models answers 200."""

    def __init__(self, name: str, cmd: Sequence[str], port: int, *, env: dict[str, str] | None = None):
        self.name, self.cmd, self.port = name, list(cmd), port
        self.url = f"http://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def _last_line(self) -> str:
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().splitlines() if ln.strip()]
        return lines[-1] if lines else "(no output)"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise UserError(
                    f"{self.name} server exited (code {self.proc.returncode}) before it was ready: "
                    f"{self._last_line()}"
                )
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"{self.name} server not ready after {timeout_s:.0f} s: {self._last_line()}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---- the client ----


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """One server-sent-event line -> its JSON payload (None: not a data line, or the final [DONE])."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestRecord:
    t0 = time.perf_counter()
    ttft, finish, usage = None, None, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = " ".join((await r.aread()).decode(errors="replace").split())[:300]
                raise UserError(f"{url}: HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                obj = parse_sse_line(line)
                if obj is None:
                    continue
                if "error" in obj:
                    raise UserError(f"{url}: error in the stream: {obj['error']}")
                usage = obj.get("usage") or usage
                for ch in obj.get("choices") or []:
                    if ch.get("text") and ttft is None:
                        ttft = time.perf_counter() - t0
                    finish = ch.get("finish_reason") or finish
    except (httpx.HTTPError, ValueError) as e:  # the server died or sent garbage: one line, no traceback
        raise UserError(f"{url}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    total = time.perf_counter() - t0
    if finish != "length":
        raise UserError(
            f"{url}: a request finished with {finish!r}, not 'length' after {body['max_tokens']} tokens"
        )
    tokens = int(usage["completion_tokens"]) if usage else int(body["max_tokens"])
    if tokens != body["max_tokens"]:
        raise UserError(f"{url}: {tokens} completion tokens, asked for {body['max_tokens']}")
    return RequestRecord(
        ttft_s=total if ttft is None else ttft, total_s=total, tokens=tokens, finish_reason=finish
    )


def request_body(prompt: str, max_tokens: int, ban: Sequence[int]) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(t): -100 for t in ban},
    }


async def _level(url: str, streams: int, rounds: int, max_tokens: int, ban: Sequence[int]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:

        async def stream(i: int) -> list[RequestRecord]:
            out = []
            for r in range(rounds):
                prompt = PROMPTS[(i + r * streams) % len(PROMPTS)]
                out.append(await one_request(client, url, request_body(prompt, max_tokens, ban)))
            return out

        t0 = time.perf_counter()
        per_stream = await asyncio.gather(*(stream(i) for i in range(streams)))
        wall = time.perf_counter() - t0
    return summarize_level([r for recs in per_stream for r in recs], wall, streams)


def summarize_level(records: Sequence[RequestRecord], wall_s: float, streams: int) -> dict[str, Any]:
    ttft = np.array([r.ttft_s for r in records])
    tokens = sum(r.tokens for r in records)
    return {
        "streams": streams,
        "requests": len(records),
        "tokens": tokens,
        "wall_s": wall_s,
        "aggregate_tok_s": tokens / wall_s,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "request_p50_s": float(np.percentile([r.total_s for r in records], 50)),
    }


def run_level(url: str, streams: int, rounds: int, max_tokens: int, ban: Sequence[int]) -> dict[str, Any]:
    return asyncio.run(_level(url, streams, rounds, max_tokens, ban))


# ---- the run ----


def model_facts(gguf: Path) -> tuple[list[int], list[int]]:
    """(the model's stop tokens as our server stops on them, the token count of each prompt)."""
    from ..checkpoint import open_model
    from ..runtime.prompts import PromptFormat

    src = open_model(str(gguf))
    tok = src.tokenizer()
    return sorted(PromptFormat.for_source(src, tok).stop_ids), [len(tok.encode(p)) for p in PROMPTS]


def _child_env() -> dict[str, str]:
    """The children import this very toolkit (a worktree or checkout may shadow the installed one)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_serve_bench(st: ServeBenchSettings, log=print) -> dict[str, Any]:
    st.validate()
    check_llama_server_importable()
    ban, prompt_tokens = model_facts(st.gguf)
    if max(prompt_tokens) + st.max_tokens > st.context_window:
        raise UserError(
            f"--max-tokens {st.max_tokens} after a {max(prompt_tokens)}-token prompt exceeds "
            f"--context-window {st.context_window}"
        )
    env = _child_env()
    servers: dict[str, ServerProcess] = {}
    try:
        for name, make in (("ours", ours_command), ("llama_cpp", llama_cpp_command)):
            port = free_port()
            servers[name] = ServerProcess(name, make(st, port), port, env=env)
        for srv in servers.values():
            log(f"waiting for {srv.name} on {srv.url} ...")
            srv.wait_ready(st.startup_timeout_s)
        result: dict[str, Any] = {
            "settings": {**asdict(st), "gguf": str(st.gguf)},
            "machine": {
                "cpu": cpu_name(),
                "isa_flags": isa_flags(),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
            },
            "versions": {
                "llama_cpp_python": _version("llama-cpp-python"),
                "toolkit": _version("phi3-toolkit"),
            },
            "commands": {n: s.cmd for n, s in servers.items()},
            "banned_stop_tokens": ban,
            "prompt_tokens": prompt_tokens,
            "loadavg_before": list(os.getloadavg()),
            "levels": [],
        }
        for srv in servers.values():  # warm-up: first-request costs (lazy allocations, page faults)
            run_level(srv.url, 1, 1, min(8, st.max_tokens), ban)
        for i, n in enumerate(st.streams):
            entry: dict[str, Any] = {"streams": n}
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                res = run_level(servers[name].url, n, st.rounds, st.max_tokens, ban)
                entry[name] = res
                log(
                    f"{n:3d} streams  {name:9s}  {res['aggregate_tok_s']:8.1f} tok/s  "
                    f"TTFT p50 {res['ttft_p50_s'] * 1e3:8.1f} ms  p99 {res['ttft_p99_s'] * 1e3:8.1f} ms"
                )
            entry["throughput_ratio"] = (
                entry["ours"]["aggregate_tok_s"] / entry["llama_cpp"]["aggregate_tok_s"]
            )
            result["levels"].append(entry)
        result["loadavg_after"] = list(os.getloadavg())
        return result
    finally:
        for srv in servers.values():
            srv.stop()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def format_table(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    flags = "; " + " ".join(m["isa_flags"]) if m.get("isa_flags") else ""
    rows = [f"machine: {m.get('cpu') or 'unknown CPU'}, {m.get('cpus', '?')} cpus{flags}"]
    rows.append(f"{'streams':>7}  {'server':9}  {'tok/s':>8}  {'TTFT p50 ms':>11}  {'TTFT p99 ms':>11}")
    for e in result["levels"]:
        for name in ("ours", "llama_cpp"):
            r = e[name]
            rows.append(
                f"{e['streams']:>7}  {name:9}  {r['aggregate_tok_s']:8.1f}  {r['ttft_p50_s'] * 1e3:11.1f}  "
                f"{r['ttft_p99_s'] * 1e3:11.1f}"
            )
        rows.append(f"{'':>7}  ours / llama.cpp throughput: {e['throughput_ratio']:.2f}x")
    la, lb = result["loadavg_before"], result["loadavg_after"]
    rows.append(
        f"load average before {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, after {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}"
    )
    return "\n".join(rows)


def write_json(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def plot(result: dict[str, Any], out: str | Path) -> Path:
    """Aggregate tok/s and TTFT (p50 bars, p99 markers) per concurrency level, both servers, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    names = {"ours": "phi3 serve", "llama_cpp": "llama_cpp.server"}
    x = np.arange(len(levels))
    width = 0.38
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (key, label) in enumerate(names.items()):
        off = (i - 0.5) * width
        ax_t.bar(x + off, [e[key]["aggregate_tok_s"] for e in levels], width, label=label)
        p50 = [e[key]["ttft_p50_s"] * 1e3 for e in levels]
        p99 = [e[key]["ttft_p99_s"] * 1e3 for e in levels]
        bars = ax_l.bar(x + off, p50, width, label=f"{label} p50")
        ax_l.scatter(
            x + off, p99, marker="_", s=400, color=bars.patches[0].get_facecolor(), label=f"{label} p99"
        )
    for ax in (ax_t, ax_l):
        ax.set_xticks(x, [f"{e['streams']} stream{'s' if e['streams'] > 1 else ''}" for e in levels])
        ax.legend(fontsize=8)
    ax_t.set_ylabel("aggregate completion tokens/s")
    ax_t.set_title("throughput")
    ax_l.set_ylabel("time to first token (ms)")
    ax_l.set_yscale("log")
    ax_l.set_title("TTFT (bars p50, markers p99)")
    st = result["settings"]
    fig.suptitle(
        f"{Path(st['gguf']).name}, {st['threads']} threads, {st['max_tokens']} tokens/request, "
        f"load {result['loadavg_before'][0]:.2f}",
        fontsize=10,
    )
    fig.tight_layout()
    try:
        return save_figure(fig, out)
    finally:
        plt.close(fig)
