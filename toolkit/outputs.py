"""The one rule for every command that writes: never destroy what we did not write.

An output may replace only an earlier output of the same command (recognised by its marker file, or by its
magic bytes for a single file), never a folder holding files we did not write, and never the input itself
(an output that is, contains or lies inside an input). Checked before any model is loaded or any work is
done, so a refusal costs nothing and leaves every file as it was.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import UserError

CHECKPOINT_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json")


def model_input_path(model: str | Path | None) -> Path:
    """The path a MODEL argument stands for (None: the embedded default model), without opening it."""
    if model is None:
        from .default_model import default_model_path

        return Path(default_model_path())
    path = Path(model).expanduser()
    # like open_model: a file inside a checkpoint folder stands for the folder
    if path.is_file() and (path.name == "config.json" or path.name.endswith(CHECKPOINT_FILE_SUFFIXES)):
        return path.parent
    return path


def _real(p: Path) -> Path:
    # resolve() follows symlinks, so an output reached through a link to the input is caught too
    return Path(os.path.realpath(p))


def _overlap(out: Path, inputs: Iterable[Path]) -> tuple[Path, str] | None:
    o = _real(out)
    for i in inputs:
        r = _real(i)
        if o == r:
            return i, "is the input"
        if r.is_relative_to(o):
            return i, "contains the input"
        if o.is_relative_to(r):
            return i, "lies inside the input"
    return None


def _check_overlap(out: Path, inputs: Iterable[Path]) -> None:
    hit = _overlap(out, [Path(i) for i in inputs if i is not None])
    if hit:
        raise UserError(f"output {hit[1]} {hit[0]}; refusing to write there", out)


def check_output_dir(
    out: str | Path,
    *,
    inputs: Iterable[str | Path | None] = (),
    marker: str,
    owned: Sequence[str] = (),
    what: str,
) -> Path:
    """Refuse `out` unless it is absent, empty, or an earlier output of ours: a folder holding `marker` and
    only entries matching `marker` or the `owned` glob patterns (a file the user added is never deleted).

    `what` names the command's output in the message, e.g. "a `phi3 compile` output"."""
    out = Path(out).expanduser()
    _check_overlap(out, [Path(i) for i in inputs if i is not None])
    if not out.exists():
        if out.is_symlink():
            raise UserError("output is a dangling symlink; refusing to write through it", out)
        _check_creatable(out)
        return out
    if not out.is_dir():
        raise UserError("output exists and is not a folder; refusing to replace it", out)
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        _check_creatable(out)
        return out
    if marker not in entries:
        raise UserError(
            f"output folder is not empty and is not {what} (no {marker}); refusing to overwrite", out
        )
    patterns = (marker, *owned)
    foreign = [e for e in entries if not any(fnmatch.fnmatchcase(e, p) for p in patterns)]
    if foreign:
        raise UserError(
            f"output folder holds {foreign[0]!r}, which {what} does not write; move it away or pick another "
            "folder",
            out,
        )
    return out


def cannot_create_under(path: str | Path) -> tuple[Path, str | None]:
    """The nearest existing folder at or above `path`, and why nothing can be created in it (None: it can).
    Tried, not asked: a throwaway folder is made and removed, since permission bits do not tell (root
    passes them; a read-only mount or /proc refuses anyway)."""
    base = Path(path).expanduser().absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        return base, "not a folder"
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".phi3-write-check-", dir=base))
    except OSError as e:  # the OS's reason is about the folder it was asked to make, so say that
        return base, f"making a folder in it failed: {e.strerror or e}"
    return base, None


def _check_creatable(out: Path) -> None:
    base, why = cannot_create_under(out)
    if why:
        raise UserError(f"output cannot be written there ({why})", base)


def write_error(e: OSError, out: Path) -> UserError:
    """An OSError while writing `out`, as one line. numpy's short writes carry no errno: a nearly full disk
    is the usual reason, so say so when it is."""
    reason = e.strerror
    if not reason:
        try:
            full = shutil.disk_usage(Path(out).parent).free < (1 << 20)
        except OSError:
            full = False
        reason = os.strerror(errno.ENOSPC) if full else str(e)
    return UserError(f"cannot write ({reason})", out)


def check_output_file(
    out: str | Path,
    *,
    inputs: Iterable[str | Path | None] = (),
    magic: bytes | None = None,
    what: str,
) -> Path:
    """Refuse a file output that is (or overlaps) an input, is a folder, sits in a missing folder, or would
    replace an existing file that does not start with `magic` (None: any existing file may be replaced)."""
    out = Path(out).expanduser()
    _check_overlap(out, [Path(i) for i in inputs if i is not None])
    if out.is_dir():
        raise UserError("output is a folder; expected a file name", out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError("output folder does not exist", parent)
    _check_creatable(parent)
    if out.exists() and magic is not None:
        try:
            with open(out, "rb") as f:
                head = f.read(len(magic))
        except OSError as e:
            raise UserError(f"cannot read the existing file ({e.strerror})", out) from None
        if head != magic:
            raise UserError(f"output exists and is not {what}; refusing to overwrite it", out)
    return out


def save_figure(fig, out: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure to PNG `out`, written under a temp name and renamed: never a half-written image."""
    import os

    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, out)
    return out
