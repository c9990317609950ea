"""Checkpoint conversion into MLC-LLM's weight folder (`converter.py`: weights; `gen_config.py`: tokenizer
files and mlc-chat-config.json). The format itself lives in `toolkit/checkpoint/mlc_format/`."""
