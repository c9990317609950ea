"""Where a checkpoint run directly keeps its converted weights (`phi3 generate CHECKPOINT` quantizes on first
use), and how an entry is made: one writer at a time, stamped as verified. No TVM here: the first run's
conversion process (`convert_process`) starts with only what it needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..checkpoint import ModelSource
from ..checkpoint.mlc_format import read_cache_json
from ..locks import output_lock
from ..paths import cache_root

# scales for checkpoints quantized on first use (e.g. the embedded model run directly): "auto", as `phi3
# convert` defaults to (a GGUF with a placeholder vocabulary still falls back to rtn)
JIT_CLIP = "auto"
# in a cached weights folder: the identities of the shards whose md5 the last full check passed
VERIFIED_STAMP = ".shards-verified.json"


def converted_weights_dir(source: ModelSource, quantization: str) -> Path:
    """Where the JIT path keeps a checkpoint converted to `quantization`."""
    from ..checkpoint.mlc_format import FOLDER_REVISION

    # per-file identity: replacing model.safetensors in place must not reuse the old model's weights
    key = [str(source.path.resolve()), source_identity(source.path), quantization, JIT_CLIP]
    key = json.dumps(key + ([FOLDER_REVISION] if FOLDER_REVISION > 1 else []))
    return cache_root() / "weights" / hashlib.sha256(key.encode()).hexdigest()[:20]


def file_identity(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns, st.st_ino]


def source_identity(path: Path) -> list:
    """What the weights were read from: every file of the checkpoint (name, size, mtime_ns, inode). A
    folder's own stat does not change when a file inside it is replaced, so the files are keyed one by one."""
    path = Path(path)
    if path.is_file():
        return [file_identity(path)]
    return [file_identity(f) for f in sorted(path.iterdir()) if f.is_file()]


def convert_into_cache(source: ModelSource, scheme, folder: Path) -> None:
    from ..convert.converter import convert

    convert(source, scheme, folder, clip=JIT_CLIP, progress=True)


def ensure_converted(source: ModelSource, scheme) -> None:
    """Convert `source` to `scheme` into its cache folder unless it is there (one writer at a time: a
    second process or thread waits for the first's conversion, then finds it). The shards' md5 sums were
    computed from the bytes just written, so the entry is stamped as verified (`weights._verify_shards`
    then skips hashing them on the first load)."""
    folder = converted_weights_dir(source, scheme.name)
    with output_lock(folder):
        if not (folder / "tensor-cache.json").is_file():
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete entry: ours, and useless
            convert_into_cache(source, scheme, folder)
            stamp_verified(folder, shard_names(folder))


def shard_names(folder: Path) -> list[str]:
    return sorted(shard["dataPath"] for shard in read_cache_json(folder)["records"])


def stamp_verified(folder: Path, shards: list[str], identities: list | None = None) -> None:
    """Record the shards' identities as checked (`identities`: taken before the check, default now)."""
    stamp = folder / VERIFIED_STAMP
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    try:
        now = identities if identities is not None else [file_identity(folder / n) for n in shards]
        tmp.write_text(json.dumps(now))
        tmp.replace(stamp)
    except OSError:  # a cache we may read but not write (full disk, read-only): hash again next time
        tmp.unlink(missing_ok=True)
