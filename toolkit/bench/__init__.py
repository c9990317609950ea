"""Benchmarks: our engine against llama.cpp, and the memory-bandwidth roofline of the machine at hand."""
