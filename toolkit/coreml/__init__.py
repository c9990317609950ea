"""Core ML export of the Phi-3 family: our torch model, the exporter, a numpy ML Program interpreter.

The export limits live here, importable without numpy, torch or coremltools (the CLI's flags use them)."""

WEIGHT_MODES = ("int4", "int8", "fp16")
DEFAULT_CONTEXT = 2048
# shapes and token ids pass through uint16 in the converted graph; the mask is one wider than the context
MAX_CONTEXT = 65534
