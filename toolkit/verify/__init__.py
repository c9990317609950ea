"""Kernel verification on GPU APIs available without the device: WGSL, OpenCL, nvcc, MSL parsing."""
