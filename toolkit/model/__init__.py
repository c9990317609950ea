"""Model graphs: Phi-3 in tvm.relax.frontend.nn (phi3.py) and our RoPE kernel (rope.py)."""

from ..tvm_compat import fast_script_frames, memo_script_sources

fast_script_frames()
memo_script_sources()
