"""`phi3 quant-report --ppl`: every scheme a model can take, side by side: bits per weight and perplexity.

Each scheme is converted into a temp folder (removed after), loaded and scored with `perplexity` (the code
`phi3 eval` runs) over the same token ids, so the rows differ only in the weights.

Bits per weight count the 2-D weight matrices only (embedding, attention and MLP projections, lm_head when
untied): the bytes of every converted param with 2 or more dimensions (codes, scales, mins, or the plain
matrix) over the element count of the source's 2-D weights. 1-D norm weights stay float in every scheme and
are left out, so q0f32 is exactly 32 and q4f16_1 exactly 4.5 (4-bit codes + one fp16 scale per 32).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from ..checkpoint import ModelSource

NATIVE = "native"  # a GGUF's own blocks (`native_quantization`)
REFERENCE = "q0f32"  # full precision: the Δ column is against this row
GROUP_METHODS = ("rtn", "search", "weighted", "gptq")  # converter CLIP_METHODS less "auto"
CHEAP_METHODS = ("rtn", "weighted")  # a bare group scheme expands to these; gptq costs hours at Phi-3 size
DEFAULT_SCHEMES = (NATIVE, REFERENCE, "q4f16_1", "gguf_q4_0", "gguf_q4_1", "gguf_q8_0")


@dataclass(frozen=True)
class SchemeSpec:
    scheme: str  # a registry name, or NATIVE until resolved against the model
    method: str  # clip method for group schemes; "-" where there is no choice


@dataclass
class SchemeRow:
    scheme: str
    method: str
    bits_per_weight: float
    perplexity: float
    delta: float | None  # perplexity - the q0f32 row's (None without a q0f32 row)
    tokens_scored: int
    weights_counted: int
    weight_bytes: int


def parse_schemes(text: str) -> list[SchemeSpec]:
    """`a,b:method,...` -> specs, checked without touching the model (ValueError names the bad entry).
    A bare group scheme (q4f16_1, q4f32_1) stands for one row per cheap clip method (rtn, weighted)."""
    from ..quantization import get_scheme

    specs: list[SchemeSpec] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, method = (p.strip() for p in item.partition(":"))
        if name == NATIVE:
            if method:
                raise ValueError(f"{item!r}: the native scheme takes no method")
            specs.append(SchemeSpec(NATIVE, "-"))
            continue
        try:
            scheme = get_scheme(name)
        except UserError:
            raise ValueError(f"unknown scheme {name!r}") from None
        if scheme.kind == "group":
            if method and method not in GROUP_METHODS:
                raise ValueError(f"{item!r}: unknown method {method!r}; known: {', '.join(GROUP_METHODS)}")
            specs += [SchemeSpec(scheme.name, m) for m in ((method,) if method else CHEAP_METHODS)]
        elif method:
            raise ValueError(f"{item!r}: only q4f16_1/q4f32_1 take a clip method")
        else:
            specs.append(SchemeSpec(scheme.name, "-"))
    if not specs:
        raise ValueError("no schemes given")
    unique = list(dict.fromkeys(specs))  # a repeat would only cost a second identical run
    return unique


def resolve_native(specs: list[SchemeSpec], source: ModelSource, *, explicit: bool) -> list[SchemeSpec]:
    """Replace NATIVE by the GGUF's own scheme (method "native"). Not a GGUF (or blocks we lack): dropped
    from the default list, an error when asked for by name."""
    from ..quantization import native_quantization

    native = native_quantization(source)
    out = []
    for s in specs:
        if s.scheme != NATIVE:
            out.append(s)
        elif native:
            out.append(SchemeSpec(native, NATIVE))
        elif explicit:
            raise UserError("has no native quantized scheme (not a GGUF in blocks we read)", source.path)
    return list(dict.fromkeys(out))


def weight_bits(out_dir: Path, source: ModelSource) -> tuple[float, int, int]:
    """(bits per weight, weights counted, their bytes) of a converted folder; see the module docstring."""
    meta = json.loads((out_dir / "tensor-cache.json").read_text())
    nbytes = sum(r["nbytes"] for shard in meta["records"] for r in shard["records"] if len(r["shape"]) >= 2)
    count = 0
    for name in source.tensor_names():
        shape = source.tensor_shape(name)
        if len(shape) == 2:
            count += math.prod(shape)
    return 8.0 * nbytes / count, count, nbytes


def scheme_table(
    source: ModelSource,
    specs: list[SchemeSpec],
    ids: list[int],
    *,
    context: int,
    stride: int | None,
    max_tokens: int | None,
    device: str = "host",
    threads: int | None = None,
    progress: bool = True,
    log=None,
) -> dict[str, Any]:
    """Convert, load and score each spec in turn. `log(str)` hears of each step (None: quiet)."""
    from ..convert.converter import convert
    from .engine import CacheOptions, load_engine
    from .perplexity import perplexity

    rows: list[SchemeRow] = []
    cache = CacheOptions(max_batch_size=1, context_window=context, prefill_chunk=context)
    for spec in specs:
        tmp = Path(tempfile.mkdtemp(prefix="phi3-qtable-"))
        try:
            out = tmp / "weights"
            clip = spec.method if spec.method in GROUP_METHODS else "auto"
            if log:
                log(f"{spec.scheme} ({spec.method}): converting")
            convert(source, spec.scheme, out, clip=clip, progress=progress)
            bpw, count, nbytes = weight_bits(out, source)
            if log:
                log(f"{spec.scheme} ({spec.method}): {bpw:.3f} bits/weight; scoring")
            engine, _ = load_engine(str(out), device=device, threads=threads, cache=cache)
            res = perplexity(engine, ids, context=context, stride=stride, max_tokens=max_tokens)
            del engine  # its weights live in TVM arrays: let them go before the next scheme loads
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append(
            SchemeRow(spec.scheme, spec.method, bpw, res.perplexity, None, res.tokens_scored, count, nbytes)
        )
    ref = next((r.perplexity for r in rows if r.scheme == REFERENCE), None)
    for r in rows:
        r.delta = None if ref is None else r.perplexity - ref
    return {
        "model": str(source.path),
        "device": device,
        "context": context,
        "stride": stride or context // 2,
        "max_tokens": max_tokens,
        "reference": REFERENCE if ref is not None else None,
        "counted": "2-D weight matrices (embedding, projections, untied lm_head); 1-D norms left out",
        "rows": [asdict(r) for r in rows],
    }


def format_table(report: dict[str, Any]) -> str:
    head = f"{'scheme':<32} {'method':<9} {'bits/weight':>11} {'perplexity':>11} {'Δ vs q0f32':>11}"
    lines = [head]
    for r in report["rows"]:
        delta = "" if r["delta"] is None else f"{r['delta']:+11.4f}"
        bpw, ppl = r["bits_per_weight"], r["perplexity"]
        lines.append(f"{r['scheme']:<32} {r['method']:<9} {bpw:11.4f} {ppl:11.4f} {delta:>11}")
    lines.append(f"bits/weight over {report['counted']}; {report['rows'][0]['tokens_scored']} tokens scored")
    return "\n".join(lines)


def plot_table(report: dict[str, Any], out_png: str | Path) -> Path:
    """Scatter of bits per weight against perplexity, one labelled point per row (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..outputs import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for r in report["rows"]:
        ax.scatter(r["bits_per_weight"], r["perplexity"], s=24)
        label = r["scheme"] if r["method"] == "-" else f"{r['scheme']} ({r['method']})"
        ax.annotate(label, (r["bits_per_weight"], r["perplexity"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (2-D weight matrices)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity vs size: {Path(report['model']).name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return save_figure(fig, out_png)
    finally:
        plt.close(fig)


def write_json(report: dict[str, Any], out: str | Path) -> Path:
    """The report as JSON, under a temp name then renamed (never a half-written file)."""
    import os

    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    return out
