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


def slide_id_from_path(path: str | os.PathLike) -> str:
    """Slide id = file name without its extension (NFC-normalised so ids compare equal across OSes)."""
    name = Path(path).name
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


def _open_handle(path: Path, reader: str) -> tuple[Any, str]:
    errors = []
    order = ["openslide", "tiffslide"] if reader == "auto" else [reader]
    for name in order:
        try:
            if name == "openslide":
                import openslide

                return openslide.OpenSlide(str(path)), name
            import tiffslide

            return tiffslide.TiffSlide(str(path)), name
        except Exception as exc:  # noqa: BLE001 - collect every reader's reason
            errors.append(f"{name}: {type(exc).__name__}: {str(exc) or 'unsupported or corrupt file'}")
    raise SlideError(path, "cannot open slide (" + "; ".join(errors) + ")")


def open_slide(path: str | os.PathLike, reader: str = "auto", mpp: float | None = None,
               default_mpp: float | None = None) -> Slide:
    """Open a slide and resolve its level-0 µm/px (see module docstring for the order).

    ``mpp``: a per-slide value from the manifest (highest priority). ``default_mpp``: the config
    fallback, used only when the slide has no usable metadata.
    """
    path = Path(path)
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, not {reader!r}")
    if not path.exists():
        raise SlideError(path, "file does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(path, "file is empty (0 bytes)")
    handle, used = _open_handle(path, reader)
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
    return Slide(path=path, reader=used, mpp=value, mpp_source=source, _handle=handle)


def discover_slides(slides_dir: str | os.PathLike, extensions: tuple[str, ...] = SLIDE_EXTENSIONS,
                    recursive: bool = False) -> dict[str, Path]:
    """Slide id -> path for every slide file in a folder. Two files with the same id are refused up
    front, naming both paths. MIRAX (.mrxs) companion folders are not descended into."""
    root = Path(slides_dir)
    if not root.is_dir():
        raise SlideError(root, "slides_dir is not a folder")
    exts = tuple(e.lower() for e in extensions)
    found: dict[str, Path] = {}
    paths = root.rglob("*") if recursive else root.iterdir()
    for p in sorted(paths):
        if p.name.startswith(".") or not p.is_file() or not p.name.lower().endswith(exts):
            continue
        sid = slide_id_from_path(p)
        bad = sorted(set(sid) & set(UNSUPPORTED_ID_CHARS))
        if bad:
            raise SlideError(p, f"slide id {sid!r} contains {' '.join(bad)}, which workflow paths cannot hold "
                                "(rename the file; spaces and non-ASCII letters are fine)")
        if sid in found:
            raise SlideError(p, f"duplicate slide id {sid!r}: also {found[sid]} (rename one of them)")
        found[sid] = p
    return found


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
