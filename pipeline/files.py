"""File helpers shared by every stage: atomic writes, JSON, PNG, GeoJSON, safe file names.

Every artefact the pipeline writes is produced under a temporary sibling name and moved into place with
``os.replace`` (atomic on POSIX within one filesystem), so an interrupted job never leaves a file that a
later run would mistake for a finished one. This module imports nothing heavier than numpy (and OpenCV
only inside the PNG helpers), so the workflow can use it while planning.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["DiskFullError", "is_disk_full", "disk_full_as_error", "mount_point", "atomic_path", "replace_into", "write_json_atomic", "write_text_atomic", "write_bytes_atomic",
           "read_json", "read_json_or_none", "write_png", "encode_png", "safe_name", "sha256_file", "one_line",
           "feature_collection", "polygon_feature", "square_ring"]


# -- full disks -------------------------------------------------------------------------------------
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


# -- atomic writes ----------------------------------------------------------------------------------
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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


# -- JSON -------------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (numpy values and paths converted), atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed content of ``path``; a missing or malformed file raises ``ValueError`` naming the file
    and the reason (``what`` says what the file is, for the message)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not a valid {what} ({exc})") from None


def read_json_or_none(path: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` for a readable JSON object, ``(None, None)`` for a missing file and
    ``(None, reason)`` for an unreadable one; never raises (for readers that report, like the QC report)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"unreadable {path.name}: {exc}"
    if not isinstance(obj, dict):
        return None, f"unreadable {path.name}: not a JSON object"
    return obj, None


# -- PNG --------------------------------------------------------------------------------------------
def encode_png(img, compression: int | None = None) -> bytes:
    """PNG bytes of a grey (H, W) or RGB (H, W, 3) uint8 image."""
    import cv2

    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)] if compression is not None else []
    ok, buf = cv2.imencode(".png", img, params)
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def write_png(path: str | os.PathLike, img) -> None:
    """Write a grey or RGB uint8 image as PNG, atomically and flushed to disk."""
    try:
        data = encode_png(img)
    except OSError as exc:
        raise OSError(f"{path}: {exc}") from None
    write_bytes_atomic(path, data)


# -- GeoJSON ----------------------------------------------------------------------------------------
def feature_collection(features: Sequence[dict[str, Any]] = (), **properties: Any) -> dict[str, Any]:
    """A GeoJSON FeatureCollection (QuPath imports it); ``properties`` become the collection's own."""
    fc: dict[str, Any] = {"type": "FeatureCollection", "features": list(features)}
    if properties:
        fc["properties"] = properties
    return fc


def polygon_feature(rings: list, properties: dict[str, Any], feature_id: str | None = None) -> dict[str, Any]:
    """A Polygon Feature: ``rings`` = [exterior, hole, ...], each a closed list of [x, y]."""
    f: dict[str, Any] = {"type": "Feature"}
    if feature_id is not None:
        f["id"] = feature_id
    f["geometry"] = {"type": "Polygon", "coordinates": rings}
    f["properties"] = properties
    return f


def square_ring(x: int, y: int, size: int) -> list[list[int]]:
    """The closed ring of the square with top-left (x, y) and side ``size``."""
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


# -- names, digests, messages -----------------------------------------------------------------------
def safe_name(text: Any) -> str:
    """A file-name-safe version of ``text``: letters, digits, ``-``, ``_`` and ``.`` kept, the rest ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def _sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_HASHING: dict[tuple, Any] = {}  # (path, size, mtime, ctime, inode) -> Future of its sha256
_HASHING_LOCK = threading.Lock()


def _file_key(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def sha256_file_soon(path: str | os.PathLike) -> None:
    """Start hashing ``path`` in a background thread: a later :func:`sha256_file` of the unchanged file in
    this process waits for that result instead of reading the file again (a feature job starts hashing
    its weights file, gigabytes for a ViT-L or larger, while it imports torch and builds the model)."""
    from concurrent.futures import Future

    try:
        key = _file_key(path)
    except OSError:
        return  # whoever needs the hash reports the error
    with _HASHING_LOCK:
        if key in _HASHING:
            return
        fut: Any = Future()
        _HASHING[key] = fut

    def run() -> None:
        try:
            fut.set_result(_sha256(path))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the hash
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="wsipipe-sha256").start()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (the result of :func:`sha256_file_soon` when that hashed the file as it
    is now: same size, modification and change times and inode)."""
    if _HASHING:
        try:
            fut = _HASHING.get(_file_key(path))
        except OSError:
            fut = None
        if fut is not None:
            return fut.result()
    return _sha256(path, chunk)


def one_line(text: Any, limit: int = 400) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
