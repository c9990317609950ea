"""A small deterministic tokenizer.json for tiny checkpoints, so they run end to end with text in and out.

Byte-level BPE (GPT-2 style: every byte is a token, so any text encodes) trained on a fixed corpus when the
vocabulary has room for the 256 byte tokens; otherwise a character WordLevel with an unknown token. Phi-3's
chat special tokens are added last, as special tokens, when they fit below `vocab_size`.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, my name is Phi. I am a small language model running on a compiled graph.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b\n",
    "numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159",
    "Unicode: héllo wörld, naïve café, 日本語, emoji 🙂🚀",
] * 4


def build_tiny_tokenizer(vocab_size: int, special_tokens: bool = True):
    """A `tokenizers.Tokenizer` whose ids are all < vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(SPECIAL_TOKENS) if special_tokens else []
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size >= len(alphabet) + len(specials) + 1:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(specials),
            initial_alphabet=alphabet,
            show_progress=False,
            min_frequency=2,
        )
        tk.train_from_iterator(_CORPUS, trainer=trainer)
    else:
        chars = sorted({c for line in _CORPUS for c in line if c.isascii()})
        n_plain = max(vocab_size - len(specials), 2)
        vocab = {"<unk>": 0}
        for c in chars[: n_plain - 1]:
            vocab[c] = len(vocab)
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tk.decoder = decoders.Fuse()
        specials = specials[: max(vocab_size - len(vocab), 0)]
    if specials:
        tk.add_special_tokens(specials)
    top = max(tk.get_vocab(with_added_tokens=True).values())
    assert top < vocab_size, (top, vocab_size)
    return tk


def write_tiny_tokenizer(out_dir: str | Path, vocab_size: int, special_tokens: bool = True) -> Path:
    """Write `tokenizer.json` into a (tiny checkpoint) folder and return its path."""
    path = Path(out_dir) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(vocab_size, special_tokens).save(str(path))
    return path
