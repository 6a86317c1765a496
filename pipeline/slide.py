"""One slide abstraction over OpenSlide (default) and tiffslide, with explicit µm/px resolution.

The level-0 resolution (µm per pixel) is resolved in this order and the source is recorded:

1. ``manifest``: a per-slide ``mpp`` column in the labels/manifest CSV (the user knows best),
2. vendor metadata: ``openslide.mpp-x`` (Aperio, Hamamatsu, MIRAX, ...), ``tiffslide.mpp-x``, or the TIFF
   ``XResolution``/``ResolutionUnit`` tags of a generic TIFF,
3. ``default_mpp`` from the config, only when the user set it.

Otherwise the slide fails with a :class:`SlideError` naming the file and the reason. Values outside a
plausible range (e.g. 72 dpi placeholders that would mean 352 µm/px) are rejected, not trusted.
"""

from __future__ import annotations

import math
import os
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: File extensions treated as slides when scanning a folder.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
                    ".dcm")
#: Plausible level-0 resolution range in µm/px (brightfield scanners are ~0.1-1.0; 10 µm/px already is
#: a thumbnail). Anything outside is treated as missing metadata.
MPP_RANGE = (0.05, 20.0)
READERS = ("auto", "openslide", "tiffslide")
#: Characters Snakemake gives a meaning to in paths (wildcards, path variables), refused in slide ids.
UNSUPPORTED_ID_CHARS = "{}<>"


class SlideError(RuntimeError):
    """A slide cannot be used: the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class SlideChangedError(SlideError):
    """The slide's file(s) changed on disk while the slide was being read: results made from it would mix
    two contents, so nothing is finalised. Not a fault of the slide: a rerun reads the new file."""

    retryable = True


def slide_id_from_path(path: str | os.PathLike) -> str:
    """Slide id (NFC-normalised so ids compare equal across OSes): the file name without its extension;
    for a DICOM WSI, the folder name when ``path`` is the series' folder, and for a single ``.dcm`` file
    its series' own id (see :mod:`pipeline.dicom`)."""
    p = Path(path)
    if p.is_dir():
        return unicodedata.normalize("NFC", p.name)
    name = p.name
    if name.lower().endswith(".dcm") and p.is_file():
        from .dicom import slide_id_for_file

        return slide_id_for_file(p)
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    else:
        name = Path(name).stem
    return unicodedata.normalize("NFC", name)


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def mpp_from_properties(props: dict[str, str]) -> tuple[float | None, str | None, list[str]]:
    """Level-0 µm/px from slide properties: (mpp, source, notes about rejected candidates)."""
    notes: list[str] = []
    for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
        v = _float(props.get(key))
        if v is not None:
            if _plausible(v):
                return v, key, notes
            notes.append(f"{key}={v} outside plausible range {MPP_RANGE}")
    # Generic TIFF: resolution tags. OpenSlide exposes them as tiff.XResolution / tiff.ResolutionUnit.
    xres = _float(props.get("tiff.XResolution"))
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    if xres is not None:
        per_um = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}.get(unit)
        if per_um is None:
            notes.append(f"tiff.XResolution={xres} without a physical unit ({unit or 'none'})")
        else:
            v = per_um / xres
            if _plausible(v):
                return v, "tiff.resolution", notes
            notes.append(f"tiff resolution gives {v:.4g} µm/px, outside plausible range {MPP_RANGE}")
    return None, None, notes


_NATIVE_ARGB = sys.byteorder == "little"


def _openslide_rgb(handle: Any, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    """OpenSlide's premultiplied ARGB read into a numpy buffer and composited on white.

    Premultiplied colour over white is ``C + (255 - A)`` per channel (never overflows since C <= A), so
    fully opaque regions, the usual case, need only a channel reorder.
    """
    import ctypes

    from openslide import lowlevel

    if w <= 0 or h <= 0:
        return np.zeros((max(h, 0), max(w, 0), 3), np.uint8)
    buf = np.empty((h, w), dtype=np.uint32)
    lowlevel._read_region(handle._osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), x, y, level, w, h)
    bgra = buf.view(np.uint8).reshape(h, w, 4)  # little-endian 0xAARRGGBB -> bytes B, G, R, A
    alpha = bgra[..., 3]
    rgb = bgra[..., 2::-1]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    return rgb + (255 - alpha)[..., None]


