"""Write the embedded SmolLM2-135M (a Q4_1 GGUF) as a bf16 Hugging Face Phi-3 checkpoint folder.

Why: SmolLM2 is the only real model on this machine, and it comes already quantized. A quantizer measured on
the GGUF starts from Q4_1 grid values; this copy (dequantized to float32, then rounded to bf16, the dtype real
checkpoints ship in) is the "full precision" start for `phi3 convert` quality measurements (issue 18).
The folder is a Phi-3 checkpoint (fused qkv_proj / gate_up_proj, the GGUF reader's mapping), so it takes the
Hugging Face path of the converter, tokenizer included.

Usage: python examples/make_smollm2_bf16.py OUT_DIR [--gguf PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the embedded SmolLM2)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from toolkit.checkpoint import open_model
    from toolkit.convert.gen_config import write_tokenizer_files

    src = open_model(args.gguf)
    cfg = src.config
    out = Path(args.out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {
        name: torch.from_numpy(arr).to(torch.bfloat16)
        for name, arr in src.iter_tensors()
        if not (cfg.tie_word_embeddings and name == "lm_head.weight")
    }
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    hf = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
        "pad_token_id": cfg.pad_token_id,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    write_tokenizer_files(src, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"wrote {out} ({len(tensors)} tensors, bf16)")


if __name__ == "__main__":
    main()
