"""`phi3 verify-coreml`: does an exported package compute our Phi-3 model? Checked without a Mac.

The reference is our torch model (`torch_model.Phi3ForExport`, itself tested against transformers) in fp32,
loaded with the package's own weights (int4/int8 dequantized exactly as the constexpr op defines), so the
comparison isolates the graph: slicing, state updates, dynamic shapes, RoPE selection, masks. The package runs
in our numpy MIL interpreter (`mil_interpreter`), prefill plus N single-token decode steps through its states,
called exactly as swift-transformers' `LanguageModelWithStatefulKVCache` calls it (feature names, all-zero
`causalMask` one column wider than the keys; see `swift_transformers.py`).
With `--model`, the package's weights are also compared with the checkpoint's (quantization error bound per
mode). On macOS, Core ML itself runs the same sequence.

Tolerance for logits: 3e-2 * max(1, max |reference logit|). fp16 storage has a unit roundoff of 4.9e-4; every
op result is rounded, and a layer chains ~15 such roundings plus dot products of length hidden/intermediate
whose rounding errors grow ~sqrt(n). Measured: tiny random 2-layer models <= 0.031 on |logit| <= 6.3 (0.5%);
the embedded SmolLM2-135M (real weights, 30 layers) 0.32 on |logit| 32 (1%). A lost state update gives errors
of order 1 and more (the negative control in tests/test_coreml_export.py).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Phi3Config
from ..errors import UserError
from .export import read_export_metadata, weight_op_name
from .mil_interpreter import MILInterpreter, _blockwise_shift_scale, load_program
from .swift_transformers import INTERFACE
from .torch_model import CAUSAL_MASK, INPUT_IDS, KEY_CACHE, LOGITS, VALUE_CACHE, Phi3ForExport, mask_input

LOGIT_RTOL = 3e-2
# relative RMS weight error allowed against the checkpoint: int4 on Gaussian weights measures ~0.10 (blocks of
# 32, levels +-7), int8 per-channel ~0.01, fp16 ~3e-4
WEIGHT_RTOL = {"int4": 0.2, "int8": 0.03, "fp16": 1e-3}


@dataclass
class VerifyReport:
    package: Path
    weights: str
    context: int
    steps: int
    max_abs_ref: float
    interp_errors: list[float]
    state_error: float
    tolerance: float
    weight_errors: dict[str, float] = field(default_factory=dict)
    coreml_errors: list[float] | None = None

    @property
    def passed(self) -> bool:
        errs = self.interp_errors + (self.coreml_errors or [])
        ok = max(errs) <= self.tolerance and self.state_error <= self.tolerance
        return ok and all(e <= WEIGHT_RTOL[self.weights] for e in self.weight_errors.values())

    def summary(self) -> str:
        lines = [
            f"package {self.package}: weights {self.weights}, context {self.context}",
            f"interpreter (fp16 storage) vs torch reference, prefill + {self.steps - 1} decode steps: "
            f"max |error| {max(self.interp_errors):.3g} (per step: "
            + ", ".join(f"{e:.2g}" for e in self.interp_errors)
            + f"); max |logit| {self.max_abs_ref:.3g}; tolerance {self.tolerance:.3g}",
            f"KV-cache state vs reference: max |error| {self.state_error:.3g}",
        ]
        if self.weight_errors:
            worst = max(self.weight_errors, key=self.weight_errors.get)
            lines.append(
                f"weights vs checkpoint: worst relative RMS error {self.weight_errors[worst]:.3g} ({worst}); "
                f"bound {WEIGHT_RTOL[self.weights]}"
            )
        if self.coreml_errors is not None:
            lines.append(f"Core ML (macOS) vs reference: max |error| {max(self.coreml_errors):.3g}")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def package_tensors(prog, cfg: Phi3Config) -> dict[str, np.ndarray]:
    """Checkpoint-named float32 weights read back from a program we exported (dequantized)."""
    from ..checkpoint import expected_tensor_shapes

    ops = {op.name: op for op in prog.functions["main"].operations}
    out = {}
    for name, shape in expected_tensor_shapes(cfg).items():
        base = weight_op_name(name)
        # const folding renames the norm weights' fp16 consts: base + "_fp32_to_fp16"
        op = ops.get(base) or ops.get(base + "_fp32_to_fp16")
        if op is None and len(shape) == 1:
            # coremltools folds away `mul(x, 1)`: a norm weight of all ones leaves no const behind
            out[name] = np.ones(shape, np.float32)
            continue
        if op is None:
            raise UserError(f"package has no weight {name} (was it written by phi3 export-coreml?)")
        if op.op_type == "constexpr_blockwise_shift_scale":
            args = {
                "data": op.data.val,
                "scale": op.scale.val,
                "offset": None if op.offset is None else op.offset.val,
            }
            value = _blockwise_shift_scale(None, args)
        else:
            value = np.asarray(op.outputs[0].val, dtype=np.float32)
        if tuple(value.shape) != tuple(shape):
            raise UserError(f"package weight {name} has shape {value.shape}, config says {shape}")
        out[name] = value.astype(np.float32)
    return out


def _check_interface(spec) -> None:
    """The names swift-transformers' stateful LanguageModel looks up (swift_transformers.INTERFACE)."""
    got = {
        "input": {i.name for i in spec.description.input},
        "state": {s.name for s in spec.description.state},
        "output": {o.name for o in spec.description.output},
    }
    want = {kind: {f.name for f in INTERFACE if f.kind == kind} for kind in got}
    if got["input"] != want["input"] or got["state"] != want["state"] or not want["output"] <= got["output"]:
        raise UserError(
            "not the swift-transformers interface: "
            + ", ".join(f"{k}s {sorted(v)} (expected {sorted(want[k])})" for k, v in got.items())
        )


