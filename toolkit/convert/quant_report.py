"""`phi3 quant-report`: where the bits went. Per weight tensor, the relative RMS reconstruction error
||w - deq(q(w))|| / ||w|| for each way of choosing the q4 scales (rtn, search, weighted), plus a PNG plot.

Errors are against the source weights as read (float32); q4f16_1 also includes the fp16 rounding of w.
The error is unweighted for every method, so "search" (which minimises exactly this) always looks best here,
while "weighted" (which minimises the activation-weighted error) gives the lower perplexity (converter.py).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..quantization import QuantScheme, get_scheme
from ..quantization import group_quant as gq
from ..quantization.clip_search import search_scales
from .converter import should_quantize

if TYPE_CHECKING:
    from ..checkpoint import ModelSource

METHODS = ("rtn", "search", "weighted")


def weight_error_report(
    source: ModelSource, scheme: QuantScheme | str, methods: tuple[str, ...] = METHODS, progress: bool = True
) -> dict[str, Any]:
    """{"scheme", "methods", "tensors": [{"name", "shape", <method>: rel RMS error, ...}], "total": {...}}."""
    scheme = get_scheme(scheme)
    if scheme.kind != "group":  # rtn/search/weighted are ways to choose MLC group scales
        raise ValueError(
            f"{scheme.name} is not an MLC group quantization (q4f16_1, q4f32_1): nothing to report"
        )
    bad = set(methods) - set(METHODS)
    if bad:
        raise ValueError(f"unknown methods {sorted(bad)}; known: {', '.join(METHODS)}")
    names = [n for n in source.tensor_names() if should_quantize(n, source.tensor_shape(n), scheme)]
    stats = None
    if "weighted" in methods:
        from .calibration import activation_stats, calibration_tokens

        stats = activation_stats(source, calibration_tokens(source))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), unit="tensor", desc="quant-report", dynamic_ncols=True)
    rows, sums = [], {m: 0.0 for m in methods}
    total_ref, seconds = 0.0, {m: 0.0 for m in methods}
    for name, w in source.iter_tensors(names):
        row: dict[str, Any] = {"name": name, "shape": list(w.shape)}
        for m in methods:
            t0 = time.perf_counter()
            scales = None
            if m != "rtn":
                act = stats[name].astype("float32") if m == "weighted" else None
                scales = search_scales(w, scheme, act_sq=act)
            q = gq.quantize(w, scheme, scales=scales)
            seconds[m] += time.perf_counter() - t0
            err, ref = gq.squared_errors(w, *q, scheme.layout)
            row[m] = math.sqrt(err / ref) if ref > 0 else 0.0
            sums[m] += err
        total_ref += ref
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    total = {m: math.sqrt(sums[m] / total_ref) if total_ref > 0 else 0.0 for m in methods}
    return {
        "model": str(source.path),
        "scheme": scheme.name,
        "methods": list(methods),
        "tensors": rows,
        "total": total,
        "seconds": seconds,
    }


def _short(name: str) -> str:
    m = re.match(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight", name)
    if m:
        return f"{m.group(1)}.{m.group(2).replace('_proj', '')}"
    return {"model.embed_tokens.weight": "embed", "lm_head.weight": "lm_head"}.get(name, name)


def plot_report(report: dict[str, Any], out_png: str | Path) -> Path:
    """Line plot of relative RMS error per tensor (model order), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["tensors"]
    out_png = Path(out_png)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.12 * len(rows)), 4.5), dpi=120)
    x = list(range(len(rows)))
    for m in report["methods"]:
        ax.plot(
            x, [r[m] for r in rows], marker=".", linewidth=1, label=f"{m} (total {report['total'][m]:.4f})"
        )
    step = max(1, len(rows) // 40)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([_short(r["name"]) for r in rows][::step], rotation=90, fontsize=7)
    ax.set_ylabel("relative RMS error ||w - w_q|| / ||w||")
    ax.set_title(f"{report['scheme']} weight reconstruction error: {Path(report['model']).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
