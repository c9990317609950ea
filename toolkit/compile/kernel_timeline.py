"""A timeline build: every kernel call of the Relax functions followed by a call of the packed function
`TICK` with the kernel's name, so a host (examples/kernel_timeline.py) can time each call of a whole decode
step, in model order, with the thread pool as decode runs it. `perf` cannot: the library's kernel bodies
carry no symbols. Only for measurement: the library needs `TICK` registered before it is loaded."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir import IRModule

TICK = "phi3.kernel_tick"
START = "<start>"  # the first tick of each function call: the times that follow are each call's own


def _callee(call: relax.Call, mod: IRModule) -> str | None:
    """The kernel a binding runs: a TIR function of the module or a packed function (the KV cache's
    builtins); None for the VM's own operators (allocations, shape checks)."""
    op = call.op
    if isinstance(op, relax.ExternFunc):
        return op.global_symbol
    if isinstance(op, relax.GlobalVar) and not isinstance(mod[op], relax.Function):
        return op.name_hint
    return None


def _tick(name: str) -> relax.VarBinding:
    call = relax.Call(relax.ExternFunc(TICK), [tvm.ir.StringImm(name)], ty_args=[relax.ObjectType()])
    return relax.VarBinding(relax.Var("tick", relax.ObjectType()), relax.BlockBuilder().normalize(call))


def insert_ticks(mod: IRModule) -> IRModule:
    """After CallTIRRewrite (kernel calls are plain calls, no dataflow blocks): a `TICK` binding after each
    kernel call and one at the start of each function."""
    out = IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        blocks = []
        for i, block in enumerate(func.body.blocks):
            bindings = [_tick(START)] if i == 0 else []
            for b in block.bindings:
                bindings.append(b)
                value = b.value if isinstance(b, relax.VarBinding) else None
                name = _callee(value, mod) if isinstance(value, relax.Call) else None
                if name is not None:
                    bindings.append(_tick(name))
            blocks.append(relax.BindingBlock(bindings))
        body = relax.SeqExpr(blocks, func.body.body)
        out[gv] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
    return out
