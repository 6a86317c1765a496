"""Provenance records and content fingerprints shared by every stage.

Provenance records are plain JSON-able dicts written into every output (last, atomically: see
:mod:`pipeline.files`). Content fingerprints identify slide and label files by what they contain, so that
Snakemake reruns a stage when a file is replaced and not when it is merely touched.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from . import STAGE_VERSIONS, __version__
from .files import write_json_atomic


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
