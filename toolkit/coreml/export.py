"""`phi3 export-coreml`: a Phi-3 checkpoint -> one stateful Core ML `.mlpackage` (ML Program, iOS 18).

Memory-bounded by construction. A plain `ct.convert` of a Phi-3-mini holds the fp16 model in torch, again as
MIL consts, and again while quantizing: ~23 GB measured. Here no full-size weight ever exists in memory:
1. Our torch model (`torch_model.Phi3ForExport`) is built with every matrix replaced by a stride-0 placeholder
   (one number broadcast to the full shape; a distinct number per matrix so it can be found again). The torch
   model and the graph are fp32 so that the frontend never promotes (= copies) a weight.
2. It is traced and converted to a pymil Program with an empty pass pipeline: the placeholders stay stride-0.
3. The real weights are streamed from the checkpoint one tensor at a time; each placeholder const is replaced
   by its final form: int4 per-block-32 (or int8 per-channel) `constexpr_blockwise_shift_scale` with fp16
   scales, or an fp16 const, followed by a cast to fp32 that the fp16 pass later cancels. Only matrices of
   linear layers and the embedding gather are quantized; the RoPE tables and norms stay fp16.
4. The default coremltools pipeline (fp16 compute precision) runs on the finished Program, which is written
   to a temp package and renamed into place.
Peak memory is about the final weights in their stored form (int4 data is held one byte per weight by
pymil) plus one checkpoint tensor. Measured peak RSS for Phi-3-mini shapes, int4, context 2048
(examples/bench_coreml_phi3_mini.py, 50 ms samples of VmRSS, which includes file-backed pages): 2.48 GB at 8
layers; 8.6 GB for all 32 layers, measured before the KV caches were traced in fp16 (that saves 0.8 GB) and
not re-measured since. Minute samples of that run stayed <= 6.1 GB, so the peak is a transient in the
optimize+write stage (coremltools passes and serialization), not held weights. `--weights fp16` holds two
bytes per weight: a full Phi-3-mini needs the model's 7.6 GB on top of the base.

The interface is swift-transformers' stateful `LanguageModel` (names, shapes and metadata in
`swift_transformers.py`), and the tokenizer files it loads are written next to the package
(`model_folder.py`), so an app loads the export with `LanguageModel.loadCompiled` and generates with its API.

One function with RangeDim query length serves prefill and decode: a single weight set, any prompt length, and
the simplest app code. The price is that a dynamic shape usually keeps Core ML on GPU/CPU rather than the ANE;
an ANE-first build would add fixed-shape functions (EnumeratedShapes or a multifunction package).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import DEFAULT_CONTEXT, MAX_CONTEXT, WEIGHT_MODES

INT4_BLOCK = 32
# swift-transformers refuses a stateful model whose query-length range spans less than 2 (whichever way
# Core ML reports the range's length)
MIN_CONTEXT = 4
METADATA_KEY = "phi3.export"


@dataclass
class ExportResult:
    path: Path
    weights: str
    context: int
    seconds: float
    size_bytes: int
    files: list[Path] = field(default_factory=list)  # tokenizer/config files written next to the package
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _package_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_op_name(tensor_name: str) -> str:
    """Name of the op holding a checkpoint tensor in the exported program (used by verify to read it back)."""
    return "w_" + tensor_name.replace(".", "_")


def quantize_rows(w: np.ndarray, bits: int, block: int, rows_per_chunk: int = 2048):
    """Symmetric per-block quantization along the input axis (axis 1): (int data, fp16 scale [N, K/block]).

    Same math as coremltools' LINEAR_SYMMETRIC (range +-(2^(bits-1)-1), round half to even), except that the
    scale is rounded to fp16 *before* quantizing, so data and the stored scale agree. Row chunks keep the
    temporaries small; all-zero blocks get scale 0 and data 0.
    """
    from coremltools.converters.mil.mil import types

    n, k = w.shape
    if k % block:
        raise ValueError(f"input size {k} is not a multiple of the block size {block}")
    qmax = 2 ** (bits - 1) - 1
    np_dtype = types.nptype_from_builtin(types.int4 if bits == 4 else types.int8)
    data = np.empty((n, k), dtype=np_dtype)
    scale = np.empty((n, k // block), dtype=np.float16)
    for r0 in range(0, n, rows_per_chunk):
        wb = w[r0 : r0 + rows_per_chunk].astype(np.float32).reshape(-1, k // block, block)
        s16 = (np.abs(wb).max(axis=-1) / qmax).astype(np.float16)
        s = s16.astype(np.float32)
        s = np.where(s > 0, s, 1.0)[..., None]
        data[r0 : r0 + rows_per_chunk] = np.clip(np.rint(wb / s), -qmax, qmax).reshape(-1, k).astype(np.int8)
        scale[r0 : r0 + rows_per_chunk] = s16
    return data, scale


def _placeholder_value(index: int) -> float:
    # distinct, exactly representable and tiny (the trace runs a forward pass on these, so avoid overflow)
    return (1 + index / 1024) * 2.0**-12


def _build_placeholder_model(src, context: int):
    import torch

    from .torch_model import Phi3ForExport

    cfg = src.config
    model = Phi3ForExport(cfg, context, torch.float32, weight_device="meta", cache_dtype=torch.float16).eval()
    matrices: list[str] = []
    small: list[str] = []
    for name, p in list(model.named_parameters()):
        module = model.get_submodule(name.rsplit(".", 1)[0])
        attr = name.rsplit(".", 1)[1]
        if p.ndim == 2:
            value = torch.full((1, 1), _placeholder_value(len(matrices)), dtype=torch.float32).expand(p.shape)
            matrices.append(name)
        else:
            value = torch.zeros(p.shape, dtype=torch.float32)
            small.append(name)
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    if len(matrices) > 1024:
        raise ValueError("too many matrices for distinct placeholder values")
    loaded = model.load_tensors(src.iter_tensors(small))
    if set(small) - loaded:
        raise UserError(f"checkpoint lacks {sorted(set(small) - loaded)}", src.path)
    return model, matrices, {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n in small}


def _convert_frontend(model, context: int):
    from . import import_coremltools

    ct = import_coremltools()
    import torch

    from .torch_model import CAUSAL_MASK, INPUT_IDS, KEY_CACHE, LOGITS, VALUE_CACHE

    # a past of 1 so both cache slices are non-trivial; one mask row, as swift-transformers passes it
    example = (torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 1, 1, 4))
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    model.reset_cache()  # the trace ran a forward pass into the cache buffers
    q_dim = ct.RangeDim(1, context, default=1, symbol="query_length")
    # own symbols for the mask: swift-transformers sends 1 row whatever q is, and keys + 1 columns
    rows_dim = ct.RangeDim(1, context, default=1, symbol="mask_rows")
    width_dim = ct.RangeDim(2, context + 1, default=2, symbol="mask_width")
    kv = ct.TensorType(shape=model.kv_shape, dtype=np.float16)
    return ct.convert(
        traced,
        inputs=[
            ct.TensorType(INPUT_IDS, shape=(1, q_dim), dtype=np.int32),
            ct.TensorType(CAUSAL_MASK, shape=(1, 1, rows_dim, width_dim), dtype=np.float16),
        ],
        outputs=[ct.TensorType(LOGITS, dtype=np.float16)],
        states=[ct.StateType(kv, name=KEY_CACHE), ct.StateType(kv, name=VALUE_CACHE)],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        convert_to="milinternal",
        pass_pipeline=ct.PassPipeline.EMPTY,
    )


def _find_placeholders(func, matrices: list[str]) -> dict[str, object]:
    found: dict[str, object] = {}
    for op in func.operations:
        if op.op_type != "const":
            continue
        v = op.outputs[0].val
        if isinstance(v, np.ndarray) and v.ndim == 2 and v.size > 1 and v.strides == (0, 0):
            index = round((float(v.flat[0]) / 2.0**-12 - 1) * 1024)
            found[matrices[index]] = op
    missing = set(matrices) - set(found)
    if missing:
        raise RuntimeError(f"placeholders lost in conversion (a weight was copied): {sorted(missing)[:4]}")
    return found


def _rename_small_params(func, small: dict[str, np.ndarray]) -> None:
    """Give the norm weights our op names too (the frontend names a param's const after the param), so that
    verify can rebuild the reference model from the package alone."""
    by_name = {op.name: op for op in func.operations if op.op_type == "const"}
    for name, value in small.items():
        op = by_name.get(name)
        if op is None:
            raise RuntimeError(f"no const for {name} after conversion")
        _replace_weight(op, name, value, "fp16")


def _replace_weight(op, name: str, w: np.ndarray, mode: str) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo

    scopes = [ScopeInfo(source=k, data=v) for k, v in op.scopes.items()]
    op_name = weight_op_name(name)
    with mb.scope(*scopes):
        if mode == "fp16":
            weight = mb.const(val=w.astype(np.float16), name=op_name, before_op=op)
        else:
            bits, block = (4, INT4_BLOCK) if mode == "int4" else (8, w.shape[1])
            data, scale = quantize_rows(w, bits, block)
            weight = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, name=op_name, before_op=op)
        # the graph is fp32 until the fp16 pass, which cancels this cast against its own
        weight32 = mb.cast(x=weight, dtype="fp32", name=op_name + "_fp32", before_op=op)
    block = op.enclosing_block
    block.replace_uses_of_var_after_op(anchor_op=weight32.op, old_var=op.outputs[0], new_var=weight32)
    block.remove_ops([op])


def _check_args(src, output: Path, context: int, weights: str) -> None:
    cfg = src.config
    if weights not in WEIGHT_MODES:
        raise UserError(f"--weights must be one of {', '.join(WEIGHT_MODES)}, not {weights!r}")
    if output.suffix != ".mlpackage":
        raise UserError("output must end in .mlpackage", output)
    if not output.parent.is_dir():
        raise UserError("output folder does not exist", output.parent)
    top = min(cfg.max_position_embeddings, MAX_CONTEXT)
    if not MIN_CONTEXT <= context <= top:
        raise UserError(
            f"--context {context} out of range {MIN_CONTEXT}..{top} "
            f"(swift-transformers needs a query range of at least 2, the model's max_position_embeddings, "
            f"and {MAX_CONTEXT} for Core ML's uint16 index casts)"
        )
    if weights == "int4":
        for n in (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim):
            if n % INT4_BLOCK:
                raise UserError(
                    f"int4 needs input sizes divisible by {INT4_BLOCK} (got {n}); try --weights int8"
                )


def export_coreml(
    model_path: str | Path | None,
    output: str | Path,
    *,
    context: int | None = None,
    weights: str = "int4",
    progress: bool = True,
    tokenizer_files: bool = True,
) -> ExportResult:
    """Export a checkpoint to `output` (.mlpackage) and, with `tokenizer_files`, the tokenizer/config files
    swift-transformers loads into the same folder. Raises UserError for bad input; never leaves a partial
    package or file under an output name."""
    from . import import_coremltools

    ct = import_coremltools()
    import torch
    from tqdm import tqdm

    from ..checkpoint import open_model
    from .model_folder import write_model_folder
    from .swift_transformers import exporters_metadata
    from .torch_model import CAUSAL_MASK, INPUT_IDS, KEY_CACHE, LOGITS, VALUE_CACHE

    t_start = time.perf_counter()
    output = Path(output)
    src = open_model(model_path)
    cfg = src.config
    context = context or min(DEFAULT_CONTEXT, cfg.max_position_embeddings)
    _check_args(src, output, context, weights)
    if tokenizer_files:
        try:
            src.tokenizer()  # fail before the long part, not after it
        except UserError as e:
            raise UserError(f"{e} (or pass --no-tokenizer-files)") from None
    stages: dict[str, float] = {}
    torch.set_grad_enabled(False)

    def stage(name: str, t0: float) -> float:
        now = time.perf_counter()
        stages[name] = round(now - t0, 2)
        return now

    t = time.perf_counter()
    with tqdm(total=2, desc="trace", disable=not progress) as bar:
        model, matrices, small = _build_placeholder_model(src, context)
        bar.update()
        prog = _convert_frontend(model, context)
        bar.update()
    del model
    t = stage("trace+frontend", t)

    func = prog.functions["main"]
    placeholders = _find_placeholders(func, matrices)
    bar = tqdm(total=len(matrices), desc=f"weights ({weights})", unit="tensor", disable=not progress)
    with func, bar:
        _rename_small_params(func, small)
        for name, w in src.iter_tensors(matrices):
            _replace_weight(placeholders.pop(name), name, w, weights)
            del w
            bar.update()
    t = stage("weights", t)

    tmp = output.parent / f".tmp-{os.getpid()}-{output.name}"  # coremltools insists on the suffix
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tqdm(total=2, desc="optimize+write", disable=not progress) as bar:
            ml = ct.convert(
                prog,
                minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16,
                convert_to="mlprogram",
                skip_model_load=True,
            )
            del prog
            bar.update()
            ml.short_description = f"Phi-3 decoder, stateful KV cache, context {context}, weights {weights}"
            ml.input_description[INPUT_IDS] = "token ids (1, q): q = prompt length for prefill, 1 to decode"
            ml.input_description[CAUSAL_MASK] = (
                "(1, 1, 1 or q, past+q+1), zeros as swift-transformers sends them: only its width is needed "
                "(past = width-1-q); causality and the sliding window are built in; nonzero values are added"
            )
            ml.output_description[LOGITS] = "next-token logits (1, q, vocab)"
            meta = {
                "config": cfg.to_dict(),
                "context": context,
                "weights": weights,
                "int4_block": INT4_BLOCK if weights == "int4" else None,
                "states": [KEY_CACHE, VALUE_CACHE],
            }
            ml.user_defined_metadata[METADATA_KEY] = json.dumps(meta)
            hf = exporters_metadata(_model_name(src), "Phi3ForCausalLM", weights)
            ml.user_defined_metadata.update(hf)
            ml.save(str(tmp))
            bar.update()
        del ml
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = stage("optimize+write", t)
    files = write_model_folder(src, output.parent, context=context) if tokenizer_files else []
    stage("tokenizer files", t)
    return ExportResult(
        path=output,
        weights=weights,
        context=context,
        seconds=round(time.perf_counter() - t_start, 2),
        size_bytes=_package_size(output),
        files=files,
        stage_seconds=stages,
    )


def _model_name(src) -> str:
    """`co.huggingface.exporters.name`: the Hub id the checkpoint came from if its config records one (apps
    that pass no tokenizer fetch it from there), else the checkpoint's file or folder name."""
    if src.kind == "hf":
        try:
            name = json.loads((src.path / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError):
            name = None
        if isinstance(name, str) and name.count("/") == 1 and not Path(name).is_absolute():
            return name
    return src.path.stem if src.path.is_file() else src.path.name


def read_export_metadata(spec) -> dict | None:
    """The metadata we stored in a package's spec, or None for a package we did not write."""
    raw = spec.description.metadata.userDefined.get(METADATA_KEY)
    return json.loads(raw) if raw else None
