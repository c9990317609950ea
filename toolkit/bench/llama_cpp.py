"""llama.cpp as the reference runtime: build llama-cpp-python once with working AMX, then time it.

Why a recipe of our own: on Sapphire-Rapids-class CPUs a plain `-march=native` GCC 12 build segfaults in
ggml's AMX code, and a build with AMX disabled is 2-3x slower than one with AMX working, which would
flatter us. Debian's clang-15 builds it correctly once the AMX feature macros are defined (clang-15 spells
them `__AMXINT8__`, so ggml's `#ifdef __AMX_INT8__` would otherwise silently leave AMX out). The wheel is
`-march=native`, so it is cached per CPU model and flag set under ~/.cache/phi3-toolkit/wheels. On CPUs
without AMX (e.g. AMD EPYC) the recipe drops the macros: the plain native build, the fastest there.

llama.cpp runs in a worker process (`python -m toolkit.bench.llama_cpp worker`) that speaks JSON lines: a
crash in native code then cannot take the bench down, its peak RSS is its own, and both sides run the same
timing loop (`toolkit.bench.timing.timed_generation`).

For `--device host:CPU` (our code built for another CPU class, measured here) llama.cpp is built for the same
CPU: `-march=CPU` with ggml's own ISA switches off, so the compiler's macros for that CPU pick ggml's paths as
a native build on it would. That wheel goes into a folder of its own (`variant_site`), which the worker puts
first on its path; the `system_info` line it reports is checked against the CPU's features."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..hostinfo import cpu_flags, cpu_model
from ..paths import cache_root

LLAMA_CPP_VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
COMPILER_C, COMPILER_CXX = "clang-15", "clang++-15"
AMX_DEFINES = "-D__AMX_INT8__=1 -D__AMX_TILE__=1 -D__AMX_BF16__=1"
# Only the library: examples, tools, server, tests and llava are not needed and double the build time.
CMAKE_BASE = (
    "-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF "
    "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF"
)


# ggml's x86 ISA switches: all off for a `-march=CPU` build, so the CPU's own macros decide
GGML_ISA_OPTIONS = (
    "SSE42 AVX AVX2 BMI2 FMA F16C AVX_VNNI AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 "
    "AMX_TILE AMX_INT8 AMX_BF16"
).split()
# system_info's names for ISA extensions, and the LLVM feature each needs: a `-march=CPU` build that reports
# one its CPU lacks did not take the flags
SYSTEM_INFO_FEATURES = {
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "AVX_VNNI": "avxvnni",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512vnni",
    "AVX512_BF16": "avx512bf16",
    "AMX_INT8": "amx-int8",
}


def cpu_has_amx(cpu: str | None = None) -> bool:
    """This machine has AMX, or the LLVM CPU `cpu` has it."""
    if cpu is None:
        return {"amx_tile", "amx_int8"} <= cpu_flags()
    return {"amx-tile", "amx-int8"} <= llvm_cpu_features(cpu)


def llvm_cpu_features(cpu: str) -> set[str]:
    """The LLVM features of x86-64 CPU `cpu` (`-mcpu` / `-march` name)."""
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})
    return {str(f) for f in codegen.llvm_get_cpu_features(target)}


def cpu_fingerprint() -> str:
    """CPU model plus its flags: a `-march=native` wheel is only reused on the same kind of CPU."""
    digest = hashlib.sha256((cpu_model() + " " + " ".join(sorted(cpu_flags()))).encode()).hexdigest()
    return digest[:16]


def wheelhouse(cpu: str | None = None) -> Path:
    """Where the wheel built on this machine (for its own CPU, or `-march=cpu`) is kept."""
    tail = f"-march-{cpu}" if cpu else ""
    return cache_root() / "wheels" / f"llama-cpp-python-{LLAMA_CPP_VERSION}-{cpu_fingerprint()}{tail}"


def variant_site(cpu: str) -> Path:
    """The folder the `-march=cpu` wheel is installed into (put first on the worker's PYTHONPATH)."""
    return wheelhouse(cpu) / "site"


def find_wheel(where: Path | None = None) -> Path | None:
    where = where or wheelhouse()
    wheels = sorted(where.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))
    return wheels[-1] if wheels else None


