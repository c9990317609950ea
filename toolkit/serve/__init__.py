"""`phi3 serve`: an OpenAI-compatible HTTP server with continuous batching on the paged KV cache."""