@dataclass
class Slide:
    """An open whole-slide image. Use as a context manager or call :meth:`close`."""

    path: Path
    reader: str
    mpp: float
    mpp_source: str
    _handle: Any = field(repr=False)
    slide_id: str = ""
    _tiles: Any = field(default=None, repr=False)  # TiledJpegReader, False (not applicable) or None (unknown)
    #: Size of the direct reader's decoded-tile cache (None: from the slide's width); set before reading.
    tile_cache_bytes: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.slide_id = self.slide_id or slide_id_from_path(self.path)

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def properties(self) -> dict[str, str]:
        return dict(self._handle.properties)

    @property
    def vendor(self) -> str:
        p = self._handle.properties
        return str(p.get("openslide.vendor") or p.get("tiffslide.vendor") or "unknown")

    @property
    def dimensions(self) -> tuple[int, int]:
        w, h = self._handle.dimensions
        return int(w), int(h)

    @property
    def level_count(self) -> int:
        return int(self._handle.level_count)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(int(w), int(h)) for w, h in self._handle.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._handle.level_downsamples]

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (never upsample a level
        when a finer one exists). A relative tolerance absorbs rounding in stored downsamples."""
        best = 0
        for lvl, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3) and ds >= self.level_downsamples[best]:
                best = lvl
        return best

    # -- pixels -----------------------------------------------------------------------------------
    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 array (height, width, 3) of a region whose top-left is level-0 (x, y).

        Transparent pixels (outside the scanned area) become white, as on glass. With OpenSlide the
        pixels are decoded straight into a numpy buffer (no PIL image in between).
        """
        try:
            if self.reader == "openslide" and _NATIVE_ARGB:
                return _openslide_rgb(self._handle, int(x), int(y), int(level), int(width), int(height))
            if self.reader == "tiffslide":
                arr = self._handle.read_region((int(x), int(y)), int(level), (int(width), int(height)),
                                               as_array=True)
            else:
                arr = np.asarray(self._handle.read_region((int(x), int(y)), int(level), (int(width), int(height))))
        except Exception as exc:  # noqa: BLE001 - any reader failure is a slide failure
            raise SlideError(self.path, f"cannot read region x={x} y={y} level={level} "
                                        f"size={width}x{height}: {exc}") from exc
        if arr.ndim == 3 and arr.shape[2] == 4:
            rgb = arr[..., :3].astype(np.uint16)
            alpha = arr[..., 3:4].astype(np.uint16)
            # Straight (non-premultiplied) RGBA: composite on white.
            arr = ((rgb * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)
        elif arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)

    def read_level_region(self, level: int, lx: int, ly: int, width: int, height: int) -> np.ndarray:
        """Like :meth:`read_region` but with the top-left in pixels of ``level`` itself. Uses the direct
        tiled-JPEG decoder (:mod:`pipeline.tiles`) when the file allows it, the slide library otherwise."""
        tiles = self._direct()
        if tiles and tiles.supports(level):
            try:
                return tiles.read(level, int(lx), int(ly), int(width), int(height))
            except Exception as exc:  # noqa: BLE001
                raise SlideError(self.path, f"cannot decode level {level} region x={lx} y={ly} "
                                            f"size={width}x{height}: {exc}") from exc
        ds = self.level_downsamples[level]
        return self.read_region(round(lx * ds), round(ly * ds), level, width, height)

    def _direct(self) -> Any:
        """The direct tiled-JPEG reader for this file, or False when it does not apply (opened lazily)."""
        if self._tiles is None:
            from .tiles import open_tiled_jpeg

            self._tiles = open_tiled_jpeg(self.path, self.level_dimensions, self.tile_cache_bytes) or False
        return self._tiles

    def tiled_jpeg(self) -> Any:
        """The direct tiled-JPEG reader (:class:`pipeline.tiles.TiledJpegReader`) or None."""
        return self._direct() or None

    def decoder(self, level: int) -> str:
        """Which decoder :meth:`read_level_region` uses for ``level`` (recorded in provenance)."""
        tiles = self._direct()
        return "tiled-jpeg-direct" if tiles and tiles.supports(level) else self.reader

    def read_level(self, level: int) -> np.ndarray:
        """The whole of one pyramid level as RGB uint8 (use on low-resolution levels only)."""
        w, h = self.level_dimensions[level]
        return self.read_region(0, 0, level, w, h)

    def read_at_downsample(self, downsample: float, max_pixels: int = 64_000_000) -> tuple[np.ndarray, float]:
        """The whole slide at (about) ``downsample`` relative to level 0, read from the best level and
        resized. Returns (RGB array, exact downsample of the returned image along x)."""
        import cv2

        lvl = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[lvl]
        if lw * lh > max_pixels:
            raise SlideError(self.path, f"level {lvl} ({lw}x{lh}) is too large to read whole for a "
                                        f"downsample of {downsample:.1f}: the slide lacks a low-resolution pyramid level")
        img = self.read_level(lvl)
        W, H = self.dimensions
        tw, th = max(1, round(W / downsample)), max(1, round(H / downsample))
        if (tw, th) != (lw, lh):
            img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        return img, W / tw

    def close(self) -> None:
        if self._tiles:
            self._tiles.close()
        try:
            self._handle.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id, "path": str(self.path), "reader": self.reader, "vendor": self.vendor,
            "level0_mpp": self.mpp, "mpp_source": self.mpp_source, "dimensions": list(self.dimensions),
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": self.level_downsamples,
        }


