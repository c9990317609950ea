"""Checkpoint conversion into MLC-LLM's weight format (`converter.py`, `tensor_cache.py`)."""
