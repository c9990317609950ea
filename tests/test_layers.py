"""No module imports a higher stage (checkpoint -> model -> quantization -> convert -> compile -> package /
tune / coreml -> runtime -> verify (it runs kernels through the runtime) -> bench / serve / api -> cli),
checked on the source with `ast` (function-level imports included). The few known exceptions are listed
with the work that removes them; a new one fails, and so does a module missing from the stage map."""

from __future__ import annotations

import ast
from pathlib import Path

import toolkit

PKG = Path(toolkit.__file__).resolve().parent
BASE = {  # shared helpers every stage may use
    "__init__", "errors", "config", "hf_schema", "outputs", "locks", "paths", "hostinfo", "targets",
    "tokenizer", "chat_template", "jinja_template", "default_model", "tvm_compat", "kernel_memo",
    "cpu_threads", "read_bandwidth", "hugepages", "interrupts", "row_blocks",
}  # fmt: skip
STAGE = {
    **dict.fromkeys(BASE, 0),
    "checkpoint": 1,
    "model": 2,
    "quantization": 3,
    "convert": 4,
    "compile": 5,
    "backends": 5,
    "package": 6,
    "tune": 6,
    "verify": 7.5,
    "coreml": 6,
    "runtime": 7,
    "bench": 8,
    "serve": 8,
    "api": 8,
    "cli": 9,
}
KNOWN = {
    # the MLC folder reader dequantizes q4 weights with the scheme's numpy codec
    ("toolkit.checkpoint.mlc_source", "toolkit.quantization"),
    # the model builds its quantized layers itself (MLC swaps plain layers with a mutator instead)
    ("toolkit.model.phi3", "toolkit.quantization"),
    ("toolkit.model.phi3", "toolkit.quantization.tvm_layers"),
}


def _stage(module: str) -> int:
    parts = module.split(".")
    return STAGE[parts[1] if len(parts) > 1 else "__init__"]


def _imports(path: Path, module: str) -> set[str]:
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "toolkit":  # `from toolkit import x` / `from .. import x`
                out.update(f"toolkit.{a.name}" for a in node.names if a.name in STAGE)
            elif name.startswith("toolkit."):
                out.add(name)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("toolkit."))
    return out


def test_no_module_imports_a_higher_stage():
    upward = set()
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for target in _imports(path, module):
            if _stage(target) > _stage(module):
                upward.add((module, target))
    assert upward - KNOWN == set(), sorted(upward - KNOWN)
    assert KNOWN - upward == set(), f"fixed, remove from KNOWN: {sorted(KNOWN - upward)}"