def companion_problem(path: str | os.PathLike) -> str | None:
    """Why a multi-file slide cannot be opened (its companion folder or files are missing), or None.

    MIRAX: ``NAME.mrxs`` needs the folder ``NAME/`` beside it with ``Slidedat.ini`` (and its data files).
    Hamamatsu VMS/VMU: the ``.vms``/``.vmu`` index names its image, map and optimisation files, which must
    lie beside it."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".mrxs":
        data = p.with_suffix("")
        if not data.is_dir():
            return (f"MIRAX companion folder {data} is missing (a .mrxs file is only the index: copy the "
                    f"folder '{data.name}' with Slidedat.ini and the Data*.dat files next to it)")
        if not (data / "Slidedat.ini").is_file():
            return f"MIRAX companion folder {data} has no Slidedat.ini (incomplete copy?)"
        return None
    if suffix in (".vms", ".vmu"):
        missing = [str(f) for f in vms_companions(p) if not f.is_file()]
        if missing:
            return (f"Hamamatsu {suffix[1:].upper()} file(s) named in {p.name} are missing: "
                    + ", ".join(missing[:5]) + (f" ... ({len(missing) - 5} more)" if len(missing) > 5 else ""))
    return None


def vms_companions(path: str | os.PathLike) -> list[Path]:
    """Files a Hamamatsu ``.vms``/``.vmu`` index refers to (ImageFile*, MapFile, OptimisationFile), which
    lie in the same folder."""
    p = Path(path)
    out: list[Path] = []
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if sep and value.strip() and (key.startswith("imagefile") or key in ("mapfile", "optimisationfile")):
            out.append(p.parent / value.strip())
    return out


def slide_files(path: str | os.PathLike) -> list[Path]:
    """Every file a slide is made of (for content fingerprints and change detection): the file itself;
    all files of a DICOM series (the folder, or the series of a ``.dcm`` file); a ``.mrxs`` and the files
    of its companion folder; a ``.vms``/``.vmu`` and the files it names."""
    p = Path(path)
    if p.is_dir():
        from .dicom import scan_folder

        scan = scan_folder(p)
        files = [f for s in scan.series for f in s.files]
        return sorted(files) or sorted(c for c in p.iterdir() if c.is_file())
    suffix = p.suffix.lower()
    if suffix == ".dcm":
        from .dicom import scan_folder

        series = scan_folder(p.parent).series_of(p)
        return series.files if series is not None else [p]
    if suffix == ".mrxs":
        data = p.with_suffix("")
        extra = sorted(c for c in data.iterdir() if c.is_file()) if data.is_dir() else []
        return [p, *extra]
    if suffix in (".vms", ".vmu"):
        return [p, *[f for f in vms_companions(p) if f.is_file()]]
    return [p]


def slide_stamp(path: str | os.PathLike) -> list[list[Any]]:
    """(name, size, mtime_ns, ctime_ns, inode) of every file of a slide: any replacement or rewrite of one
    of them changes it (ctime changes on every write and cannot be set by users)."""
    out = []
    for f in slide_files(path):
        try:
            st = f.stat()
        except OSError:
            out.append([str(f), None, None, None, None])
            continue
        out.append([str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return out


def _open_handle(path: Path, reader: str, dicom: bool = False) -> tuple[Any, str]:
    errors = []
    order = ["openslide", "tiffslide"] if reader == "auto" else [reader]
    if dicom:
        if reader == "tiffslide":
            raise SlideError(path, "tiffslide does not read DICOM whole-slide images: use reader 'auto' or "
                                   "'openslide' (OpenSlide 4 reads DICOM)")
        order = ["openslide"]
    for name in order:
        try:
            if name == "openslide":
                import openslide

                return openslide.OpenSlide(str(path)), name
            import tiffslide

            return tiffslide.TiffSlide(str(path)), name
        except Exception as exc:  # noqa: BLE001 - collect every reader's reason
            errors.append(f"{name}: {type(exc).__name__}: {str(exc) or 'unsupported or corrupt file'}")
    if dicom:
        errors.append("tiffslide: not tried (it does not read DICOM)")
    raise SlideError(path, "cannot open slide (" + "; ".join(errors) + ")")


def open_slide(path: str | os.PathLike, reader: str = "auto", mpp: float | None = None,
               default_mpp: float | None = None, slide_id: str | None = None) -> Slide:
    """Open a slide and resolve its level-0 µm/px (see module docstring for the order).

    ``path``: a slide file, or the folder of a DICOM WSI series (any file of a series opens the whole
    series). ``mpp``: a per-slide value from the manifest (highest priority). ``default_mpp``: the config
    fallback, used only when the slide has no usable metadata. ``slide_id``: the id the cohort gave this
    slide (default: derived from the path, :func:`slide_id_from_path`).
    """
    path = Path(path)
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, not {reader!r}")
    if not path.exists():
        raise SlideError(path, "file does not exist")
    target, dicom = path, path.suffix.lower() == ".dcm"
    if path.is_dir():
        from .dicom import is_dicom_path, series_main_file

        if not is_dicom_path(path):
            raise SlideError(path, "is a folder, not a slide file (only a DICOM series may be given as a folder)")
        target, dicom = series_main_file(path), True
    elif path.stat().st_size == 0:
        raise SlideError(path, "file is empty (0 bytes)")
    problem = companion_problem(path)
    if problem:
        raise SlideError(path, problem)
    handle, used = _open_handle(target, reader, dicom=dicom)
    try:
        if mpp is not None:
            if not _plausible(_float(mpp)):
                raise SlideError(path, f"manifest mpp {mpp!r} is not a plausible µm/px value {MPP_RANGE}")
            value, source = float(mpp), "manifest"
        else:
            value, source, notes = mpp_from_properties(dict(handle.properties))
            if value is None and default_mpp is not None:
                value, source = float(default_mpp), "config.default_mpp"
            if value is None:
                why = ("; ".join(notes) + "; ") if notes else ""
                raise SlideError(path, f"no µm/px (mpp) in the slide metadata ({why}vendor "
                                       f"{handle.properties.get('openslide.vendor', 'unknown')}): add an 'mpp' "
                                       "column for this slide to the labels/manifest CSV or set default_mpp in the config")
        w, h = handle.dimensions
        if w <= 0 or h <= 0:
            raise SlideError(path, f"slide has empty dimensions {w}x{h}")
    except BaseException:
        handle.close()
        raise
    return Slide(path=path, reader=used, mpp=value, mpp_source=source, _handle=handle, slide_id=slide_id or "")


class Cohort(dict):
    """Slide id -> path (what the workflow iterates over), plus what discovery left out and why.

    ``missing``: id -> path of slide-list rows whose file does not exist (left out, reported);
    ``rows``: id -> the slide-list CSV row (``patient_id``, ``label``, ``mpp``, ... when given);
    ``notes``: files that look like slides but are not (associated DICOM images, companion folders,
    non-WSI DICOM), one line each."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.missing: dict[str, Path] = {}
        self.rows: dict[str, dict[str, str]] = {}
        self.notes: list[str] = []


