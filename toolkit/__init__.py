"""phi3-toolkit: compile, quantize and run Phi-3 family models with Apache TVM and Core ML."""

__version__ = "0.1.0"
