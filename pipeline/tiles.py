"""Direct decoding of JPEG-compressed tiled TIFF pyramids (Aperio SVS, generic tiled TIFF).

OpenSlide spends most of a ``read_region`` call outside the JPEG decoder (ARGB conversion, compositing,
cache locking). For the most common WSI layout, tiled JPEG TIFF pages, this module reads the raw tile
bytes with ``pread`` and decodes them with libjpeg-turbo (imagecodecs), keeping a small LRU cache of
decoded tiles per process. Pixels are identical to OpenSlide's for level-aligned regions (tested).
Anything else (other compressions, NDPI, MRXS, odd layouts) is not handled here and the caller falls
back to OpenSlide / tiffslide.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

JPEG = 7
RGB, YCBCR = 2, 6


@dataclass
class _Level:
    width: int
    height: int
    tw: int
    th: int
    ntx: int
    offsets: tuple
    counts: tuple
    tables: bytes | None
    colorspace: str


class TiledJpegReader:
    """Region reader over the JPEG tile pages of one TIFF file, indexed like the slide's levels."""

    def __init__(self, path: str | os.PathLike, level_dimensions: list[tuple[int, int]],
                 cache_bytes: int | None = None):
        import threading

        import tifffile

        self._lock = threading.Lock()  # thread-safe (a decoder thread may share the reader)

        self.path = str(path)
        self.levels: dict[int, _Level] = {}
        with tifffile.TiffFile(self.path) as tf:
            pages = [p for p in tf.pages if getattr(p, "is_tiled", False)]
            for lvl, (w, h) in enumerate(level_dimensions):
                for p in pages:
                    if (int(p.imagewidth), int(p.imagelength)) != (w, h):
                        continue
                    if (p.compression != JPEG or p.photometric not in (RGB, YCBCR) or p.samplesperpixel != 3
                            or p.planarconfig != 1 or p.bitspersample != 8 or p.imagedepth != 1):
                        break
                    ntx = -(-w // p.tilewidth)
                    nty = -(-h // p.tilelength)
                    if len(p.dataoffsets) != ntx * nty:
                        break
                    self.levels[lvl] = _Level(w, h, int(p.tilewidth), int(p.tilelength), ntx,
                                              tuple(p.dataoffsets), tuple(p.databytecounts), p.jpegtables,
                                              "RGB" if p.photometric == RGB else "YCBCR")
                    break
        self.cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        if cache_bytes is None:
            # Patch rows overlap tile rows: keeping ~3 rows of tiles of the widest level decoded is enough
            # for row-major grids. Bounded by the slide's width, not its area (32-512 MiB).
            widest = max((L.ntx * L.tw * L.th * 3 for L in self.levels.values()), default=0)
            cache_bytes = min(max(3 * widest, 32 << 20), 512 << 20)
        self.cache_bytes = cache_bytes
        self._cached_bytes = 0
        self.decoded = 0  # tiles decoded so far (cache misses), for benchmarks
        self._fd: int | None = None
        self._pid = -1

    def supports(self, level: int) -> bool:
        return level in self.levels

    def _tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        key = (level, tx, ty)
        with self._lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                return hit
            if self._fd is None or self._pid != os.getpid():  # a forked process needs its own descriptor
                self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        import imagecodecs

        L = self.levels[level]
        i = ty * L.ntx + tx
        n = L.counts[i]
        if n == 0:  # sparse tile: nothing scanned there
            tile = np.full((L.th, L.tw, 3), 255, np.uint8)
        else:
            data = os.pread(self._fd, n, L.offsets[i])
            if len(data) != n:
                raise OSError(f"{self.path}: truncated file (tile {tx},{ty} of level {level})")
            tile = imagecodecs.jpeg8_decode(data, tables=L.tables, colorspace=L.colorspace, outcolorspace="RGB")
            self.decoded += 1
            if tile.shape[:2] != (L.th, L.tw):
                raise OSError(f"{self.path}: tile {tx},{ty} of level {level} decodes to {tile.shape}")
        with self._lock:  # decoded outside the lock; a rare duplicate decode is harmless
            if key not in self.cache:
                self.cache[key] = tile
                self._cached_bytes += tile.nbytes
            while self._cached_bytes > self.cache_bytes and len(self.cache) > 1:
                self._cached_bytes -= self.cache.popitem(last=False)[1].nbytes
        return tile

    def raw_tile(self, level: int, tx: int, ty: int) -> bytes | None:
        """The stored (compressed) bytes of one tile, or None for a sparse tile (nothing scanned)."""
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        L = self.levels[level]
        i = ty * L.ntx + tx
        n = L.counts[i]
        if n == 0:
            return None
        data = os.pread(self._fd, n, L.offsets[i])
        if len(data) != n:
            raise OSError(f"{self.path}: truncated file (tile {tx},{ty} of level {level})")
        return data

    def standalone_tile(self, level: int, tx: int, ty: int) -> bytes | None:
        """One tile as a complete JPEG file any decoder reads (see :func:`standalone_jpeg`)."""
        data = self.raw_tile(level, tx, ty)
        if data is None:
            return None
        L = self.levels[level]
        return standalone_jpeg(data, L.tables, rgb=L.colorspace == "RGB")

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at level pixel coordinates; outside the image is white."""
        L = self.levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, L.width), min(y + h, L.height)
        inside = (x0, y0, x1, y1) == (x, y, x + w, y + h)
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // L.th, (y1 - 1) // L.th + 1):
            for tx in range(x0 // L.tw, (x1 - 1) // L.tw + 1):
                tile = self._tile(level, tx, ty)
                sx0, sy0 = max(x0, tx * L.tw), max(y0, ty * L.th)
                sx1, sy1 = min(x1, (tx + 1) * L.tw), min(y1, (ty + 1) * L.th)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - ty * L.th:sy1 - ty * L.th,
                                                             sx0 - tx * L.tw:sx1 - tx * L.tw]
        return out

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


def open_tiled_jpeg(path: str | os.PathLike, level_dimensions: list[tuple[int, int]],
                    cache_bytes: int | None = None) -> TiledJpegReader | None:
    """A direct reader when the file is a JPEG tiled TIFF pyramid, else None."""
    if not str(path).lower().endswith((".svs", ".tif", ".tiff")):
        return None
    try:
        r = TiledJpegReader(path, level_dimensions, cache_bytes)
    except Exception:  # noqa: BLE001 - any parsing problem: use the general reader
        return None
    return r if r.levels else None


# ------------------------------------------------------------------------------------------------
# standalone JPEG files from TIFF tiles (for decoders that take whole files: nvJPEG, PIL, torchvision)
# ------------------------------------------------------------------------------------------------
_SOI, _EOI, _SOS, _APP0, _APP14 = 0xD8, 0xD9, 0xDA, 0xE0, 0xEE
#: APP14 "Adobe" segment with ColorTransform = 0: three components are RGB, not YCbCr (libjpeg's rule).
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def jpeg_segments(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split a JPEG stream into its header marker segments ``[(marker, bytes)]`` (SOI excluded) and the
    rest from the first SOS marker on (scan data and EOI, copied verbatim). A tables-only stream (TIFF
    JPEGTables: SOI, DQT/DHT..., EOI) has an empty rest."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream (no SOI marker)")
    segs: list[tuple[int, bytes]] = []
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise ValueError(f"corrupt JPEG header at byte {i}")
        j = i
        while j < n and data[j] == 0xFF:  # fill bytes
            j += 1
        if j >= n:
            break
        marker = data[j]
        if marker == _SOS:
            return segs, data[j - 1:]
        if marker == _EOI:
            return segs, b""
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            segs.append((marker, data[j - 1:j + 1]))
            i = j + 1
            continue
        if j + 3 > n:
            raise ValueError("truncated JPEG header")
        length = (data[j + 1] << 8) | data[j + 2]
        segs.append((marker, data[j - 1:j + 1 + length]))
        i = j + 1 + length
    raise ValueError("JPEG stream without a scan")


def standalone_jpeg(tile: bytes, tables: bytes | None, rgb: bool = False) -> bytes:
    """An abbreviated TIFF JPEG tile made into a complete JPEG file.

    The TIFF ``JPEGTables`` (quantisation and Huffman tables shared by every tile) are spliced in after
    SOI. ``rgb``: the tile is RGB-coded (TIFF photometric RGB, as in many Aperio SVS files: no YCbCr
    transform), which nothing inside the stream says; an Adobe APP14 marker with ColorTransform 0 is
    inserted and any JFIF APP0 / other APP14 marker removed (JFIF would imply YCbCr), so that a decoder
    that follows the JPEG conventions (libjpeg, PIL, torchvision) outputs the stored RGB unchanged.
    """
    head, scan = jpeg_segments(tile)
    table_segs = jpeg_segments(tables)[0] if tables else []
    parts = [b"\xff\xd8"]
    if rgb:
        parts.append(ADOBE_RGB)
        head = [(m, seg) for m, seg in head if m not in (_APP0, _APP14)]
    parts += [seg for _, seg in table_segs]
    parts += [seg for _, seg in head]
    parts.append(scan)
    return b"".join(parts)