def _check_id(sid: str, path: Path) -> None:
    bad = sorted(set(sid) & set(UNSUPPORTED_ID_CHARS))
    if bad:
        raise SlideError(path, f"slide id {sid!r} contains {' '.join(bad)}, which workflow paths cannot hold "
                               "(rename the file; spaces and non-ASCII letters are fine)")
    if not sid or sid in (".", "..") or "/" in sid:
        raise SlideError(path, f"slide id {sid!r} cannot name a file")


def _add(found: Cohort, sid: str, path: Path) -> None:
    sid = unicodedata.normalize("NFC", sid)
    _check_id(sid, path)
    if sid in found:
        raise SlideError(path, f"duplicate slide id {sid!r}: also {found[sid]} (rename one of them"
                               + (", or give ids in a slides_csv" if path.suffix.lower() != ".dcm" else "")
                               + ")")
    found[sid] = path


def _scan_tree(root: Path, exts: tuple[str, ...], recursive: bool, found: Cohort) -> None:
    dicom = ".dcm" in exts
    dirs_to_visit = [root]
    while dirs_to_visit:
        d = dirs_to_visit.pop(0)
        try:
            entries = sorted(d.iterdir())
        except OSError as exc:
            raise SlideError(d, f"cannot list folder ({exc.strerror or exc})") from exc
        files = [e for e in entries if not e.name.startswith(".") and e.is_file()]
        subdirs = [e for e in entries if not e.name.startswith(".") and e.is_dir()]
        companions = {f.with_suffix("").name for f in files if f.suffix.lower() == ".mrxs"}
        for c in sorted(companions):
            if (d / c).is_dir():
                found.notes.append(f"{d / c}: MIRAX companion folder of {c}.mrxs (not a slide)")
        dcm = [f for f in files if f.suffix.lower() == ".dcm"]
        for f in files:
            if f.suffix.lower() == ".dcm" or not f.name.lower().endswith(exts):
                continue
            if d != root and not recursive:  # a DICOM slide folder found without recursion: its series only
                continue
            if f.suffix.lower() == ".mrxs" and not (f.with_suffix("")).is_dir():
                found.notes.append(f"{f}: MIRAX companion folder {f.with_suffix('')} is missing "
                                   "(this slide will fail to open)")
            _add(found, slide_id_from_path(f), f)
        if dicom and dcm:
            _add_dicom(d, dcm, d != root, found)
        for sub in subdirs:
            if sub.name in companions:
                continue
            if recursive:
                dirs_to_visit.append(sub)
            elif d == root and dicom and any(c.suffix.lower() == ".dcm" and c.is_file() for c in sub.iterdir()):
                # DICOM slides usually come one folder per slide, even in a flat cohort
                dirs_to_visit.append(sub)


