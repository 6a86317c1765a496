"""One run at a time per results folder.

The main Snakemake process takes an exclusive ``flock`` on ``{results_dir}/.wsipipe.lock`` when it
starts executing (not for dry runs) and holds it until it exits; the operating system releases it even
when the process is killed, so a crashed run never leaves a stale lock. A second run on the same results
folder, from any working directory, is refused with who holds it. (``flock`` needs a local filesystem or
a network filesystem with working locks, as most clusters' shared filesystems have.)
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import platform
from pathlib import Path

from .layout import Layout

_HELD: dict[str, int] = {}  # results dir -> open descriptor, kept for the life of the process


class RunLockError(RuntimeError):
    pass


def acquire(results_dir: str | os.PathLike) -> Path:
    d = Path(results_dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    path = Path(Layout(d).run_lock())
    if str(d) in _HELD:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        who = ", ".join(f"{k} {v}" for k, v in holder.items()) or "unknown process"
        raise RunLockError(f"{d}: another run is already using this results folder ({who}); wait for it to "
                           "finish or choose another results_dir") from None
    info = json.dumps({"pid": os.getpid(), "host": platform.node(),
                       "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    _HELD[str(d)] = fd
    return path
