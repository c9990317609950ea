"""What `phi3 tune` checks and fixes around MetaSchedule before spending minutes in it.

- An unreachable RPC tracker (or a key no device registered) is one line and a non-zero exit within seconds,
  not a minute of retries and thread tracebacks followed by exit 0.
- Without a tracker the kernels are timed on this machine: a preset whose device is not here (a GPU preset
  on a machine without that GPU, a CPU class whose instructions this CPU lacks) is refused before the model
  is read, not tuned into every measurement failing and "0 kernels beat the default", exit 0.
- MetaSchedule's logging setup crashes (`'NoneType' object has no attribute 'format'`) when its logger already
  has a handler without a name, which a program that configures logging can add: its handlers are set aside
  while MetaSchedule runs and put back afterwards.
- The folder the records go to must take new files: checked before the model is read, not after minutes of
  timing (`--schedules-dir` on a read-only or virtual file system, the installed package's folder).
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

MS_LOGGER = "tvm.s_tir.meta_schedule"


def check_tracker(host: str, port: int, key: str, timeout: float = 5.0) -> None:
    """Connect to the tracker, do TVM's handshake and ask whether `key` has a device; UserError if not."""
    from tvm.rpc import base
    from tvm.rpc.tracker import TrackerCode

    where = f"--rpc-tracker {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
            if magic != base.RPC_TRACKER_MAGIC:
                raise UserError(f"{where}: not a TVM RPC tracker (bad handshake)")
            base.sendjson(sock, [TrackerCode.SUMMARY])
            reply = base.recvjson(sock)
    except UserError:
        raise
    except (OSError, ValueError, struct.error) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise UserError(f"{where}: cannot reach the tracker ({reason})") from None
    if not isinstance(reply, list) or len(reply) < 2 or reply[0] != TrackerCode.SUCCESS:
        raise UserError(f"{where}: the tracker did not answer its summary request")
    queue = reply[1].get("queue_info", {}) if isinstance(reply[1], dict) else {}
    if key not in queue:
        known = ", ".join(sorted(queue)) or "none"
        raise UserError(f"--rpc-key {key}: no device registered under it at {host}:{port} (keys: {known})")


def check_local_device(preset) -> None:
    """UserError unless `preset`'s kernels can be timed on this machine (`phi3 tune` without a tracker)."""
    hint = "tune on a machine that has it, or time there through --rpc-tracker and --rpc-key"
    if preset.kind == "llvm":
        if not preset.runs_here:
            why = f" (it lacks {', '.join(preset.missing_features)})" if preset.missing_features else ""
            raise UserError(f"--device {preset.spec}: its code does not run on this CPU{why}; {hint}")
        return
    import tvm

    if not tvm.device(preset.kind, 0).exist:
        raise UserError(f"--device {preset.spec}: no {preset.kind} device here to time kernels on; {hint}")


@contextmanager
def meta_schedule_logging() -> Iterator[None]:
    """Run MetaSchedule with its logger free of foreign handlers; restore them (and close its own) after."""
    logger = logging.getLogger(MS_LOGGER)
    saved = list(logger.handlers)
    for h in saved:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in list(logger.handlers):
            if h not in saved:
                logger.removeHandler(h)
                h.close()
        for h in saved:
            logger.addHandler(h)


def check_records_writable(folder: Path) -> None:
    """UserError unless the records can be written where `folder` is (or would be made)."""
    from ..outputs import cannot_create_under

    base, why = cannot_create_under(folder)
    if why:
        raise UserError(f"--schedules-dir: tuned records cannot be written under {base}: {why}")