def _add_dicom(folder: Path, files: list[Path], folder_is_slide: bool, found: Cohort) -> None:
    from .dicom import scan_folder

    scan = scan_folder(folder, files)
    for path, why in scan.skipped:
        found.notes.append(f"{path}: {why} (not a slide)")
    for s in scan.series:
        for h in s.associated:
            found.notes.append(f"{h.path}: {h.associated} image of DICOM series {s.uid} (not a slide)")
    if folder_is_slide and len(scan.series) == 1:
        _add(found, folder.name, folder)
    else:
        for sid, s in scan.series_ids().items():
            _add(found, sid, s.main)
    for path, why in scan.unreadable:  # handed on: the slide's first stage reports it clearly
        found.notes.append(f"{why}")
        _add(found, slide_id_from_path(path), path)


def read_slide_list(csv_path: str | os.PathLike) -> Cohort:
    """A slide-list CSV: ``slide_id,path[,patient_id,label,mpp,...]`` (``path`` relative to the CSV's
    folder or absolute; an empty or absent ``slide_id`` is derived from the path). Rows whose path does
    not exist are left out and kept in ``.missing``; two rows with one id are refused, naming both."""
    import csv

    p = Path(csv_path)
    if not p.is_file():
        raise SlideError(p, "slides_csv does not exist")
    found = Cohort()
    first_line: dict[str, int] = {}
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in cols:
            raise SlideError(p, f"slides CSV has no 'path' column (columns: {reader.fieldnames}); expected "
                                "slide_id,path[,patient_id,label,mpp,...]")
        for i, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            if not row.get("path"):
                raise SlideError(p, f"line {i}: empty path")
            path = Path(row["path"]).expanduser()
            if not path.is_absolute():
                path = p.parent / path
            sid = unicodedata.normalize("NFC", row.get("slide_id") or "")
            if not sid:
                sid = slide_id_from_path(path) if path.exists() else slide_id_from_path(Path(path.name))
            if sid in first_line:
                other = found.get(sid) or found.missing.get(sid)
                raise SlideError(p, f"line {i}: duplicate slide id {sid!r} ({path}); also line "
                                    f"{first_line[sid]} ({other})")
            _check_id(sid, path)
            first_line[sid] = i
            row["slide_id"] = sid
            found.rows[sid] = row
            if path.exists():
                found[sid] = path
            else:
                found.missing[sid] = path
    return found


