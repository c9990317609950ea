"""Compile stage: Relax/TIR passes, hand kernels and schedules, library build."""

from ..tvm_compat import fast_script_frames, memo_script_sources

fast_script_frames()
memo_script_sources()
