"""Running a compiled model: the engine (VM + paged KV cache), sampling and text generation."""
