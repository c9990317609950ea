"""Core ML export of the Phi-3 family: our torch model, the exporter, a numpy ML Program interpreter.

The export limits live here, importable without numpy, torch or coremltools (the CLI's flags use them)."""

WEIGHT_MODES = ("int4", "int8", "fp16")
DEFAULT_CONTEXT = 2048
# shapes and token ids pass through uint16 in the converted graph; the mask is one wider than the context
MAX_CONTEXT = 65534


def import_coremltools():
    """coremltools, imported with its import-time warnings held back: on Linux it logs each Core ML framework
    class it cannot load (there are none there) and each torch / xgboost version it has not tested, about ten
    lines before any of ours, a bad flag's one line included. Its later warnings are kept."""
    import logging

    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import coremltools
    finally:
        logger.setLevel(level)
    return coremltools