def build_env(cpu: str | None = None) -> dict[str, str]:
    """Environment for `pip wheel`: clang-15, `-march=native` (or `-march=cpu` with ggml's ISA switches
    off), and for an AMX CPU the AMX macros in both C and C++ flags."""
    cflags = ([f"-march={cpu}"] if cpu else []) + ([AMX_DEFINES] if cpu_has_amx(cpu) else [])
    flags = f"-DCMAKE_C_FLAGS='{' '.join(cflags)}' -DCMAKE_CXX_FLAGS='{' '.join(cflags)}'" if cflags else ""
    base = CMAKE_BASE
    if cpu:
        isa_off = " ".join(f"-DGGML_{o}=OFF" for o in GGML_ISA_OPTIONS)
        base = base.replace("-DGGML_NATIVE=ON", f"-DGGML_NATIVE=OFF {isa_off}")
    env = dict(os.environ)
    env.update(
        CC=COMPILER_C,
        CXX=COMPILER_CXX,
        CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2),
        CMAKE_ARGS=f"{base} {flags}".strip(),
    )
    return env


def build_wheel(where: Path | None = None, *, log: Path | None = None, cpu: str | None = None) -> Path:
    """Build the wheel (3-6 minutes on 2 cores) into the wheelhouse and return its path."""
    for exe in (COMPILER_C, COMPILER_CXX):
        if shutil.which(exe) is None:
            raise UserError(
                f"{exe} is needed to build llama.cpp with working AMX; install it: apt-get install clang-15"
            )
    where = where or wheelhouse(cpu)
    where.mkdir(parents=True, exist_ok=True)
    log = log or where / "build.log"
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a wheel built without AMX
        cmd = [
            "nice",
            "-n",
            "10",
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-cache-dir",
            "--no-deps",
            f"{PACKAGE}=={LLAMA_CPP_VERSION}",
            "-w",
            tmp,
        ]
        with open(log, "w") as f:
            rc = subprocess.run(cmd, env=build_env(cpu), stdout=f, stderr=subprocess.STDOUT).returncode
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if rc != 0 or not built:
            raise UserError(f"building {PACKAGE}=={LLAMA_CPP_VERSION} failed (exit {rc}); see the log", log)
        final = where / built[0].name
        os.replace(built[0], final)
    return final


