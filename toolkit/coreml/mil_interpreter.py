"""A numpy interpreter for the ML Programs our exporter writes, so a package can be checked on Linux.

Core ML prediction exists only on macOS. The `.mlpackage` is read back into a pymil Program with coremltools'
own milproto loader (the path its `linear_quantize_weights` uses; internal API, hence coremltools is pinned)
and executed op by op, states included. Every op type the exporter emits is implemented from the MIL op specs
(coremltools.converters.mil.mil.ops.defs.iOS18); an op type outside that set raises, it is never skipped.

Modes: `fp16_storage=True` rounds every fp16-typed result to fp16, as Core ML stores them on GPU/ANE
(arithmetic itself in fp32); `False` keeps fp32 throughout, which isolates graph-semantics errors from
precision. Not modelled: Apple's accumulation order and the ANE's reduced-precision internals.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

_NP_DTYPES = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "int64": np.int64,
    "bool": np.bool_,
}


def load_program(package: str | Path):
    """(MLModel spec, pymil Program) for an .mlpackage; a damaged package is a one-line UserError."""
    from . import import_coremltools

    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    if not package.exists():
        raise UserError("no such package", package)
    if not (package / "Manifest.json").is_file():
        raise UserError("not an .mlpackage (no Manifest.json)", package)
    try:
        ml = ct.models.MLModel(str(package), skip_model_load=True)
        spec = ml.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise UserError("not an ML Program package", package)
        prog = load(spec, spec.specificationVersion, ml.weights_dir)
    except UserError:
        raise
    except Exception as e:  # protobuf, blob-storage and loader errors all mean a damaged package
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = f"{type(e).__name__}: {msg[:200]}"
        raise UserError(f"cannot read the Core ML package ({detail})", package) from None
    return spec, prog


def _builtin_np(var) -> type | None:
    from coremltools.converters.mil.mil import types

    dt = var.dtype
    if dt is None:
        return None
    if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type) or types.is_state(var.sym_type):
        name = types.builtin_to_string(dt)
        return _NP_DTYPES.get(name)
    return None


def _np(v: Any) -> np.ndarray:
    return v if isinstance(v, np.ndarray) else np.asarray(v)


def _f(v: np.ndarray) -> np.ndarray:
    """Arithmetic operand: fp16 storage is computed in fp32."""
    return v.astype(np.float32) if v.dtype == np.float16 else v


def _slice_tuple(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    rank = len(shape)
    stride = np.ones(rank, np.int64) if stride is None else stride
    begin_mask = np.zeros(rank, bool) if begin_mask is None else begin_mask
    end_mask = np.zeros(rank, bool) if end_mask is None else end_mask
    squeeze_mask = np.zeros(rank, bool) if squeeze_mask is None else squeeze_mask
    index: list[Any] = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(int(begin[i]))
            continue
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        index.append(slice(b, e, int(stride[i])))
    return tuple(index)


class MILInterpreter:
    """Runs one function of a pymil Program; states persist across `predict` calls until `reset_states`."""

    def __init__(self, prog, function: str = "main", fp16_storage: bool = True) -> None:
        from coremltools.converters.mil.mil import types

        self.func = prog.functions[function]
        self.fp16_storage = fp16_storage
        self._const_cache: dict[str, np.ndarray] = {}
        self.state_names = [n for n, v in self.func.inputs.items() if types.is_state(v.sym_type)]
        self.input_names = [n for n in self.func.inputs if n not in self.state_names]
        self.output_names = [v.name for v in self.func.outputs]
        self.states: dict[str, np.ndarray] = {}
        self.reset_states()
        unknown = sorted({op.op_type for op in self.func.operations} - set(_OPS))
        if unknown:
            raise NotImplementedError(f"the interpreter has no implementation of op type(s) {unknown}")

    def reset_states(self) -> None:
        """Zeroed states, like a fresh `MLModel.make_state()`."""
        for name in self.state_names:
            var = self.func.inputs[name]
            wrapped = var.sym_type.wrapped_type()
            from coremltools.converters.mil.mil import types

            dtype = _NP_DTYPES[types.builtin_to_string(wrapped.get_primitive())]
            self.states[name] = np.zeros(wrapped.get_shape(), dtype)

    def _store(self, var, value) -> np.ndarray:
        value = _np(value)
        dtype = _builtin_np(var)
        if dtype is None:
            return value
        if dtype == np.float16 and not self.fp16_storage:
            return value.astype(np.float32, copy=False)
        return value.astype(dtype, copy=False)

    def _const(self, var) -> np.ndarray:
        cached = self._const_cache.get(var.name)
        if cached is None:
            val = var.val
            if isinstance(val, str):
                cached = np.asarray(val)
            else:
                cached = self._store(var, val)
            self._const_cache[var.name] = cached
        return cached

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise ValueError(f"missing inputs {sorted(missing)}")
        env: dict[str, Any] = {}
        for name in self.input_names:
            env[name] = self._store(self.func.inputs[name], inputs[name])
        for name in self.state_names:
            env[name] = name  # a state var evaluates to its name; read/write ops look it up in self.states
        for op in self.func.operations:
            if op.op_type == "const":
                env[op.outputs[0].name] = self._const(op.outputs[0])
                continue
            if op.op_type.startswith("constexpr_") and op.outputs[0].name in self._const_cache:
                env[op.outputs[0].name] = self._const_cache[op.outputs[0].name]
                continue
            args = {}
            for key, var in op.inputs.items():
                if isinstance(var, (list, tuple)):
                    args[key] = [self._value(env, v) for v in var]
                else:
                    args[key] = self._value(env, var)
            results = _OPS[op.op_type](self, args)
            if not isinstance(results, tuple):
                results = (results,)
            for var, val in zip(op.outputs, results, strict=True):
                env[var.name] = self._store(var, val)
                if op.op_type.startswith("constexpr_"):
                    self._const_cache[var.name] = env[var.name]
        return {name: np.asarray(env[name]) for name in self.output_names}

    def _value(self, env, var):
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return self._const(var)
        raise KeyError(f"value of {var.name} not computed (graph order?)")


# ---- op implementations: fn(interp, args) -> value or tuple of values -------------------------------------


def _binary(fn: Callable) -> Callable:
    return lambda it, a: fn(_f(a["x"]), _f(a["y"]))


def _unary(fn: Callable) -> Callable:
    return lambda it, a: fn(_f(a["x"]))


def _blockwise_shift_scale(it, a):
    data = a["data"].astype(np.float32)
    scale = a["scale"].astype(np.float32)
    offset = a.get("offset")
    # each scale (and offset) entry covers a block of data: repeat it block-size times along every axis
    reps = [d // s for d, s in zip(data.shape, scale.shape, strict=True)]
    for axis, r in enumerate(reps):
        if r > 1:
            scale = np.repeat(scale, r, axis=axis)
            if offset is not None:
                offset = np.repeat(offset, r, axis=axis)
    if offset is not None:
        data = data - offset.astype(np.float32)
    return data * scale


def _slice_by_index(it, a):
    x = a["x"]
    idx = _slice_tuple(
        x.shape,
        a["begin"],
        a["end"],
        a.get("stride"),
        a.get("begin_mask"),
        a.get("end_mask"),
        a.get("squeeze_mask"),
    )
    return x[idx]


def _slice_update(it, a):
    x = a["x"].copy()
    idx = _slice_tuple(
        x.shape,
        a["begin"],
        a["end"],
        a.get("stride"),
        a.get("begin_mask"),
        a.get("end_mask"),
        a.get("squeeze_mask"),
    )
    target = x[idx]
    if target.shape != a["update"].shape:
        raise ValueError(f"slice_update: update {a['update'].shape} does not fit slice {target.shape}")
    x[idx] = a["update"]
    return x


def _read_state(it, a):
    return it.states[str(a["input"])].copy()


def _write_state(it, a):
    name = str(a["input"])
    it.states[name] = a["data"].astype(it.states[name].dtype)
    return ()


def _update_state(it, a):
    name = str(a["state"])
    it.states[name] = a["value"].astype(it.states[name].dtype)
    return a["value"]


def _gather(it, a):
    axis = int(a.get("axis", 0))
    if int(a.get("batch_dims", 0)) != 0:
        raise NotImplementedError("gather with batch_dims")
    indices = a["indices"].astype(np.int64)
    if np.any(indices >= a["x"].shape[axis]) or np.any(indices < -a["x"].shape[axis]):
        raise IndexError(f"gather index out of range for axis size {a['x'].shape[axis]}")
    return np.take(a["x"], indices, axis=axis)


def _linear(it, a):
    y = _f(a["x"]) @ _f(a["weight"]).T
    if a.get("bias") is not None:
        y = y + _f(a["bias"])
    return y


def _matmul(it, a):
    x, y = _f(a["x"]), _f(a["y"])
    if bool(a.get("transpose_x", False)):
        x = np.swapaxes(x, -1, -2)
    if bool(a.get("transpose_y", False)):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _softmax(it, a):
    x = _f(a["x"])
    axis = int(a.get("axis", -1))
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _reduce(fn):
    def run(it, a):
        axes = a.get("axes")
        axes = None if axes is None else tuple(int(i) for i in np.atleast_1d(axes))
        return fn(_f(a["x"]), axis=axes, keepdims=bool(a.get("keep_dims", False)))

    return run


def _concat(it, a):
    if bool(a.get("interleave", False)):
        raise NotImplementedError("concat with interleave")
    return np.concatenate([np.atleast_1d(v) for v in a["values"]], axis=int(a["axis"]))


def _split(it, a):
    x, axis = a["x"], int(a["axis"])
    sizes = a.get("split_sizes")
    if sizes is None:
        n = int(a["num_splits"])
        return tuple(np.split(x, n, axis=axis))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _reshape(it, a):
    return np.reshape(a["x"], [int(s) for s in a["shape"]])


def _cast(it, a):
    dtype = _NP_DTYPES[str(a["dtype"])]
    x = a["x"]
    if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating):
        x = np.trunc(x)  # MIL cast float->int truncates towards zero, like C
    return x.astype(dtype)


def _range_1d(it, a):
    return np.arange(a["start"], a["end"], a["step"])


def _sdpa(it, a):
    q, k, v = _f(a["query"]), _f(a["key"]), _f(a["value"])
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    mask = a.get("attn_mask")
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + _f(mask)
    return _softmax(it, {"x": scores, "axis": -1}) @ v


def _silu(x):
    return x / (1.0 + np.exp(-x))


_OPS: dict[str, Callable] = {
    "const": lambda it, a: None,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "read_state": _read_state,
    "write_state": _write_state,
    "coreml_update_state": _update_state,
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "gather": _gather,
    "linear": _linear,
    "matmul": _matmul,
    "softmax": _softmax,
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "concat": _concat,
    "split": _split,
    "reshape": _reshape,
    "transpose": lambda it, a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "expand_dims": lambda it, a: np.expand_dims(a["x"], tuple(int(i) for i in np.atleast_1d(a["axes"]))),
    "squeeze": lambda it, a: np.squeeze(a["x"], None if a.get("axes") is None else tuple(a["axes"])),
    "tile": lambda it, a: np.tile(a["x"], [int(r) for r in a["reps"]]),
    "shape": lambda it, a: np.asarray(a["x"].shape, np.int32),
    "cast": _cast,
    "identity": lambda it, a: a["x"],
    "range_1d": _range_1d,
    "select": lambda it, a: np.where(a["cond"], _f(a["a"]), _f(a["b"])),
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(lambda x, y: x / y),
    "floor_div": _binary(lambda x, y: np.floor_divide(x, y)),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "pow": _binary(np.power),
    "equal": _binary(np.equal),
    "not_equal": _binary(np.not_equal),
    "less": _binary(np.less),
    "less_equal": _binary(np.less_equal),
    "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "logical_and": _binary(np.logical_and),
    "logical_or": _binary(np.logical_or),
    "logical_not": lambda it, a: np.logical_not(a["x"]),
    "rsqrt": lambda it, a: 1.0 / np.sqrt(_f(a["x"]) + float(a.get("epsilon", 1e-12))),
    "sqrt": _unary(np.sqrt),
    "abs": _unary(np.abs),
    "clip": lambda it, a: np.clip(_f(a["x"]), float(a["alpha"]), float(a["beta"])),
    "exp": _unary(np.exp),
    "sin": _unary(np.sin),
    "cos": _unary(np.cos),
    "tanh": _unary(np.tanh),
    "sigmoid": _unary(lambda x: 1.0 / (1.0 + np.exp(-x))),
    "silu": _unary(_silu),
    "scaled_dot_product_attention": _sdpa,
}
