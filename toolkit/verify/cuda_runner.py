"""Run the nvcc-compiled kernels of a CUDA preset on a real NVIDIA GPU and compare with the llvm reference.

Two halves, so the GPU machine needs no TVM: `make_bundle` (here, with TVM) writes the fatbin the library
ships, every kernel launch (kernel-parameter order and grid/block sizes from the lowered TIR), random
inputs and the llvm outputs of the unscheduled PrimFuncs; `run_bundle` (there: numpy + CuPy only) loads the
fatbin with cuModuleLoadData, launches each kernel and compares.
Run it as `python3 toolkit/verify/cuda_runner.py BUNDLE...`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def make_bundle(unscheduled, scheduled, preset, out_dir, shape_value: int = 7, seed: int = 0) -> dict:
    """Write fatbin + launches + inputs/expected outputs for every runnable PrimFunc of `scheduled`."""
    import tvm

    from ..compile.cuda_aot import nvcc_compile
    from ..compile.gpu_schedule import has_thread_binding
    from ..compile.kernel_info import NO_CSE, describe, eval_extent
    from .verify import TOLERANCE, random_inputs, retarget, run_reference

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = preset.target
    runnable = retarget(scheduled, target)
    skip = [gv.name_hint for gv, f in unscheduled.functions_items() if has_thread_binding(f)]
    runnable = tvm.IRModule({gv: f for gv, f in runnable.functions_items() if gv.name_hint not in skip})
    with tvm.transform.PassContext(config=NO_CSE):
        built = tvm.compile(runnable, target=tvm.target.Target(target, tvm.target.Target("llvm")))
    source = next(m for m in built.mod.imports if m.kind == "cuda").inspect_source()
    fatbin, _log = nvcc_compile(source, preset, "fatbin")
    (out / "kernels.fatbin").write_bytes(fatbin)
    rng = np.random.default_rng(seed)
    arrays, funcs = {}, []
    for name, info in sorted(describe(runnable, target).items()):
        values = {v: shape_value for v in info.shape_vars} | {v: 0 for v in info.offset_vars}
        inputs = random_inputs(info, values, rng)
        values |= {p.name: int(inputs[p.name]) for p in info.params if p.shape is None}
        expected = run_reference(unscheduled[name], info, inputs)
        outputs = [p.name for p in info.params if not np.array_equal(expected[p.name], inputs[p.name])]
        for p in info.params:
            arrays[f"{name}/in/{p.name}"] = inputs[p.name]
        for o in outputs:
            arrays[f"{name}/ref/{o}"] = expected[o]
        launches = []
        for k in info.kernels:
            grid, block = k.grid(values)
            params = []
            for p in k.params:
                if p.is_buffer:
                    params.append({"buffer": p.source})
                else:
                    params.append({"scalar": eval_extent(p.source, values), "dtype": p.dtype})
            dyn = 0 if k.dyn_shared_bytes is None else eval_extent(k.dyn_shared_bytes, values)
            launches.append(
                {"name": k.name, "grid": grid, "block": block, "params": params, "dyn_shared": dyn}
            )
        tol = {o: TOLERANCE.get(str(expected[o].dtype), 0.0) for o in outputs}
        funcs.append(
            {
                "func": name,
                "params": [p.name for p in info.params if p.shape is not None],
                "outputs": outputs,
                "tolerance": tol,
                "launches": launches,
            }
        )
    np.savez(out / "arrays.npz", **arrays)
    manifest = {
        "preset": preset.name,
        "arch": preset.cuda_arch,
        "funcs": funcs,
        "not_run_pre_scheduled": skip,
    }
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def run_bundle(bundle_dir) -> list[dict]:
    """Launch every kernel of a bundle on the current CUDA device (CuPy) and compare with the reference."""
    import cupy as cp

    bundle = Path(bundle_dir)
    manifest = json.loads((bundle / "bundle.json").read_text())
    arrays = np.load(bundle / "arrays.npz")
    module = cp.cuda.function.Module()
    module.load(bytes((bundle / "kernels.fatbin").read_bytes()))  # cuModuleLoadData: picks SASS or JITs PTX
    results = []
    for f in manifest["funcs"]:
        name = f["func"]
        dev = {p: cp.asarray(arrays[f"{name}/in/{p}"]) for p in f["params"]}
        for launch in f["launches"]:
            kernel = module.get_function(launch["name"])
            args = [
                dev[p["buffer"]] if "buffer" in p else np.dtype(p["dtype"]).type(p["scalar"])
                for p in launch["params"]
            ]
            dyn = launch.get("dyn_shared", 0)
            if dyn > 48 * 1024:  # above 48 KB a kernel must opt in (CUDA programming guide)
                # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8, as TVM's CUDA runtime sets it
                cp.cuda.driver.funcSetAttribute(kernel.ptr, 8, dyn)
            kernel(tuple(launch["grid"]), tuple(launch["block"]), tuple(args), shared_mem=dyn)
        cp.cuda.Device().synchronize()
        worst = (0.0, 0.0, "")
        ok = True
        for o in f["outputs"]:
            ref = arrays[f"{name}/ref/{o}"].astype(np.float64)
            got = cp.asnumpy(dev[o]).astype(np.float64)
            tol = f["tolerance"][o]
            err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-30)) if ref.size else 0.0
            if tol == 0.0:
                err = 0.0 if np.array_equal(got, ref) else float("inf")
            ok &= err <= tol
            if err >= worst[0]:
                worst = (err, tol, o)
        results.append(
            {"func": name, "ok": bool(ok), "error": worst[0], "tolerance": worst[1], "buffer": worst[2]}
        )
    return results


if __name__ == "__main__":
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()} sm_{props['major']}{props['minor']}")
    failed = 0
    for directory in sys.argv[1:]:
        for r in run_bundle(directory):
            failed += not r["ok"]
            status = "ok " if r["ok"] else "BAD"
            print(f"{directory} {status} {r['func']} err {r['error']:.2e} tol {r['tolerance']:.0e}")
    print("FAILED" if failed else "ALL OK", failed)
    sys.exit(1 if failed else 0)
