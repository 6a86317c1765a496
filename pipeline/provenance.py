"""Atomic file writes and provenance records shared by every stage.

Every artefact the pipeline writes is produced under a temporary sibling name and moved into place with
``os.replace`` (atomic on POSIX within one filesystem), so an interrupted job never leaves a file that a
later run would mistake for a finished one. Provenance records are plain JSON-able dicts.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import STAGE_VERSIONS, __version__


def _tmp_sibling(path: Path, is_dir: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success move it onto ``path``, on error remove it.

    For directories an existing target is replaced only after the new one is complete.
    """
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=is_dir)
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    replace_into(tmp, path)


def replace_into(tmp: Path, path: Path) -> None:
    """Move a finished temporary file or directory onto ``path`` (replacing any old one)."""
    if tmp.is_dir():
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    else:
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def software_versions() -> dict[str, str]:
    """Versions of the packages that determine results."""
    out = {"python": platform.python_version(), "pipeline": __version__}
    from importlib import metadata

    for dist in ("numpy", "opencv-python-headless", "openslide-python", "openslide-bin", "tiffslide",
                 "torch", "timm", "zarr", "scikit-learn"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance(stage: str, params: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A JSON-able provenance record for one stage output."""
    rec = {
        "stage": stage,
        "stage_version": STAGE_VERSIONS.get(stage),
        "pipeline_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "argv": sys.argv,
        "params": params or {},
        "versions": software_versions(),
    }
    rec.update(extra)
    return rec


def content_fingerprint(path: str | os.PathLike, block: int = 1 << 20, samples: int = 16) -> str:
    """A content hash of a (possibly huge) file: its size, first and last ``block`` bytes and ``samples``
    64 KiB blocks spread through it. A replaced slide changes it; touching or copying with a new
    modification time does not."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as fh:
        if size <= 2 * block + samples * 65536:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        else:
            offsets = [0, size - block] + [int(size * (i + 1) / (samples + 1)) for i in range(samples)]
            for off in offsets:
                fh.seek(off)
                h.update(fh.read(block if off in (0, size - block) else 65536))
    return h.hexdigest()


def fingerprints(paths: dict[str, Path], cache_file: str | os.PathLike | None = None) -> dict[str, str]:
    """``content_fingerprint`` of many files, cached by (size, mtime, ctime, inode): a file is re-read only
    when one of these changed (any rewrite changes ctime, which users cannot set)."""
    cache: dict[str, Any] = {}
    if cache_file and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text())
        except ValueError:
            cache = {}
    out, changed = {}, False
    for key, path in paths.items():
        try:
            st = os.stat(path)
        except OSError:
            out[key] = "missing"
            continue
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        hit = cache.get(str(path))
        if hit and hit.get("stat") == stamp:
            out[key] = hit["sha256"]
            continue
        try:
            out[key] = content_fingerprint(path)
        except OSError as exc:
            out[key] = f"unreadable: {exc.strerror or exc}"
            continue
        cache[str(path)] = {"stat": stamp, "sha256": out[key]}
        changed = True
    if cache_file and changed:
        try:
            write_json_atomic(cache_file, cache)
        except OSError:
            pass  # read-only results folder: fingerprints are recomputed next time
    return out