def installed_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_wheel(wheel: Path) -> None:
    """Install the wheel itself (replacing any other build), then its small pure-Python dependencies
    (diskcache, jinja2, typing-extensions) without upgrading anything already installed."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    for cmd in (pip + ["--no-deps", "--force-reinstall", str(wheel)], pip + [str(wheel)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"pip install failed: {proc.stderr.strip()[-500:]}", wheel)
    importlib.invalidate_caches()


def install_variant(wheel: Path, cpu: str) -> Path:
    """Install a `-march=cpu` wheel into `variant_site(cpu)` (the installed llama-cpp-python is left alone)
    and its pure-Python dependencies into this environment; returns the folder."""
    site = variant_site(cpu)
    tmp = site.with_name(f"site.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    cmd = pip + ["--no-deps", "--target", str(tmp), str(wheel)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"pip install failed: {proc.stderr.strip()[-500:]}", wheel)
    dists = list(importlib.metadata.distributions(path=[str(tmp)]))
    reqs = [r for d in dists for r in (d.requires or []) if "extra ==" not in r]
    if reqs:
        proc = subprocess.run(pip + reqs, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"pip install {' '.join(reqs)} failed: {proc.stderr.strip()[-500:]}")
    old = site.with_name(f"site.old-{os.getpid()}")
    if site.exists():
        os.replace(site, old)
    os.replace(tmp, site)
    shutil.rmtree(old, ignore_errors=True)
    return site


def worker_env(cpu: str | None = None) -> dict[str, str]:
    """The environment a llama.cpp process runs in: the `-march=cpu` build first on its path."""
    env = dict(os.environ)
    if cpu:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(variant_site(cpu)), env.get("PYTHONPATH")]))
    return env


def system_info() -> str:
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return info.decode() if isinstance(info, bytes) else str(info)


def amx_in(info: str) -> bool:
    return "AMX_INT8 = 1" in info


def _name(cpu: str | None) -> str:
    return f"{PACKAGE}=={LLAMA_CPP_VERSION}" + (f" for -march={cpu}" if cpu else "")


def _probe(cpu: str | None) -> subprocess.CompletedProcess | None:
    """Import llama_cpp as the worker will (a fresh interpreter: this one may hold an older build): its file
    and `system_info` on stdout; None when it is not installed."""
    if (cpu and not (variant_site(cpu) / "llama_cpp").is_dir()) or (
        not cpu and installed_version() != LLAMA_CPP_VERSION
    ):
        return None
    code = "import llama_cpp as l; print(l.__file__); print(l.llama_print_system_info().decode())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=worker_env(cpu))


def _why(probe: subprocess.CompletedProcess) -> str:
    lines = probe.stderr.strip().splitlines()
    return lines[-1][-300:] if lines else f"exit {probe.returncode}"


def _install_and_probe(
    cpu: str | None, *, build: bool, log, broken: str | None
) -> subprocess.CompletedProcess:
    """Install the cached wheel, building it when there is none, and probe the import. A cached wheel that
    installs but does not import is rebuilt once: the wheelhouse is ours, so it repairs itself."""
    install = (lambda w: install_variant(w, cpu)) if cpu else install_wheel
    if broken:
        log(f"{_name(cpu)} does not import ({broken}); reinstalling it")
    wheel, fresh = find_wheel(wheelhouse(cpu)), False
    if wheel is None:
        if not build:
            raise UserError(
                f"{_name(cpu)} is not installed and no wheel is cached; build it with: "
                f"python -m toolkit.bench.llama_cpp install" + (f" --cpu {cpu}" if cpu else "")
            )
        how = f"-march={cpu}" if cpu else "native" + (" + AMX" if cpu_has_amx() else "")
        log(f"building {PACKAGE}=={LLAMA_CPP_VERSION} with clang-15, {how} (3-6 minutes, once)...")
        wheel, fresh = build_wheel(cpu=cpu), True
    log(f"installing {wheel.name}" + (f" into {variant_site(cpu)}" if cpu else ""))
    install(wheel)
    probe = _probe(cpu)
    if probe is not None and probe.returncode != 0 and build and not fresh:
        log(f"{_name(cpu)} from the cached {wheel.name} does not import ({_why(probe)}); rebuilding it")
        install(build_wheel(cpu=cpu))
        probe = _probe(cpu)
    if probe is None:
        raise UserError(f"{_name(cpu)} is not there after installing", wheel)
    return probe


def ensure_llama_cpp(*, build: bool = True, log=print, cpu: str | None = None) -> str:
    """Make llama-cpp-python LLAMA_CPP_VERSION importable: installed, else the cached wheel, else build it;
    with `cpu`, the `-march=cpu` build in its own folder (`variant_site`). An install that no longer imports
    is reinstalled, and its wheel rebuilt if that does not help.

    Returns its `system_info` line. On an AMX CPU a build without AMX is refused: it is not the reference.
    """
    from ..locks import output_lock

    probe = _probe(cpu)
    if probe is None or probe.returncode != 0:
        # a second bench waits for the first one's build and install, then finds it
        with output_lock(variant_site(cpu) if cpu else wheelhouse()):
            importlib.invalidate_caches()
            probe = _probe(cpu)
            if probe is None or probe.returncode != 0:
                broken = _why(probe) if probe is not None else None
                probe = _install_and_probe(cpu, build=build, log=log, broken=broken)
    if probe.returncode != 0:
        raise UserError(f"{_name(cpu)} does not import: {_why(probe)}")
    where, _, line = probe.stdout.strip().partition("\n")
    if cpu:
        if not Path(where).resolve().is_relative_to(variant_site(cpu).resolve()):
            raise UserError(f"the worker imports llama_cpp from {where}, not the -march={cpu} build")
        check_variant_info(line, cpu)
    elif cpu_has_amx() and not amx_in(line):
        raise UserError(
            "the installed llama-cpp-python was built without AMX (2-3x slower here, not a fair reference); "
            "rebuild it with: python -m toolkit.bench.llama_cpp install --rebuild"
        )
    return line.strip()


def check_variant_info(line: str, cpu: str) -> None:
    """UserError unless a `-march=cpu` build's system_info reports only extensions that `cpu` has, and AVX2
    where it has that (a build that ignored the flags would report this machine's, or none)."""
    has = llvm_cpu_features(cpu)
    on = {k for k in SYSTEM_INFO_FEATURES if re.search(rf"\b{k} = 1\b", line)}
    extra = sorted(k for k in on if SYSTEM_INFO_FEATURES[k] not in has)
    if extra:
        raise UserError(f"the -march={cpu} build of llama.cpp reports {', '.join(extra)}, which {cpu} lacks")
    if "avx2" in has and "AVX2" not in on:
        raise UserError(f"the -march={cpu} build of llama.cpp reports no AVX2, which {cpu} has")


class LlamaCppModel:
    """One GGUF model and context in this process; greedy single-sequence prefill/decode returning logits."""

    def __init__(
        self,
        gguf_path: str | Path,
        *,
        threads: int,
        flash_attn: bool = False,
        n_ctx: int = 512,
        n_batch: int = 512,
        use_mmap: bool = True,
        seed: int = 1234,
    ) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self.path = Path(gguf_path)
        self.llm = llama_cpp.Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            seed=seed,
            flash_attn=flash_attn,
            use_mmap=use_mmap,
            verbose=False,
        )
        self.vocab_size = int(self.llm.n_vocab())
        self.n_ctx = int(self.llm.n_ctx())

    def _last_logits(self) -> np.ndarray:
        # Llama.eval no longer keeps logits in 0.3.36 (sampling moved to the sampler): read the context's
        ptr = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()

    def reset(self) -> None:
        self.llm.reset()  # n_past = 0; eval() drops the KV cells past it

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        if self.llm.n_tokens + len(tokens) > self.n_ctx:
            raise UserError(f"{len(tokens)} more tokens do not fit the context of {self.n_ctx}")
        self.llm.eval(list(tokens))
        return self._last_logits()

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])


