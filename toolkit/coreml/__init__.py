"""Core ML export of the Phi-3 family: our torch model, the exporter, a numpy ML Program interpreter."""