def _tokens(cfg: Phi3Config, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).tolist()


def _run_coreml(package: Path, chunks: list[list[int]]) -> list[np.ndarray]:
    """Core ML itself (macOS 15+ only), fed the way swift-transformers feeds it."""
    from . import import_coremltools

    ct = import_coremltools()

    ml = ct.models.MLModel(str(package))
    state = ml.make_state()
    past, out = 0, []
    for chunk in chunks:
        feed = {
            INPUT_IDS: np.array([chunk], np.int32),
            CAUSAL_MASK: mask_input(past, len(chunk), np.float16),
        }
        out.append(np.asarray(ml.predict(feed, state=state)[LOGITS], np.float32)[0])
        past += len(chunk)
    return out


def verify_package(
    package: str | Path,
    model: str | Path | None = None,
    *,
    prompt_len: int = 12,
    decode_steps: int = 8,
    fp16_storage: bool = True,
    seed: int = 0,
    run_coreml: bool | None = None,
) -> VerifyReport:
    """Run the package and the reference on the same random tokens; see the module docstring."""
    import torch

    package = Path(package)
    spec, prog = load_program(package)
    meta = read_export_metadata(spec)
    if meta is None:
        raise UserError("no phi3 export metadata: not a package written by `phi3 export-coreml`", package)
    _check_interface(spec)
    cfg = Phi3Config.from_dict(meta["config"])
    context, weights = int(meta["context"]), meta["weights"]
    if prompt_len + decode_steps > context:
        prompt_len = max(1, context - decode_steps)
        decode_steps = context - prompt_len
    try:
        tensors = package_tensors(prog, cfg)
    except UserError as e:
        raise UserError(str(e), package) from None

    weight_errors: dict[str, float] = {}
    if model is not None:
        from ..checkpoint import open_model

        src = open_model(model)
        if src.config.to_dict() != cfg.to_dict():
            raise UserError("the package was exported from a model with a different config", Path(str(model)))
        for name, w in src.iter_tensors(list(tensors)):
            denom = float(np.sqrt(np.mean(w.astype(np.float64) ** 2))) or 1.0
            weight_errors[name] = float(np.sqrt(np.mean((tensors[name] - w) ** 2)) / denom)

    ref = Phi3ForExport(cfg, context)
    ref.load_tensors(tensors.items())
    del tensors
    tokens = _tokens(cfg, prompt_len + decode_steps, seed)
    chunks = [tokens[:prompt_len]] + [[t] for t in tokens[prompt_len:]]

    interp = MILInterpreter(prog, fp16_storage=fp16_storage)
    ref.reset_cache()
    interp_errors, max_ref, past = [], 0.0, 0
    ref_logits = []
    with torch.no_grad():
        for chunk in chunks:
            mask = mask_input(past, len(chunk))  # what swift-transformers passes: zeros, keys + 1 wide
            expected = ref(torch.tensor([chunk], dtype=torch.int32), torch.from_numpy(mask)).numpy()[0]
            got = interp.predict({INPUT_IDS: np.array([chunk], np.int32), CAUSAL_MASK: mask})[LOGITS]
            got = got.astype(np.float32)[0]
            ref_logits.append(expected)
            interp_errors.append(float(np.abs(got - expected).max()))
            max_ref = max(max_ref, float(np.abs(expected).max()))
            past += len(chunk)
    state_error = 0.0
    for n in (KEY_CACHE, VALUE_CACHE):
        got_state = interp.states[n][..., :past, :].astype(np.float32)
        state_error = max(
            state_error, float(np.abs(got_state - getattr(ref, n)[..., :past, :].numpy()).max())
        )
    tolerance = LOGIT_RTOL * max(1.0, max_ref)

    coreml_errors = None
    if run_coreml is None:
        run_coreml = platform.system() == "Darwin"
    if run_coreml:
        got = _run_coreml(package, chunks)
        coreml_errors = [float(np.abs(g - e).max()) for g, e in zip(got, ref_logits, strict=True)]
    return VerifyReport(
        package=package,
        weights=weights,
        context=context,
        steps=len(chunks),
        max_abs_ref=max_ref,
        interp_errors=interp_errors,
        state_error=state_error,
        tolerance=tolerance,
        weight_errors=weight_errors,
        coreml_errors=coreml_errors,
    )
