"""Atomic file writes and provenance records shared by every stage.

Every artefact the pipeline writes is produced under a temporary sibling name and moved into place with
``os.replace`` (atomic on POSIX within one filesystem), so an interrupted job never leaves a file that a
later run would mistake for a finished one. Provenance records are plain JSON-able dicts.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
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


#: errno values that mean "the disk (or the user's quota) is full".
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """Writing failed because the disk holding ``path`` is full; the message names the disk (mount point,
    free and total space), the file and, when known, the slide. Not a problem of the slide: the job fails
    (nothing is recorded as done) and a rerun after freeing space completes it."""

    #: a rerun can succeed without changing the input (stage entry points must not write "failed" outputs)
    retryable = True

    def __init__(self, path: str | os.PathLike, cause: OSError | None = None, slide_id: str | None = None):
        self.path, self.slide_id = str(path), slide_id
        self.mount = mount_point(path)
        try:
            du = shutil.disk_usage(self.mount)
            space = f"{_size(du.free)} free of {_size(du.total)}"
        except OSError:
            space = "free space unknown"
        what = f"slide {slide_id}: " if slide_id else ""
        why = getattr(cause, "cause_text", None) or (cause.strerror if cause is not None and cause.strerror
                                                     else "No space left on device")
        self.cause_text = why
        super().__init__(cause.errno if cause is not None else errno.ENOSPC,
                         f"{what}disk full while writing {self.path} ({why}; the disk mounted at {self.mount} "
                         f"has {space}): free space there and rerun; finished outputs are kept and this one is "
                         "redone")

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an ENOSPC/EDQUOT ``OSError``."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def mount_point(path: str | os.PathLike) -> str:
    """The mount point of the filesystem holding ``path`` (or of its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike, slide_id: str | None = None) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into a :class:`DiskFullError` naming ``path``'s disk."""
    try:
        yield
    except DiskFullError as exc:
        if slide_id and not exc.slide_id:
            raise DiskFullError(exc.path, exc, slide_id) from exc
        raise
    except Exception as exc:  # noqa: BLE001 - zarr/numcodecs may wrap the OSError
        if is_disk_full(exc):
            raise DiskFullError(path, exc if isinstance(exc, OSError) else None, slide_id) from exc
        raise


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
    with disk_full_as_error(path):
        tmp = _tmp_sibling(path, is_dir=is_dir)
    try:
        yield tmp
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if not isinstance(exc, DiskFullError) and is_disk_full(exc):
            raise DiskFullError(path, exc if isinstance(exc, OSError) else None) from exc
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


def slide_fingerprint(path: str | os.PathLike) -> str:
    """:func:`content_fingerprint` of a slide made of one file, or of every file of a multi-file slide
    (DICOM series folder or file, MIRAX with its companion folder, VMS/VMU with the files it names)."""
    from .slide import slide_files

    files = slide_files(path)
    if len(files) == 1 and Path(files[0]) == Path(path):
        return content_fingerprint(path)
    h = hashlib.sha256(b"multi-file slide")
    base = Path(path) if Path(path).is_dir() else Path(path).parent
    for f in files:
        try:
            name = str(Path(f).relative_to(base))
        except ValueError:
            name = Path(f).name
        h.update(name.encode() + b"\0" + content_fingerprint(f).encode())
    return h.hexdigest()


def _stamp(path: Path) -> list:
    """Cheap change stamp of a slide (stat only, no file content or DICOM header is read): of the file,
    or of every file of a DICOM folder / every ``.dcm`` beside a ``.dcm`` file / a MIRAX or VMS slide's files."""
    suffix = path.suffix.lower()
    if path.is_dir():
        files = sorted(c for c in path.iterdir() if c.is_file())
    elif suffix == ".dcm":
        files = sorted(c for c in path.parent.iterdir() if c.is_file() and c.suffix.lower() == ".dcm")
    elif suffix in (".mrxs", ".vms", ".vmu"):
        from .slide import slide_files

        files = slide_files(path)
    else:
        files = [path]
    out = []
    for f in files:
        st = os.stat(f)
        out += [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def fingerprints(paths: dict[str, Path], cache_file: str | os.PathLike | None = None) -> dict[str, str]:
    """:func:`slide_fingerprint` of many slides (or other files), cached by (size, mtime, ctime, inode) of
    each of their files: a slide is re-read only when one of these changed (any rewrite changes ctime,
    which users cannot set)."""
    cache: dict[str, Any] = {}
    if cache_file and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text())
        except ValueError:
            cache = {}
    out, changed = {}, False
    for key, path in paths.items():
        try:
            stamp = _stamp(Path(path))
        except OSError:
            out[key] = "missing"
            continue
        hit = cache.get(str(path))
        if hit and hit.get("stat") == stamp:
            out[key] = hit["sha256"]
            continue
        try:
            out[key] = slide_fingerprint(path)
        except OSError as exc:
            out[key] = f"unreadable: {exc.strerror or exc}"
            continue
        cache[str(path)] = {"stat": stamp, "sha256": out[key]}
        changed = True
    if cache_file and changed:
        try:
            write_json_atomic(cache_file, cache)
        except OSError:
            pass  # read-only or full results folder: fingerprints are recomputed next time
    return out