# ---- worker process -------------------------------------------------------------------------------------


def _serve(stdin, stdout) -> None:
    from .timing import peak_rss_bytes, timed_generation

    model: LlamaCppModel | None = None
    probe = None  # read_bandwidth.ReadProbe, built on the first "pair"
    for line in stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        try:
            if cmd == "load":
                model = LlamaCppModel(
                    req["gguf"],
                    threads=req["threads"],
                    flash_attn=req["flash_attn"],
                    n_ctx=req["n_ctx"],
                    n_batch=req["n_batch"],
                    use_mmap=req.get("use_mmap", True),
                )
                info = system_info()
                resp = {
                    "ok": True,
                    "vocab_size": model.vocab_size,
                    "system_info": info,
                    "amx": amx_in(info) and cpu_has_amx(),
                    "version": installed_version(),
                    "rss_peak_bytes": peak_rss_bytes(),
                }
            elif cmd == "run":
                assert model is not None, "load first"
                resp = {
                    "ok": True,
                    **timed_generation(model, req["tokens"], req["decode_tokens"]),
                    "rss_peak_bytes": peak_rss_bytes(),
                }
            elif cmd == "pair":
                assert model is not None, "load first"
                from ..read_bandwidth import ReadProbe
                from .pairing import paired_decode

                if probe is None:
                    probe = ReadProbe(req["threads"], req["nbytes"])
                resp = {"ok": True, **paired_decode(model, req["tokens"], req["steps"], probe.rate)}
            elif cmd == "logits":
                assert model is not None, "load first"
                model.reset()
                rows = [model.prefill(req["tokens"]).tolist()]
                for tok in req.get("then", []):
                    rows.append(model.decode(tok).tolist())
                resp = {"ok": True, "logits": rows}
            elif cmd == "quit":
                stdout.write(json.dumps({"ok": True}) + "\n")
                stdout.flush()
                return
            else:
                resp = {"ok": False, "error": f"unknown command {cmd!r}"}
        except Exception as e:  # reported to the parent, which raises it there
            resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        stdout.write(json.dumps(resp) + "\n")
        stdout.flush()