def discover_cohort(slides_dir: str | os.PathLike | None = None, slides_csv: str | os.PathLike | None = None,
                    recursive: bool = False, extensions: tuple[str, ...] = SLIDE_EXTENSIONS) -> Cohort:
    """The cohort's slides: id -> path, from a folder or from a slide-list CSV (exactly one of them).

    Folder (``slides_dir``): every file with a slide extension directly in it (``recursive``: anywhere
    below it, e.g. TCGA's ``project/uuid/file.svs``); the slide id is the file name without extension.
    DICOM: the ``.dcm`` files are grouped by series (headers only); a folder holding one series is one
    slide named after the folder (a DICOM slide folder directly below ``slides_dir`` is found without
    ``recursive``); several series in one folder are one slide each (ids from the series, see
    :mod:`pipeline.dicom`); label, overview and thumbnail images are never slides. MIRAX companion
    folders are not searched. Ids are NFC-normalised; two slides with one id are refused, naming both
    paths. What was left out is listed in ``Cohort.notes``."""
    if (slides_dir is None) == (slides_csv is None):
        raise ValueError("give either slides_dir or slides_csv (not both, not neither)")
    if slides_csv is not None:
        return read_slide_list(slides_csv)
    root = Path(slides_dir)
    if not root.is_dir():
        raise SlideError(root, "slides_dir is not a folder")
    found = Cohort()
    _scan_tree(root, tuple(e.lower() for e in extensions), recursive, found)
    return found


def discover_slides(slides_dir: str | os.PathLike, extensions: tuple[str, ...] = SLIDE_EXTENSIONS,
                    recursive: bool = False) -> dict[str, Path]:
    """Slide id -> path for the slides of a folder (see :func:`discover_cohort`)."""
    return discover_cohort(slides_dir=slides_dir, recursive=recursive, extensions=extensions)


