"""MLC-LLM's weight-folder format, in one place: what `phi3 convert` writes and the "mlc" reader reads.

A folder = `tensor-cache.json` + `params_shard_*.bin` (tensor_cache.py) + `mlc-chat-config.json`
(chat_config.py: schema; conversation.py: MLC's templates; model_config.py: model config and param names) +
the tokenizer files. It lives under `checkpoint/` because that is the lowest stage that both the reader
(checkpoint/mlc_source.py) and the writer (convert/) can import.

Facts (field names, defaults, template values, detection rules) are read from MLC-LLM at commit
79d603f085f50500e9509fa01785ffa7ecfaaa93 (python/mlc_llm/protocol/mlc_chat_config.py,
protocol/conversation_protocol.py, interface/gen_config.py, conversation_template/, model/phi3, model/llama,
cpp/tokenizers/tokenizers.cc); the code here is our own.
"""

from __future__ import annotations

from .chat_config import (
    CHAT_CONFIG,
    MLC_CHAT_CONFIG_VERSION,
    SYSTEM_DEFAULTS,
    Conversation,
    MLCChatConfig,
    TokenizerInfo,
    detect_tokenizer_info,
    read_chat_config,
    write_chat_config,
)
from .conversation import MLC_TEMPLATES, mlc_template, mlc_template_name, our_template_name
from .model_config import (
    MLC_MAX_BATCH_SIZE,
    MODEL_TYPES,
    PARAM_NAME_STYLES,
    config_from_model_config,
    default_window_sizes,
    mlc_model_config,
    mlc_sliding_window_size,
    model_type_of,
    param_renamer,
    quantized_param_names,
    to_mlc_name,
)
from .tensor_cache import (
    CACHE_JSON,
    DEFAULT_SHARD_CAP,
    TensorCacheWriter,
    iter_tensor_cache,
    load_tensor_cache,
    read_cache_json,
    verify_tensor_cache,
    write_tensor_cache,
)

# Revision of what `phi3 convert` writes; caches of converted folders key on it, so a folder of an older
# layout (2: MLC's full chat config; 1: conv_template was our template name) is rebuilt, not misread.
FOLDER_REVISION = 2

# MLC's gen_config copies these tokenizer files when the checkpoint has them (its order); we also copy the
# last two, so that the folder keeps the checkpoint's special tokens and generation defaults.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

__all__ = [
    "CACHE_JSON",
    "CHAT_CONFIG",
    "DEFAULT_SHARD_CAP",
    "FOLDER_REVISION",
    "MLC_CHAT_CONFIG_VERSION",
    "MLC_TEMPLATES",
    "MODEL_TYPES",
    "PARAM_NAME_STYLES",
    "SYSTEM_DEFAULTS",
    "TOKENIZER_FILES",
    "Conversation",
    "MLCChatConfig",
    "TensorCacheWriter",
    "TokenizerInfo",
    "config_from_model_config",
    "default_window_sizes",
    "detect_tokenizer_info",
    "iter_tensor_cache",
    "load_tensor_cache",
    "mlc_model_config",
    "mlc_template",
    "mlc_template_name",
    "model_type_of",
    "mlc_sliding_window_size",
    "MLC_MAX_BATCH_SIZE",
    "our_template_name",
    "param_renamer",
    "quantized_param_names",
    "read_cache_json",
    "read_chat_config",
    "to_mlc_name",
    "verify_tensor_cache",
    "write_chat_config",
    "write_tensor_cache",
]