class LlamaCppWorker:
    """A llama.cpp model in a child process. Methods mirror LlamaCppModel's measurements."""

    def __init__(
        self,
        gguf_path: str | Path,
        *,
        threads: int,
        flash_attn: bool = False,
        n_ctx: int = 512,
        n_batch: int = 512,
        use_mmap: bool = True,
        cpu: str | None = None,
    ) -> None:
        self.gguf_path, self.threads, self.flash_attn = Path(gguf_path), threads, flash_attn
        self._stderr = tempfile.TemporaryFile(mode="w+")
        # TVM's pool in the worker serves only the bandwidth probe ("pair"): as many threads as llama.cpp's,
        # asleep as soon as a pass ends, not spinning beside llama.cpp's threads
        env = dict(worker_env(cpu), TVM_NUM_THREADS=str(threads), TVM_THREAD_POOL_SPIN_COUNT="0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "toolkit.bench.llama_cpp", "worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        self.info = self._call(
            {
                "cmd": "load",
                "gguf": str(gguf_path),
                "threads": threads,
                "flash_attn": flash_attn,
                "n_ctx": n_ctx,
                "n_batch": n_batch,
                "use_mmap": use_mmap,
            }
        )
        self.vocab_size = int(self.info["vocab_size"])

    def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.proc.wait()
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:]
            raise RuntimeError(
                f"llama.cpp worker died (exit {self.proc.returncode}) on {req['cmd']}:\n{tail}"
            )
        resp = json.loads(line)
        if not resp.get("ok"):
            raise RuntimeError(f"llama.cpp worker: {resp.get('error')}")
        return resp

    def run(self, tokens: Sequence[int], decode_tokens: int) -> dict[str, Any]:
        return self._call({"cmd": "run", "tokens": [int(t) for t in tokens], "decode_tokens": decode_tokens})

    def pair(self, tokens: Sequence[int], steps: int, nbytes: int) -> dict[str, list[float]]:
        """`pairing.paired_decode` in the worker, against a probe in the worker's process."""
        resp = self._call(
            {
                "cmd": "pair",
                "tokens": [int(t) for t in tokens],
                "steps": steps,
                "threads": self.threads,
                "nbytes": nbytes,
            }
        )
        return {"probe_bytes_s": resp["probe_bytes_s"], "decode_s": resp["decode_s"]}

    def logits(self, tokens: Sequence[int], then: Sequence[int] = ()) -> np.ndarray:
        """Last-position logits after the prompt, then after each token of `then`: [1+len(then), V]."""
        resp = self._call(
            {"cmd": "logits", "tokens": [int(t) for t in tokens], "then": [int(t) for t in then]}
        )
        return np.asarray(resp["logits"], dtype=np.float32)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call({"cmd": "quit"})
            except (RuntimeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self) -> LlamaCppWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bench_gguf(
    gguf_path: str | Path,
    *,
    threads: Sequence[int] = (1, 2),
    prompt_len: int = 128,
    decode_tokens: int = 64,
    warmup: int = 1,
    repeats: int = 3,
    flash_attn: Sequence[bool] = (False, True),
    seed: int = 0,
    log=print,
) -> dict[str, Any]:
    """llama.cpp alone on a GGUF (the reference method of shared/notes/cpu-speed-anchor.md): per thread count,
    FA settings interleaved run by run, median [min-max] of `repeats` after `warmup`."""
    from .timing import summarize_runs

    out: dict[str, Any] = {
        "gguf": str(gguf_path),
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "loadavg_before": list(os.getloadavg()),
        "results": [],
    }
    n_ctx = max(512, -(-(prompt_len + decode_tokens + 1) // 256) * 256)
    for t in threads:
        workers = {
            fa: LlamaCppWorker(gguf_path, threads=t, flash_attn=fa, n_ctx=n_ctx, n_batch=max(512, prompt_len))
            for fa in flash_attn
        }
        try:
            vocab = next(iter(workers.values())).vocab_size
            prompt = np.random.default_rng(seed).integers(3, vocab, size=prompt_len).tolist()
            runs: dict[bool, list] = {fa: [] for fa in workers}
            for it in range(warmup + repeats):
                for fa, w in workers.items():
                    r = w.run(prompt, decode_tokens)
                    log(
                        f"threads={t} fa={'on' if fa else 'off'} {'warm-up' if it < warmup else 'run'}: "
                        f"prefill {prompt_len / r['prefill_s']:.1f} tok/s, "
                        f"decode {decode_tokens / r['decode_s']:.2f} tok/s"
                    )
                    if it >= warmup:
                        runs[fa].append(r)
            info = next(iter(workers.values())).info
            out.update(version=info.get("version"), amx=info.get("amx"), system_info=info.get("system_info"))
            for fa, rs in runs.items():
                out["results"].append(
                    {
                        "threads": t,
                        "flash_attn": fa,
                        **summarize_runs(rs),
                        "peak_rss_bytes": max(r["rss_peak_bytes"] for r in rs),
                    }
                )
        finally:
            for w in workers.values():
                w.close()
    out["loadavg_after"] = list(os.getloadavg())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m toolkit.bench.llama_cpp {install [--rebuild] [--cpu CPU] | info | worker | bench GGUF
    [--threads 1,2] [--prompt-len 128] [--decode-tokens 64] [--repeats 3]}`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:
        from ..tvm_compat import tvm_without_torch

        tvm_without_torch()  # its bandwidth probe imports TVM: about 2 s sooner (tvm_compat.py)
        # keep the protocol channel clean: anything native code prints to fd 1 goes to stderr instead
        proto = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        _serve(sys.stdin, proto)
        return 0
    if args[:1] == ["install"]:
        if args[-1:] == ["--cpu"]:
            print("install --cpu needs an LLVM CPU name (e.g. znver3)", file=sys.stderr)
            return 2
        cpu = args[args.index("--cpu") + 1] if "--cpu" in args else None
        if cpu:
            from ..targets import load_preset

            try:  # a name LLVM knows, before minutes of a build that would fail on it
                load_preset(f"host:{cpu}")
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            if "--rebuild" in args:
                from ..locks import output_lock

                with output_lock(variant_site(cpu)):
                    install_variant(build_wheel(cpu=cpu), cpu)
            print(ensure_llama_cpp(cpu=cpu))
            return 0
        if "--rebuild" in args:
            from ..locks import output_lock

            with output_lock(wheelhouse()):
                wheel = build_wheel()
                print(f"built {wheel}")
                install_wheel(wheel)
        print(ensure_llama_cpp())
        return 0
    if args[:1] == ["info"]:
        print(f"installed: {installed_version()}; cached wheel: {find_wheel()}; CPU AMX: {cpu_has_amx()}")
        if installed_version():
            print(system_info())
        return 0
    if args[:1] == ["bench"] and len(args) >= 2:
        import argparse

        ap = argparse.ArgumentParser(prog="python -m toolkit.bench.llama_cpp bench")
        ap.add_argument("gguf")
        ap.add_argument("--threads", default="1,2")
        ap.add_argument("--prompt-len", type=int, default=128)
        ap.add_argument("--decode-tokens", type=int, default=64)
        ap.add_argument("--repeats", type=int, default=3)
        ap.add_argument("--warmup", type=int, default=1)
        a = ap.parse_args(args[1:])
        res = bench_gguf(
            a.gguf,
            threads=[int(x) for x in a.threads.split(",")],
            prompt_len=a.prompt_len,
            decode_tokens=a.decode_tokens,
            repeats=a.repeats,
            warmup=a.warmup,
            log=lambda m: print(m, file=sys.stderr),
        )
        print(json.dumps(res, indent=2))
        return 0
    print(main.__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