def reconcile(slides: dict[str, Path], manifest: dict[str, dict[str, str]] | None,
              label_columns: tuple[str, ...] = ("label", "time", "event")) -> dict[str, Any]:
    """What does not match between the cohort's slides and the labels/manifest rows (printed once at the
    start of a run and shown in the report):

    * ``rows_without_slide``: manifest rows whose slide is not in the cohort (plus slide-list rows whose
      file does not exist, when ``slides`` is a :class:`Cohort` from a CSV);
    * ``slides_without_label``: slides with no manifest row, or a row with no label value (only when a
      manifest is given; such slides get features but no MIL).

    Returns ``{"n_slides", "n_rows", "rows_without_slide": [...], "slides_without_label": [...],
    "missing_files": {id: path}, "counts": {...}}`` (lists sorted)."""
    manifest = manifest or {}
    missing_files = {k: str(v) for k, v in sorted(getattr(slides, "missing", {}).items())}
    rows_without = sorted(set(manifest) - set(slides))
    without_label: list[str] = []
    if manifest:
        for sid in sorted(slides):
            row = manifest.get(sid)
            cols = [c for c in label_columns if row is not None and c in row]
            if row is None or not cols or all(str(row.get(c) or "").strip() == "" for c in cols):
                without_label.append(sid)
    return {
        "n_slides": len(slides), "n_rows": len(manifest),
        "rows_without_slide": rows_without, "slides_without_label": without_label,
        "missing_files": missing_files,
        "counts": {"rows_without_slide": len(rows_without), "slides_without_label": len(without_label),
                   "missing_files": len(missing_files)},
    }


def format_reconcile(rec: dict[str, Any], labels: str | None = None, limit: int = 10) -> list[str]:
    """The lines to print once at the start of a run (empty when everything matches)."""
    def names(items: list[str]) -> str:
        return ", ".join(items[:limit]) + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")

    lines = []
    where = labels or "the labels CSV"
    if rec["missing_files"]:
        ids = list(rec["missing_files"])
        lines.append(f"warning: {len(ids)} slide(s) in the slide list have no file: "
                     + names([f"{i} ({rec['missing_files'][i]})" for i in ids]))
    if rec["rows_without_slide"]:
        lines.append(f"warning: {len(rec['rows_without_slide'])} row(s) of {where} have no slide: "
                     + names(rec["rows_without_slide"]))
    if rec["slides_without_label"]:
        lines.append(f"note: {len(rec['slides_without_label'])} of {rec['n_slides']} slide(s) have no label in "
                     f"{where} (features only, left out of MIL): " + names(rec["slides_without_label"]))
    return lines


def read_manifest(csv_path: str | os.PathLike | None) -> dict[str, dict[str, str]]:
    """Rows of the labels/manifest CSV keyed by ``slide_id`` (empty when no CSV)."""
    import csv

    if not csv_path:
        return {}
    p = Path(csv_path)
    if not p.is_file():
        raise SlideError(p, "labels/manifest CSV does not exist")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "slide_id" not in reader.fieldnames:
            raise SlideError(p, f"CSV has no 'slide_id' column (columns: {reader.fieldnames})")
        rows: dict[str, dict[str, str]] = {}
        for i, row in enumerate(reader, start=2):
            sid = unicodedata.normalize("NFC", (row.get("slide_id") or "").strip())
            if not sid:
                raise SlideError(p, f"line {i}: empty slide_id")
            if sid in rows:
                raise SlideError(p, f"line {i}: slide_id {sid!r} listed twice")
            rows[sid] = row
    return rows


def manifest_mpp(rows: dict[str, dict[str, str]], slide_id: str) -> float | None:
    v = (rows.get(slide_id) or {}).get("mpp")
    if v is None or str(v).strip() == "":
        return None
    f = _float(v)
    if f is None:
        raise SlideError(slide_id, f"manifest mpp {v!r} is not a positive number")
    return f
