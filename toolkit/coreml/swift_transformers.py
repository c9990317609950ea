"""What swift-transformers needs from a Core ML package and the files next to it (facts, not its code).

Read from huggingface/swift-transformers at commit eec09bdffb04a6f13eaed57c7b4acca3f6729a6c (tag 1.3.3 + 4
commits). Sources/Models and Sources/Generation are unchanged since tag 1.3.3
(2fa33e1f5e7131a7fc64c28e6d161dcec0d24820), the version examples/ios-coreml/Package.swift pins:
- Sources/Models/LanguageModel.swift: feature names (`LanguageModel.Keys`), the stateful call pattern of
  `LanguageModelWithStatefulKVCache.predictNextTokenScores`, `contextRange` (read from the last axis of the
  `inputIds` shape range), `modelName` (user-defined metadata `co.huggingface.exporters.name`).
- Sources/Generation/Generation.swift: prefill with the whole prompt, then the last token per call; EOS is the
  tokenizer's single `eosTokenId`.
- Sources/Hub/Hub.swift (`LanguageModelConfigurationFromHub.loadConfig(modelFolder:)`): a model folder holds
  `tokenizer.json` (required), `tokenizer_config.json`, `config.json`, `chat_template.jinja`/`.json`.
- Sources/Tokenizers/Tokenizer.swift: `tokenizer_config.json` must name `tokenizer_class` (else the model type
  from config.json is guessed); `bos_token`/`eos_token`/`add_bos_token` are read from it.
"""

from __future__ import annotations

from dataclasses import dataclass

SWIFT_TRANSFORMERS_COMMIT = "eec09bdffb04a6f13eaed57c7b4acca3f6729a6c"
SWIFT_TRANSFORMERS_VERSION = "1.3.3"

# LanguageModel.Keys
INPUT_IDS = "inputIds"
CAUSAL_MASK = "causalMask"
KEY_CACHE = "keyCache"
VALUE_CACHE = "valueCache"
LOGITS = "logits"


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # "input", "output" or "state"
    dtype: str  # Core ML array dtype name in the spec: "INT32", "FLOAT16"
    shape: str  # symbolic, for documentation and the spec test


# The stateful interface: swift-transformers feeds inputIds as Int32, causalMask as Float16 zeros of shape
# (1, 1, 1, tokens so far + 1), calls prediction(from:using: state) and reads rank-3 `logits`.
INTERFACE: tuple[Feature, ...] = (
    Feature(INPUT_IDS, "input", "INT32", "(1, q), 1 <= q <= context"),
    Feature(CAUSAL_MASK, "input", "FLOAT16", "(1, 1, 1..context, 2..context+1)"),
    Feature(LOGITS, "output", "FLOAT16", "(1, q, vocab)"),
    Feature(KEY_CACHE, "state", "FLOAT16", "(layers, 1, kv heads, context, head dim)"),
    Feature(VALUE_CACHE, "state", "FLOAT16", "(layers, 1, kv heads, context, head dim)"),
)

# User-defined metadata. swift-transformers reads only `name` (LanguageModel.modelName: the Hub repo it would
# fetch the tokenizer from when none is passed in); the others are the keys huggingface/exporters writes, kept
# so tools that list Core ML models recognise ours.
META_NAME = "co.huggingface.exporters.name"
META_TASK = "co.huggingface.exporters.task"
META_ARCHITECTURE = "co.huggingface.exporters.architecture"
META_FRAMEWORK = "co.huggingface.exporters.framework"
META_PRECISION = "co.huggingface.exporters.precision"
METADATA_READ = (META_NAME,)

# files of a model folder (Hub.swift loadConfig(modelFolder:)); tokenizer.json is the only required one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")


def exporters_metadata(name: str, architecture: str, precision: str) -> dict[str, str]:
    return {
        META_NAME: name,
        META_TASK: "text-generation",
        META_ARCHITECTURE: architecture,
        META_FRAMEWORK: "pytorch",
        META_PRECISION: precision,
    }
