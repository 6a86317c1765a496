"""Synthetic H&E-like whole-slide images for the demo, the test suite and the benchmarks.

Each slide is a real pyramidal, tiled (256x256) JPEG TIFF written with tifffile, in one of two flavours:

``tiff``  (``.tif``) a generic tiled TIFF: level 0, then reduced pages (NewSubfileType=1) at downsample
          4, 16 (and 64 while that level is still >= 256 px on its short side). The resolution is stored
          in XResolution/YResolution with ResolutionUnit=CENTIMETER (10000/mpp px per cm); OpenSlide
          (vendor ``generic-tiff``) and tiffslide both report it as mpp.
``svs``   (``.svs``) Aperio layout: page 0 = level 0 whose ImageDescription starts with an Aperio header
          carrying ``AppMag`` and ``MPP``; page 1 = a stripped thumbnail; pages 2.. = the tiled reduced
          levels. OpenSlide reports vendor ``aperio``; tiffslide reads the same header.

Slides whose level 0 holds 4 GiB or more of raw pixels (e.g. 100,000 x 80,000) are written as BigTIFF,
which both readers open; smaller ones as classic TIFF.

Content: 1-3 irregular tissue sections on near-white glass, with eosin-pink fibrous stroma and scattered
hematoxylin nuclei (spindle fibroblasts and round lymphocytes). Positive slides (label 1) contain a few
"tumour" patches (about 10-30% of the tissue): purple-blue cytoplasm crowded with large, dark,
pleomorphic nuclei. Ground truth (tissue and tumour masks at downsample 16, plus a JSON) goes to
``masks_dir``. Output is deterministic for a given seed (byte-identical files).

Memory is bounded, whatever the slide size: the slide is generated and written one row of 256 px tiles
at a time. Geometry (tissue sections, holes, tumour patches) is a handful of analytic shapes plus smooth
noise; every field is a pure function of the position, evaluated on a lattice every 4 px around each tile;
fibre and pixel-noise textures come from small periodic banks; nuclei are drawn per tile from seeds
derived from their 256 px block. So tiles join seamlessly (a tile rendered at any origin equals the same
window of the stored image; tested). Each tile row is cascaded into the reduced levels (exact 4x area
averages) held in raw temporary files next to the output (3/16 byte per level-0 pixel for downsample 4),
which are written page by page after level 0. Peak memory grows with the slide's width (one tile row:
0.77 MB per 1,000 px) plus the ground-truth masks (2 bytes per 256 level-0 px): measured ~0.2 GB for
25,000 x 20,000 and ~0.46 GB for 100,000 x 80,000, in ~16 s and ~4 min of CPU (docs/benchmarks.md).

CLI::

    python -m pipeline.synthetic OUT_DIR --n 8 [--width 4096 --height 3072] [--mpp 0.5] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

#: Downsample of the ground-truth masks relative to level 0.
MASK_DOWNSAMPLE = 16
TILE = 256
JPEG_QUALITY = 80
APERIO_HEADER = "Aperio Image Library v12.0.15"
FLAVOURS = ("tiff", "svs")
#: Extension written for each flavour.
FLAVOUR_EXT = {"tiff": ".tif", "svs": ".svs"}

_GRID = 4  # fields (tissue, tumour, stain, illumination) are evaluated on lattice nodes at (4i+2, 4j+2)
_BASE = 2  # stroma/cytoplasm colour is computed at this downsample, then upsampled to level 0
_HALO = 32  # level-0 px around a tile covered by its lattice (blur support, nuclei reaching into the tile)
_REACH = 24  # no nucleus reaches further than this from its centre (level-0 px)
_COARSE_NODES = 1 << 21  # the whole-slide grid used to place holes/tumours stays below this many nodes
_FIB_PERIODS = (1024, 832)  # periods (base px) of the two fibre texture banks
_NOISE_PERIOD = 512  # period (px) of the per-pixel noise banks
_BIGTIFF_RAW_BYTES = 1 << 32  # level 0 with at least this many raw bytes -> BigTIFF
_ENCODE_BUFFER = 16 << 20  # bytes of tiles tifffile gathers before compressing them (2 threads)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def level_downsamples(width: int, height: int) -> list[int]:
    """Pyramid downsamples written: 1, 4, 16, and 64 while that level is still >= 256 px (short side)."""
    out = [1, 4, 16]
    if min(_ceil_div(width, 64), _ceil_div(height, 64)) >= TILE:
        out.append(64)
    return out


def _infer_flavour(path: Path, flavour: str | None) -> str:
    if flavour is None:
        return "svs" if path.suffix.lower() == ".svs" else "tiff"
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    return flavour


def _sample_where(rng: np.random.Generator, mask: np.ndarray, n: int) -> np.ndarray:
    """``n`` random (row, col) indices where ``mask`` is true (empty array if none)."""
    idx = np.flatnonzero(mask)
    if idx.size == 0 or n <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    pick = idx[rng.integers(0, idx.size, size=n)]
    return np.stack(np.unravel_index(pick, mask.shape), axis=1)


# ----------------------------------------------------------------------------------------------------
# smooth noise as a pure function of the position (hashed lattice values smoothed by a cubic B-spline)
# ----------------------------------------------------------------------------------------------------
_U64 = np.uint64


def _hash_uniform(ix: np.ndarray, iy: np.ndarray, key: int | np.ndarray) -> np.ndarray:
    """Uniform float32 in [-1, 1) for integer lattice points (ix, iy) and 64-bit keys (all broadcast)."""
    h = ix.astype(np.uint64) * _U64(0x9E3779B97F4A7C15) + iy.astype(np.uint64) * _U64(0xC2B2AE3D27D4EB4F)
    h += np.asarray(key, np.uint64)
    h ^= h >> _U64(30)
    h *= _U64(0xBF58476D1CE4E5B9)
    h ^= h >> _U64(27)
    h *= _U64(0x94D049BB133111EB)
    h ^= h >> _U64(31)
    return (h >> _U64(40)).astype(np.float32) * np.float32(2.0 / (1 << 24)) - np.float32(1.0)


def _bspline_weights(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline weights (..., 4) of the lattice nodes at offsets -1, 0, 1, 2, for fractions ``t``."""
    t = t.astype(np.float32)
    t2 = t * t
    t3 = t2 * t
    u = 1.0 - t
    sixth = np.float32(1.0 / 6.0)
    return np.stack([u * u * u * sixth, t3 * 0.5 - t2 + np.float32(2.0 / 3.0),
                     (3.0 * (t2 - t3 + t) + 1.0) * sixth, t3 * sixth], axis=-1)


# A lattice of U(-1, 1) values (variance 1/3) smoothed by the cubic B-spline has, at a uniformly random
# position, variance k^2 / 3 with k = E[sum of squared weights] along one axis; its values never leave
# [-1, 1] (the weights are >= 0 and sum to 1).
_BSPLINE_K = float((_bspline_weights((np.arange(4096) + 0.5) / 4096).astype(np.float64) ** 2).sum(1).mean())
_NOISE_SD = math.sqrt(1.0 / 3.0) * _BSPLINE_K
#: |noise| never exceeds this (1 / sd): used to bound where a field can change sign.
NOISE_MAX = 1.0 / _NOISE_SD


@dataclass(frozen=True)
class _Noise:
    """Zero-mean, unit-variance smooth noise with features about ``cell`` px across, bounded by NOISE_MAX:
    random values on a lattice of spacing ``cell``, smoothed by a cubic B-spline."""

    key: int
    cell: float

    def grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return _noise_grids([self], xs, ys)[0]


def _noise_grids(noises: list[_Noise], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Several noises at the level-0 positions xs (columns) x ys (rows, both ascending), as a
    (k, len(ys), len(xs)) float32 array. The value at a point does not depend on the grid it is evaluated
    in (same lattice values, same weights, same order of operations), so neighbouring tiles agree."""
    k = len(noises)
    cells = np.array([n.cell for n in noises], np.float64)[:, None]
    keys = np.array([n.key for n in noises], np.uint64)[:, None, None]
    gx = np.asarray(xs, np.float64)[None, :] / cells
    gy = np.asarray(ys, np.float64)[None, :] / cells
    ix, iy = np.floor(gx), np.floor(gy)
    wx, wy = _bspline_weights(gx - ix), _bspline_weights(gy - iy)  # (k, nx, 4), (k, ny, 4)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    x0, y0 = ix[:, 0] - 1, iy[:, 0] - 1
    nnx, nny = int((ix[:, -1] - x0).max()) + 3, int((iy[:, -1] - y0).max()) + 3
    v = _hash_uniform((x0[:, None] + np.arange(nnx))[:, None, :], (y0[:, None] + np.arange(nny))[:, :, None],
                      keys)  # (k, nny, nnx)
    kk = np.arange(k)[:, None]
    ry = iy - 1 - y0[:, None]
    rows = wy[:, :, 0, None] * v[kk, ry]
    for j in range(1, 4):
        rows += wy[:, :, j, None] * v[kk, ry + j]  # (k, ny, nnx)
    rx = (ix - 1 - x0[:, None])[:, None, :]
    kk, yy = np.arange(k)[:, None, None], np.arange(rows.shape[1])[None, :, None]
    out = rows[kk, yy, rx] * wx[:, None, :, 0]
    for j in range(1, 4):
        out += rows[kk, yy, rx + j] * wx[:, None, :, j]
    return out * np.float32(1.0 / _NOISE_SD)


def _new_noise(rng: np.random.Generator, cell: float) -> _Noise:
    return _Noise(int(rng.integers(0, 1 << 63)), float(cell))


# ----------------------------------------------------------------------------------------------------
# geometry: tissue sections, holes, tumour patches (float fields; > 0 means inside)
# ----------------------------------------------------------------------------------------------------
def _radial_profile(rng: np.random.Generator, strength: float, kmax: int = 6) -> list[tuple[int, float, float]]:
    return [(k, float(rng.uniform(0.0, strength)) / (k / 2.0), float(rng.uniform(0, 2 * np.pi)))
            for k in range(2, kmax + 1)]


def _blob_field(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, rot: float,
                harmonics: list[tuple[int, float, float]]) -> np.ndarray:
    """1 - rho / r(theta): positive inside a smooth irregular blob (semi-axes a, b, rotation rot)."""
    c, s = math.cos(rot), math.sin(rot)
    dx, dy = xx - cx, yy - cy
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    r = np.ones_like(rho)
    for k, amp, ph in harmonics:
        r += amp * np.cos(k * theta + ph)
    return 1.0 - rho / np.maximum(r, 0.3)


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (level-0 px, inclusive)


@dataclass
class _Blob:
    cx: float
    cy: float
    a: float
    b: float
    rot: float
    harmonics: list[tuple[int, float, float]]

    def value(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        return _blob_field(xx, yy, self.cx, self.cy, self.a, self.b, self.rot, self.harmonics)

    def box(self, c: float) -> Box:
        """Bounding box of {value >= -c}."""
        rmax = max(1.0 + sum(amp for _, amp, _ in self.harmonics), 0.3)
        reach = (1.0 + c) * rmax * max(self.a, self.b) + 1.0
        return (self.cx - reach, self.cy - reach, self.cx + reach, self.cy + reach)


def _hits(box: Box, xs: np.ndarray, ys: np.ndarray) -> bool:
    return bool(xs[-1] >= box[0] and xs[0] <= box[2] and ys[-1] >= box[1] and ys[0] <= box[3])


def _window(box: Box, xs: np.ndarray, ys: np.ndarray) -> tuple[slice, slice]:
    """Rows/columns of the (ascending) node positions ys/xs inside ``box``."""
    c0, c1 = np.searchsorted(xs, box[0], "left"), np.searchsorted(xs, box[2], "right")
    r0, r1 = np.searchsorted(ys, box[1], "left"), np.searchsorted(ys, box[3], "right")
    return slice(int(r0), int(r1)), slice(int(c0), int(c1))


# The tissue field never exceeds 1 + 0.15 * NOISE_MAX (< 2): a hole's -value >= 2 outside its window
# cannot cut anything, and a blob's value <= -1 never beats the background of -1, so evaluating each
# shape only inside its window defines the same field everywhere (and lets a tile skip far shapes).
_BLOB_WINDOW = 1.0
_HOLE_WINDOW = 2.0


class _Geometry:
    """Tissue sections (1-3 blobs + noise, a glass margin, some holes/tears) and tumour patches."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, positive: bool):
        self.width, self.height = width, height
        # whole-slide grid used only to place holes and tumours (< _COARSE_NODES nodes, step >= 4 px)
        step = _GRID
        while _ceil_div(width, step) * _ceil_div(height, step) > _COARSE_NODES:
            step *= 2
        self.coarse_step = step
        cx = ((np.arange(_ceil_div(width, step)) + 0.5) * step).astype(np.float32)
        cy = ((np.arange(_ceil_div(height, step)) + 0.5) * step).astype(np.float32)

        margin = 0.05 * min(width, height)
        self.margin = margin
        n_blobs = int(rng.integers(1, 4))
        # one cell per blob along the long side, so sections do not overlap and keep a margin
        horizontal = width >= height
        long_side = width if horizontal else height
        cuts = np.sort(rng.uniform(0.35, 0.65, size=n_blobs - 1)) if n_blobs > 1 else np.array([])
        if n_blobs == 3:
            cuts = np.array([rng.uniform(0.28, 0.38), rng.uniform(0.62, 0.72)])
        edges = np.concatenate([[0.0], cuts, [1.0]]) * long_side
        self.blobs: list[_Blob] = []
        for i in range(n_blobs):
            lo, hi = edges[i] + margin / 2, edges[i + 1] - margin / 2
            if i == 0:
                lo = margin
            if i == n_blobs - 1:
                hi = long_side - margin
            short = (height if horizontal else width) - 2 * margin
            half_l, half_s = (hi - lo) / 2, short / 2
            c_l = (lo + hi) / 2 + rng.uniform(-0.05, 0.05) * half_l
            c_s = (margin + short / 2) + rng.uniform(-0.05, 0.05) * half_s
            fill_l, fill_s = rng.uniform(0.6, 0.85), rng.uniform(0.6, 0.85)
            bx, by = (c_l, c_s) if horizontal else (c_s, c_l)
            a, b = (half_l * fill_l, half_s * fill_s) if horizontal else (half_s * fill_s, half_l * fill_l)
            rot = float(rng.uniform(-0.25, 0.25))
            self.blobs.append(_Blob(float(bx), float(by), float(a), float(b), rot, _radial_profile(rng, 0.13)))
        # outline noise (amplitude, noise): its cells grow with the slide like the sections do, so that the
        # ragged band along the edge keeps its proportions; on slides larger than 3072 px a fixed-size term
        # keeps the edge irregular at the cell scale
        s = max(1.0, min(width, height) / 3072.0)
        self.tissue_noise = [(0.10, _new_noise(rng, 220.0 * s)), (0.025, _new_noise(rng, 60.0 * s))]
        if s > 1.0:
            self.tissue_noise.append((0.025 / s, _new_noise(rng, 60.0)))
        # where every blob is below -reach, the tissue field (blob + noise) is certainly negative
        self.tissue_reach = sum(a for a, _ in self.tissue_noise) * NOISE_MAX + 0.02
        self.holes: list[tuple[_Blob, Box]] = []
        self.tumours: list[tuple[_Blob, Box]] = []
        self.tumour_noise: list[tuple[float, _Noise]] = []
        self.tumour_reach = 0.0
        self._size_scale = s

        coarse = self.tissue(cx, cy)
        self._add_holes(rng, coarse > 0.3, cx, cy)
        if positive:
            self._add_tumours(rng, self.tissue(cx, cy), cx, cy)

    # -- construction --------------------------------------------------------------------------------
    def _add_holes(self, rng: np.random.Generator, inner: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> None:
        """Occasional small holes and thin tears inside the tissue."""
        if rng.random() < 0.3:
            return
        n = int(rng.integers(1, 5))
        scale = min(self.width, self.height) / 3072.0
        for r, c in _sample_where(rng, inner, n):
            if rng.random() < 0.6:  # round-ish hole (vessel lumen, fat, lost tissue)
                a = rng.uniform(40, 140) * max(scale, 0.5)
                b = a * rng.uniform(0.5, 1.0)
            else:  # thin tear
                a = rng.uniform(180, 520) * max(scale, 0.4)
                b = rng.uniform(10, 22)
            hole = _Blob(float(cx[c]), float(cy[r]), float(a), float(b), float(rng.uniform(0, np.pi)),
                         _radial_profile(rng, 0.2))
            self.holes.append((hole, hole.box(_HOLE_WINDOW)))

    def _add_tumours(self, rng: np.random.Generator, tissue_field: np.ndarray, cx: np.ndarray,
                     cy: np.ndarray) -> None:
        """Tumour patches covering ~10-30% of the tissue (sized on the coarse grid)."""
        tissue = tissue_field > 0
        tissue_nodes = int(tissue.sum())
        n = int(rng.integers(2, 5))
        inner = tissue_field > 0.25
        centres = _sample_where(rng, inner if inner.any() else tissue, n)
        target = float(rng.uniform(0.14, 0.24))
        weights = rng.dirichlet(np.full(n, 2.0))
        shapes = [(float(rng.uniform(0.6, 1.0)), float(rng.uniform(0, np.pi)), _radial_profile(rng, 0.22))
                  for _ in range(n)]
        s = self._size_scale
        self.tumour_noise = [(0.12, _new_noise(rng, 90.0 * s))]
        if s > 1.0:
            self.tumour_noise.append((0.03 / s, _new_noise(rng, 90.0)))
        self.tumour_reach = sum(a for a, _ in self.tumour_noise) * NOISE_MAX + 0.02
        area_px = tissue_nodes * float(self.coarse_step) ** 2
        noise = list(_noise_grids([n for _, n in self.tumour_noise], cx, cy))
        scale = 1.0
        for _ in range(8):
            self.tumours = []
            for (r, c), w, (asp, rot, harm) in zip(centres, weights, shapes):
                a = math.sqrt(max(w * target * area_px, 1.0) / (math.pi * asp)) * scale
                blob = _Blob(float(cx[c]), float(cy[r]), a, a * asp, rot, harm)
                self.tumours.append((blob, blob.box(_BLOB_WINDOW)))
            field_ = self.tumour(cx, cy, tissue_field, noise)
            frac = float(((field_ > 0) & tissue).sum()) / max(tissue_nodes, 1)
            if 0.10 <= frac <= 0.30 and abs(frac - target) < 0.05:
                break
            scale *= math.sqrt(target / max(frac, 1e-3))

    # -- evaluation on a grid of level-0 positions xs (columns) x ys (rows) ----------------------------
    def may_hold_tissue(self, xs: np.ndarray, ys: np.ndarray) -> bool:
        return any(_hits(b.box(self.tissue_reach), xs, ys) for b in self.blobs)

    def may_hold_tumour(self, xs: np.ndarray, ys: np.ndarray) -> bool:
        return any(_hits(b.box(self.tumour_reach), xs, ys) for b, _ in self.tumours)

    def tissue(self, xs: np.ndarray, ys: np.ndarray, noise: list[np.ndarray] | None = None) -> np.ndarray:
        """The tissue field at xs x ys; ``noise``: the values of ``tissue_noise`` there, if known."""
        if noise is None:
            noise = list(_noise_grids([n for _, n in self.tissue_noise], xs, ys))
        xx, yy = xs[None, :], ys[:, None]
        f = np.full((ys.size, xs.size), -1.0, np.float32)
        for blob in self.blobs:
            win = _window(blob.box(_BLOB_WINDOW), xs, ys)
            if win[0].stop > win[0].start and win[1].stop > win[1].start:
                f[win] = np.maximum(f[win], blob.value(xx[:, win[1]], yy[win[0]]))
        for (amp, _), values in zip(self.tissue_noise, noise):
            f += amp * values
        # keep a strip of glass along every border
        m = self.margin
        bx = np.minimum(xx, self.width - xx) - m * 0.6
        by = np.minimum(yy, self.height - yy) - m * 0.6
        f = np.minimum(f, np.minimum(bx, by) / (0.5 * m))
        for hole, box in self.holes:
            win = _window(box, xs, ys)
            if win[0].stop > win[0].start and win[1].stop > win[1].start:
                f[win] = np.minimum(f[win], -hole.value(xx[:, win[1]], yy[win[0]]))
        return f.astype(np.float32, copy=False)

    def tumour(self, xs: np.ndarray, ys: np.ndarray, tissue: np.ndarray, noise: list[np.ndarray] | None = None
               ) -> np.ndarray:
        """The tumour field at xs x ys, given the tissue field there (and ``tumour_noise`` there, if known)."""
        if noise is None:
            noise = list(_noise_grids([n for _, n in self.tumour_noise], xs, ys))
        xx, yy = xs[None, :], ys[:, None]
        f = np.full((ys.size, xs.size), -1.0, np.float32)
        for blob, box in self.tumours:
            win = _window(box, xs, ys)
            if win[0].stop > win[0].start and win[1].stop > win[1].start:
                f[win] = np.maximum(f[win], blob.value(xx[:, win[1]], yy[win[0]]))
        for (amp, _), values in zip(self.tumour_noise, noise):
            f += amp * values
        return np.minimum(f, tissue * 4.0).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------------
# rendering, one 256 px tile at a time
# ----------------------------------------------------------------------------------------------------
def _line_kernel(length: int, angle: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2.0
    dx, dy = math.cos(angle) * c, math.sin(angle) * c
    cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1,
             cv2.LINE_AA)
    return k / k.sum()


def _fibre_bank(rng: np.random.Generator, period: int, angle: float) -> np.ndarray:
    """A periodic (``period`` x ``period``) unit-std texture of short fibres along ``angle``."""
    pad = 16
    white = np.pad(rng.standard_normal((period, period)).astype(np.float32), pad, mode="wrap")
    white = cv2.GaussianBlur(white, (0, 0), 0.8)
    fib = cv2.filter2D(white, -1, _line_kernel(19, angle))[pad:-pad, pad:-pad]
    fib = (fib - fib.mean()) / max(float(fib.std()), 1e-6)
    return np.ascontiguousarray(fib, np.float32)


def _wrap_pad(bank: np.ndarray, extra: int) -> np.ndarray:
    """``bank`` extended periodically by ``extra`` rows/columns, so any window of that size is a slice."""
    pad = ((0, extra), (0, extra)) + ((0, 0),) * (bank.ndim - 2)
    return np.pad(bank, pad, mode="wrap")


def _wrap_slice(padded: np.ndarray, period: int, y: int, x: int, n: int) -> np.ndarray:
    y, x = y % period, x % period
    return padded[y:y + n, x:x + n]


def _bilinear(v: np.ndarray, i0: int, j0: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Values (N, k) of the lattice fields ``v`` (n, n, k) at points: node (i, j) lies at level-0 (4i+2, 4j+2)
    and v[0, 0] is node (i0, j0). Each point's value is the same whatever lattice window holds it."""
    gx, gy = (x - _GRID / 2) / _GRID, (y - _GRID / 2) / _GRID
    ix, iy = np.floor(gx), np.floor(gy)
    tx, ty = (gx - ix).astype(np.float32)[:, None], (gy - iy).astype(np.float32)[:, None]
    c, r = ix.astype(np.int64) - i0, iy.astype(np.int64) - j0
    top = v[r, c] * (1 - tx) + v[r, c + 1] * tx
    bot = v[r + 1, c] * (1 - tx) + v[r + 1, c + 1] * tx
    return top * (1 - ty) + bot * ty


_SH = 4  # fixed-point bits for sub-pixel drawing
_ONE = 1 << _SH
_K = 14  # vertices of a tumour nucleus outline
# columns of a block's candidate arrays
_S_COLS = ("x", "y", "keep", "lymph", "a_l", "a_f", "b_l", "b_f", "angle", "shade")
_T_COLS = ("x", "y", "r", "g", "b", "nucleolus", "nuc_x", "nuc_y", "rad")  # nuc_*, rad: fixed point
_S = {k: i for i, k in enumerate(_S_COLS)}


@dataclass
class _Nuclei:
    """Candidate nuclei of one 256 px block: centres uniform in the block, kept at drawing time where the
    tissue (stroma) or tumour field is positive at the centre."""

    s: np.ndarray = field(default_factory=lambda: np.zeros((0, len(_S_COLS))))  # stroma candidates
    t: np.ndarray = field(default_factory=lambda: np.zeros((0, len(_T_COLS))))  # tumour candidates
    t_pts: np.ndarray = field(default_factory=lambda: np.zeros((0, _K, 2), np.int64))  # fixed-point outlines


class _Renderer:
    """Everything random about one slide, drawn once; ``tile_at(x0, y0)`` renders one level-0 tile."""

    def __init__(self, seed: int, width: int, height: int, positive: bool, blank: bool):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
        self.width, self.height = width, height
        self.ntx, self.nty = _ceil_div(width, TILE), _ceil_div(height, TILE)
        self.geom = g = None if blank else _Geometry(rng, width, height, positive)
        self.glass = np.array([rng.uniform(236, 243), rng.uniform(235, 242), rng.uniform(238, 245)], np.float32)
        self.stain = np.array([rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)], np.float32)
        # illumination, stain intensity, fibre-direction mix, loose stroma, nuclear density; then geometry's
        self.noises = [_new_noise(rng, c) for c in (600.0, 260.0, 300.0, 140.0, 384.0)]
        n_t = n_u = 0
        if g is not None:
            n_t, n_u = len(g.tissue_noise), len(g.tumour_noise)
            self.noises += [n for _, n in g.tissue_noise] + [n for _, n in g.tumour_noise]
        self._t_noise = list(range(5, 5 + n_t))  # where the geometry's noises are in self.noises
        self._u_noise = list(range(5 + n_t, 5 + n_t + n_u))
        self.angle = float(rng.uniform(0, np.pi))
        self.nuclei_key = int(rng.integers(0, 1 << 63))
        n_base = TILE // _BASE + 4
        self.fib = [(_wrap_pad(_fibre_bank(rng, p, self.angle + 1.1 * i), n_base), p)
                    for i, p in enumerate(_FIB_PERIODS)]
        self.tum_tex = _wrap_pad(rng.standard_normal((_NOISE_PERIOD, _NOISE_PERIOD)).astype(np.float32), n_base)
        # per-pixel noise, split into its positive and negative parts so that it is added with saturation
        P = _NOISE_PERIOD
        weak = np.clip(rng.normal(0, 1.6, (P, P, 3)), -6, 6).astype(np.int16)
        lum = rng.normal(0, 5.0, (P, P, 1))
        strong = np.clip(lum + rng.normal(0, 2.5, (P, P, 3)), -20, 20).astype(np.int16)
        self.pixel_noise = {name: tuple(_wrap_pad(np.maximum(sign * b, 0).astype(np.uint8), TILE) for sign in (1, -1))
                            for name, b in (("weak", weak), ("strong", strong))}
        self._blocks: dict[tuple[int, int], _Nuclei] = {}

    # -- nuclei ----------------------------------------------------------------------------------------
    def _block(self, bx: int, by: int) -> _Nuclei:
        key = (bx, by)
        got = self._blocks.get(key)
        if got is not None:
            return got
        nb = _Nuclei()
        x0, y0 = bx * TILE, by * TILE
        g = self.geom
        if (g is not None and 0 <= bx < self.ntx and 0 <= by < self.nty
                and g.may_hold_tissue(np.array([x0 - 1.0, x0 + TILE + 1.0]), np.array([y0 - 1.0, y0 + TILE + 1.0]))):
            rng = np.random.default_rng([self.nuclei_key, by, bx])
            area = float(TILE * TILE)
            # stroma: spindle fibroblasts + round lymphocytes, density varies (inflamed areas)
            m = int(rng.poisson(area / 700.0))
            u = rng.random((m, 9))
            s = np.empty((m, len(_S_COLS)))
            s[:, 0], s[:, 1] = x0 + u[:, 0] * TILE, y0 + u[:, 1] * TILE
            s[:, 2], s[:, 3] = u[:, 2], u[:, 3]  # keep / lymphocyte draws, compared with the local density
            s[:, 4], s[:, 5] = 4.5 + 2.0 * u[:, 4], 8.0 + 6.0 * u[:, 5]  # long semi-axis: lymphocyte, fibroblast
            s[:, 6], s[:, 7] = 0.85 + 0.15 * u[:, 6], 2.4 + 1.6 * u[:, 7]  # short: ratio, absolute
            s[:, 8] = np.degrees(self.angle + 0.35 * rng.standard_normal(m))
            s[:, 9] = 2.0 * u[:, 8] - 1.0
            nb.s = s
            # tumour: crowded, large, pleomorphic, hyperchromatic, bluer; some with nucleoli
            m = int(rng.poisson(area / 420.0)) if g.tumours else 0
            u = rng.random((m, 9 + _K))
            r = np.minimum(np.exp(math.log(10.5) + 0.25 * rng.standard_normal(m)), 18.0)
            cx, cy = x0 + u[:, 0] * TILE, y0 + u[:, 1] * TILE
            asp, rot, shade = 0.6 + 0.4 * u[:, 2], 2 * np.pi * u[:, 3], 2.0 * u[:, 4] - 1.0
            th = np.linspace(0, 2 * np.pi, _K, endpoint=False)[None, :]
            jitter = 1.0 + (0.36 * u[:, 9:] - 0.18)
            jitter = (jitter + np.roll(jitter, 1, axis=1) + np.roll(jitter, -1, axis=1)) / 3.0
            px = r[:, None] * jitter * np.cos(th)
            py = r[:, None] * asp[:, None] * jitter * np.sin(th)
            c, sn = np.cos(rot)[:, None], np.sin(rot)[:, None]
            fx, fy = cx[:, None] + px * c - py * sn, cy[:, None] + px * sn + py * c
            nb.t_pts = np.floor(np.stack([fx, fy], axis=2) * _ONE).astype(np.int64)
            t = np.empty((m, len(_T_COLS)))
            t[:, 0], t[:, 1] = cx, cy
            t[:, 2], t[:, 3], t[:, 4] = 66 + 18 * shade, 40 + 14 * shade, 132 + 16 * shade
            t[:, 5] = u[:, 5] < 0.35
            t[:, 6] = np.floor((cx + (0.6 * u[:, 6] - 0.3) * r) * _ONE)
            t[:, 7] = np.floor((cy + (0.6 * u[:, 7] - 0.3) * r) * _ONE)
            t[:, 8] = np.floor((1.4 + 1.0 * u[:, 8]) * _ONE)
            nb.t = t
        self._blocks[key] = nb
        return nb

    def _forget_blocks(self, below_row: int) -> None:
        for k in [k for k in self._blocks if k[1] < below_row]:
            del self._blocks[k]

    def _draw_nuclei(self, img: np.ndarray, x0: int, y0: int, lat: np.ndarray, i0: int, j0: int) -> None:
        """Draw into ``img`` (top-left pixel at level-0 (x0, y0)) every nucleus that reaches it; ``lat`` holds
        the tissue, tumour and nuclear-density fields on the lattice (n, n, 3) starting at node (i0, j0)."""
        lo_x, hi_x = x0 - _REACH, x0 + img.shape[1] + _REACH
        lo_y, hi_y = y0 - _REACH, y0 + img.shape[0] + _REACH
        # the blocks whose nuclei can reach the image, in row-major order (one global drawing order)
        blocks = [self._block(bx, by) for by in range(lo_y // TILE, (hi_y - 1) // TILE + 1)
                  for bx in range(lo_x // TILE, (hi_x - 1) // TILE + 1)]
        aa = cv2.LINE_AA
        ox, oy = x0 * _ONE, y0 * _ONE
        s = np.concatenate([nb.s for nb in blocks])
        s = s[(s[:, 0] >= lo_x) & (s[:, 0] < hi_x) & (s[:, 1] >= lo_y) & (s[:, 1] < hi_y)]
        if len(s):
            f = _bilinear(lat, i0, j0, s[:, 0], s[:, 1])
            d = f[:, 2]
            ok = (f[:, 0] > 0) & ~(f[:, 1] > 0) & (s[:, _S["keep"]] < np.clip(0.5 + 0.4 * d, 0.05, 1.0))
            s, d = s[ok], d[ok]
            lymph = s[:, _S["lymph"]] < np.clip(0.3 + 0.25 * d, 0.05, 0.9)
            a_l = s[:, _S["a_l"]]
            ax_a = np.where(lymph, a_l, s[:, _S["a_f"]])
            ax_b = np.where(lymph, a_l * s[:, _S["b_l"]], s[:, _S["b_f"]])
            sh = s[:, _S["shade"]]
            col = np.stack([np.where(lymph, 58, 92) + 14 * sh, np.where(lymph, 36, 56) + 10 * sh,
                            np.where(lymph, 112, 140) + 14 * sh], axis=1).tolist()
            cx = (np.floor(s[:, 0] * _ONE).astype(np.int64) - ox).tolist()
            cy = (np.floor(s[:, 1] * _ONE).astype(np.int64) - oy).tolist()
            A, B = (ax_a * _ONE).astype(np.int64).tolist(), (ax_b * _ONE).astype(np.int64).tolist()
            ang = s[:, _S["angle"]].tolist()
            for i in range(len(cx)):
                cv2.ellipse(img, (cx[i], cy[i]), (A[i], B[i]), ang[i], 0, 360, col[i], -1, aa, _SH)
        t = np.concatenate([nb.t for nb in blocks])
        sel = np.flatnonzero((t[:, 0] >= lo_x) & (t[:, 0] < hi_x) & (t[:, 1] >= lo_y) & (t[:, 1] < hi_y))
        if sel.size == 0:
            return
        f = _bilinear(lat, i0, j0, t[sel, 0], t[sel, 1])
        sel = sel[(f[:, 0] > 0) & (f[:, 1] > 0)]
        if sel.size == 0:
            return
        t = t[sel]
        pts = (np.concatenate([nb.t_pts for nb in blocks])[sel] - np.array([ox, oy], np.int64)).astype(np.int32)
        col = t[:, 2:5].tolist()
        nucleolus = (t[:, 5] > 0).tolist()
        nx = (t[:, 6].astype(np.int64) - ox).tolist()
        ny = (t[:, 7].astype(np.int64) - oy).tolist()
        rad = t[:, 8].astype(np.int64).tolist()
        for i in range(len(col)):
            cv2.fillPoly(img, [pts[i]], col[i], aa, _SH)
            if nucleolus[i]:
                cv2.circle(img, (nx[i], ny[i]), rad[i], (34.0, 16.0, 78.0), -1, aa, _SH)

    # -- one tile --------------------------------------------------------------------------------------
    def _lattice_noise(self, k: int, i0: int, j0: int, n: int) -> np.ndarray:
        """The first ``k`` noises on the n x n lattice from node (i0, j0), as (n, n, k): evaluated on nodes every
        16 px (at 16m+8) and interpolated linearly, which puts every 4 px node at a fixed fraction of its
        16 px cell: the same value whichever tile asks."""
        m0, l0 = (i0 - 2) // 4, (j0 - 2) // 4
        nm = max(i0 - 4 * m0, j0 - 4 * l0) // 4 + (n + 1) // 4 + 3
        xs = (np.arange(m0, m0 + nm) * 16 + 8).astype(np.float64)
        ys = (np.arange(l0, l0 + nm) * 16 + 8).astype(np.float64)
        coarse = np.ascontiguousarray(_noise_grids(self.noises[:k], xs, ys).transpose(1, 2, 0))
        fine = cv2.resize(coarse, (nm * 4, nm * 4), interpolation=cv2.INTER_LINEAR).reshape(nm * 4, nm * 4, k)
        return fine[j0 - 4 * l0:j0 - 4 * l0 + n, i0 - 4 * m0:i0 - 4 * m0 + n]

    def tile_at(self, x0: int, y0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The level-0 RGB image (256x256x3 uint8) whose top-left pixel is (x0, y0) (multiples of 8), and its
        tissue/tumour masks. Every pixel is a function of its position only: tiles at any origin agree."""
        if x0 % 8 or y0 % 8:
            raise ValueError(f"tile origin must be a multiple of 8, got {(x0, y0)}")
        # lattice nodes covering the tile plus _HALO px (and 1-2 nodes for interpolation)
        i0, j0 = (x0 - _HALO) // _GRID - 1, (y0 - _HALO) // _GRID - 1
        n = (TILE + 2 * _HALO) // _GRID + 3
        xs = ((np.arange(i0, i0 + n) * _GRID) + _GRID / 2).astype(np.float32)
        ys = ((np.arange(j0, j0 + n) * _GRID) + _GRID / 2).astype(np.float32)
        g = self.geom
        maybe = g is not None and g.may_hold_tissue(xs, ys)
        nz = self._lattice_noise(len(self.noises) if maybe else 1, i0, j0, n)
        fields = {"illum": nz[..., 0] * np.float32(1.5)}
        if maybe:
            assert g is not None
            T = g.tissue(xs, ys, [nz[..., k] for k in self._t_noise])
            if (T > 0).any():
                fields["T"] = T
                if g.tumours and g.may_hold_tumour(xs, ys):
                    U = g.tumour(xs, ys, T, [nz[..., k] for k in self._u_noise])
                    if (U > 0).any():
                        fields["U"] = U
        tissue = "T" in fields
        if tissue:
            fields["lf"], fields["mix"], fields["loose"] = nz[..., 1], nz[..., 2], nz[..., 3]
        names = list(fields)
        # base resolution (downsample 2): resizing the lattice by 2 gives an array that starts at base px
        # 2*i0; keep the tile plus hb base px for the blurs (kernel radius <= 8)
        hb = 8
        nb = TILE // _BASE + 2 * hb
        obx, oby = (x0 // _BASE - hb) - 2 * i0, (y0 // _BASE - hb) - 2 * j0
        stack = np.dstack([fields[k] for k in names]) if len(names) > 1 else fields["illum"]
        big = cv2.resize(stack, (n * 2, n * 2), interpolation=cv2.INTER_LINEAR)[oby:oby + nb, obx:obx + nb]
        planes = dict(zip(names, cv2.split(big) if len(names) > 1 else [big]))
        e2 = 2  # base px kept around the tile for the 2x upsampling
        core = slice(hb - e2, hb + TILE // _BASE + e2)
        illum = planes["illum"][core, core]
        if tissue:
            alpha = cv2.GaussianBlur((planes["T"] > 0).astype(np.float32), (0, 0), 1.2)[core, core]
            by0, bx0 = y0 // _BASE - e2, x0 // _BASE - e2
            m = TILE // _BASE + 2 * e2
            mix = np.clip(0.5 + 0.5 * planes["mix"][core, core], 0, 1)
            (f1, p1), (f2, p2) = self.fib
            fib = _wrap_slice(f1, p1, by0, bx0, m) * mix + _wrap_slice(f2, p2, by0, bx0, m) * (1 - mix)
            lf = planes["lf"][core, core]
            loose = np.clip(planes["loose"][core, core] - 1.2, 0, None)
            e = np.clip(0.55 + 0.15 * lf + (0.15 / 0.8) * fib - 0.35 * loose, 0.02, 1.0) * self.stain[0]
            np.minimum(e, 1.2, out=e)
            if "U" in planes:
                t_alpha = cv2.GaussianBlur((planes["U"] > 0).astype(np.float32), (0, 0), 2.0)[core, core]
                tt = _wrap_slice(self.tum_tex, _NOISE_PERIOD, by0, bx0, m)
                t_e = np.clip(0.6 + 0.15 * lf + 0.12 * tt, 0, 1) * self.stain[1]
            chans = []
            for c, (light, dark, t_light, t_dark) in enumerate(zip((246, 205, 228), (214, 104, 168),
                                                                   (222, 172, 218), (170, 104, 178))):
                stroma = light + (dark - light) * e  # eosin stroma
                if "U" in planes:  # purple tumour cytoplasm
                    stroma += (t_light + (t_dark - t_light) * t_e - stroma) * t_alpha
                b = self.glass[c] + illum
                b += (stroma - b) * alpha
                chans.append(b)
        else:
            chans = [self.glass[c] + illum for c in range(3)]
        base_u8 = cv2.merge([np.clip(b + 0.5, 0, 255).astype(np.uint8) for b in chans])
        # level 0: the canvas covers the tile plus 4 px (anti-aliased shapes clipped at a canvas edge differ
        # there)
        m0 = base_u8.shape[0] * _BASE
        canvas = cv2.resize(base_u8, (m0, m0), interpolation=cv2.INTER_LINEAR)
        o0 = e2 * _BASE
        if tissue:
            # level-0 masks: the lattice resized by 4 starts at level-0 px 4*i0
            l0 = cv2.resize(np.dstack([fields["T"], fields.get("U", fields["T"])]), (n * 4, n * 4),
                            interpolation=cv2.INTER_LINEAR)
            l0 = l0[y0 - 4 * j0:y0 - 4 * j0 + TILE, x0 - 4 * i0:x0 - 4 * i0 + TILE]
            t0 = l0[..., 0] > 0
            u0 = (l0[..., 1] > 0) & t0 if "U" in fields else np.zeros((TILE, TILE), bool)
            lat = np.dstack([fields["T"], fields.get("U", np.full_like(fields["T"], -1.0)), nz[..., 4]])
            self._draw_nuclei(canvas, x0 - o0, y0 - o0, lat, i0, j0)
        else:
            t0 = u0 = np.zeros((TILE, TILE), bool)
        img = canvas[o0:o0 + TILE, o0:o0 + TILE]
        # pixel noise: faint on glass, stronger (granular chromatin/eosin texture) in tissue; img + noise with
        # saturation = (img + positive part) - negative part, each saturating, as only one of them is non-zero
        pos, neg = (_wrap_slice(b, _NOISE_PERIOD, y0, x0, TILE) for b in self.pixel_noise["weak"])
        if t0.any():
            mask = t0.view(np.uint8)
            pos, neg = pos.copy(), neg.copy()
            s_pos, s_neg = (_wrap_slice(b, _NOISE_PERIOD, y0, x0, TILE) for b in self.pixel_noise["strong"])
            cv2.copyTo(s_pos, mask, pos)
            cv2.copyTo(s_neg, mask, neg)
        return cv2.subtract(cv2.add(img, pos), neg), t0, u0

    def row(self, ty: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """Tile row ``ty``: RGB (256, ntx*256, 3), tissue/tumour masks at downsample 16 (uint8 0/255) and the
        level-0 tissue and tumour pixel counts (inside the slide)."""
        self._forget_blocks(ty - 1)
        w, h = self.width, self.height
        rows = min(TILE, h - ty * TILE)
        out = np.empty((TILE, self.ntx * TILE, 3), np.uint8)
        c = TILE // MASK_DOWNSAMPLE
        tm = np.zeros((c, self.ntx * c), np.uint8)
        um = np.zeros_like(tm)
        t_px = u_px = 0
        for tx in range(self.ntx):
            img, t0, u0 = self.tile_at(tx * TILE, ty * TILE)
            out[:, tx * TILE:(tx + 1) * TILE] = img
            if t0.any():
                cols = min(TILE, w - tx * TILE)
                t0, u0 = t0.copy(), u0.copy()
                t0[rows:], t0[:, cols:], u0[rows:], u0[:, cols:] = False, False, False, False
                t_px += int(t0.sum())
                u_px += int(u0.sum())
                for dst, msk in ((tm, t0), (um, u0)):
                    frac = msk.reshape(c, MASK_DOWNSAMPLE, c, MASK_DOWNSAMPLE).sum(axis=(1, 3), dtype=np.int32)
                    dst[:, tx * c:(tx + 1) * c] = np.where(frac * 2 >= MASK_DOWNSAMPLE ** 2, 255, 0)
        return out, tm, um, t_px, u_px


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------
def _reduce4(a: np.ndarray) -> np.ndarray:
    """Area average over 4x4 blocks (cv2 INTER_AREA); a partial block at the right/bottom edge is padded
    by repeating the edge pixels, so the result is ceil(h/4) x ceil(w/4)."""
    h, w = a.shape[:2]
    ph, pw = (-h) % 4, (-w) % 4
    if ph or pw:
        a = cv2.copyMakeBorder(np.ascontiguousarray(a), 0, ph, 0, pw, cv2.BORDER_REPLICATE)
    return cv2.resize(a, ((w + pw) // 4, (h + ph) // 4), interpolation=cv2.INTER_AREA)


class _RawLevel:
    """A reduced level accumulated row strip by row strip in a raw temporary file (never all in memory)."""

    def __init__(self, path: Path, ds: int, width: int, height: int):
        self.path, self.ds = path, ds
        self.width, self.height = _ceil_div(width, ds), _ceil_div(height, ds)
        self.rows = 0
        self._fh = open(path, "wb")

    def append(self, strip: np.ndarray) -> None:
        assert strip.shape[1] == self.width
        self._fh.write(np.ascontiguousarray(strip).data)
        self.rows += strip.shape[0]

    def close(self) -> None:
        self._fh.close()
        if self.rows != self.height:
            raise RuntimeError(f"internal error: level {self.ds} got {self.rows} rows, expected {self.height}")

    def read(self, y0: int = 0, rows: int | None = None) -> np.ndarray:
        rows = self.height - y0 if rows is None else min(rows, self.height - y0)
        row_bytes = self.width * 3
        a = np.fromfile(self.path, np.uint8, count=rows * row_bytes, offset=y0 * row_bytes)
        return a.reshape(rows, self.width, 3)

    def tiles(self) -> Iterator[np.ndarray]:
        """Full 256 px tiles, row-major; beyond the level's edge, the edge pixels repeat (zero padding would
        bleed dark colour into the last row/column through JPEG's 2x2 chroma subsampling)."""
        for y0 in range(0, self.height, TILE):
            strip = self.read(y0, TILE)
            ph, pw = TILE - strip.shape[0], (-self.width) % TILE
            if ph or pw:
                strip = cv2.copyMakeBorder(strip, 0, ph, 0, pw, cv2.BORDER_REPLICATE)
            for x0 in range(0, self.width, TILE):
                yield strip[:, x0:x0 + TILE]


@dataclass
class _Stats:
    tissue_px: int = 0
    tumour_px: int = 0
    tissue_mask: np.ndarray | None = None
    tumour_mask: np.ndarray | None = None


def _level0_tiles(r: _Renderer, reduced: list[_RawLevel], keep: np.ndarray | None,
                  stats: _Stats) -> Iterator[np.ndarray]:
    """Level-0 tiles in row-major order; as a side effect, cascades each tile row into the reduced levels,
    fills the ground-truth masks and counts, and (small slides only) keeps level 0 in ``keep``."""
    w, h = r.width, r.height
    c = TILE // MASK_DOWNSAMPLE
    mw, mh = _ceil_div(w, MASK_DOWNSAMPLE), _ceil_div(h, MASK_DOWNSAMPLE)
    stats.tissue_mask = np.zeros((mh, mw), np.uint8)
    stats.tumour_mask = np.zeros((mh, mw), np.uint8)
    for ty in range(r.nty):
        row, tm, um, t_px, u_px = r.row(ty)
        n0 = min(TILE, h - ty * TILE)
        strip = row[:n0, :w]
        if keep is not None:
            keep[ty * TILE:ty * TILE + n0] = strip
        for lvl in reduced:
            strip = _reduce4(strip)
            lvl.append(strip)
        m0 = ty * c
        stats.tissue_mask[m0:m0 + c] = tm[:, :mw][: mh - m0]
        stats.tumour_mask[m0:m0 + c] = um[:, :mw][: mh - m0]
        stats.tissue_px += t_px
        stats.tumour_px += u_px
        for tx in range(r.ntx):
            yield row[:, tx * TILE:(tx + 1) * TILE]


def _write_tiff(path: Path, r: _Renderer, mpp: float, flavour: str, write_mpp: bool) -> tuple[list[int], _Stats]:
    import tifffile

    w, h = r.width, r.height
    dss = level_downsamples(w, h)
    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY},
                  metadata=None, software="pipeline.synthetic", maxworkers=2, buffersize=_ENCODE_BUFFER)
    tiled = dict(common, tile=(TILE, TILE), dtype=np.uint8)
    # the Aperio thumbnail: long side 768 px, area-averaged from the coarsest level that is still larger
    tscale = min(768.0 / max(w, h), 1.0)
    tsize = (max(1, round(w * tscale)), max(1, round(h * tscale)))
    keep = None
    if flavour == "svs" and (_ceil_div(w, 4) < tsize[0] or _ceil_div(h, 4) < tsize[1]):
        keep = np.empty((h, w, 3), np.uint8)  # only for slides under ~3072 px: <= 28 MB
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    stats = _Stats()
    bigtiff = w * h * 3 >= _BIGTIFF_RAW_BYTES
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as td:
        reduced = [_RawLevel(Path(td) / f"level_ds{ds}.raw", ds, w, h) for ds in (4, 16, 64)]
        try:
            with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
                tiles = _level0_tiles(r, reduced, keep, stats)
                if flavour == "tiff":
                    res = {}
                    if write_mpp:
                        ppcm = 10000.0 / mpp
                        res = dict(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
                    tw.write(tiles, shape=(h, w, 3), subfiletype=0, **tiled, **res)
                else:
                    head = f"{APERIO_HEADER} \n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q={JPEG_QUALITY}"
                    meta = "|AppMag = 20" + (f"|MPP = {mpp:g}" if write_mpp else "")
                    tw.write(tiles, shape=(h, w, 3), description=head + meta, **tiled)
                for lvl in reduced:
                    lvl.close()
                if flavour == "svs":
                    # page 1: stripped thumbnail (OpenSlide's aperio driver names directory 1 "thumbnail")
                    src = keep
                    for lvl in reversed(reduced):
                        if src is None and lvl.width >= tsize[0] and lvl.height >= tsize[1]:
                            src = lvl.read()
                    thumb = cv2.resize(src, tsize, interpolation=cv2.INTER_AREA)
                    del src, keep
                    tw.write(thumb, description=f"{APERIO_HEADER} \n{w}x{h} -> {tsize[0]}x{tsize[1]} - " + meta,
                             rowsperstrip=16, **common)
                for lvl in reduced:
                    if lvl.ds not in dss:
                        continue
                    shape = (lvl.height, lvl.width, 3)
                    if flavour == "tiff":
                        tw.write(lvl.tiles(), shape=shape, subfiletype=1, **tiled)
                    else:
                        tw.write(lvl.tiles(), shape=shape, description=f"{head} -> {lvl.width}x{lvl.height}" + meta,
                                 **tiled)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            for lvl in reduced:
                lvl._fh.close()
    os.replace(tmp, path)
    return dss, stats


def make_slide(path: str | os.PathLike, width: int = 4096, height: int = 3072, mpp: float = 0.5,
               seed: int = 0, positive: bool = False, flavour: str | None = None, write_mpp: bool = True,
               masks_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write one synthetic slide to ``path`` and return its metadata.

    ``flavour`` is ``'tiff'`` (generic tiled TIFF, mpp in the resolution tags) or ``'svs'`` (Aperio
    header with ``MPP``); ``None`` picks ``'svs'`` for a ``.svs`` path, else ``'tiff'``. With
    ``write_mpp=False`` no physical resolution is stored (readers report no mpp). With ``masks_dir``,
    writes ``{slide_id}_tissue.png``, ``{slide_id}_tumour.png`` (uint8 0/255, downsample 16) and
    ``{slide_id}.json`` there. Memory stays bounded whatever the size (one tile row at a time).
    """
    return _make(path, width, height, mpp, seed, positive, flavour, write_mpp, masks_dir, blank=False)


def make_blank_slide(path: str | os.PathLike, width: int = 1536, height: int = 1024, mpp: float = 0.5,
                     seed: int = 0, flavour: str | None = None, write_mpp: bool = True,
                     masks_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """A slide of glass only (no tissue), e.g. for the "no tissue -> empty bag" path."""
    return _make(path, width, height, mpp, seed, False, flavour, write_mpp, masks_dir, blank=True)


def _make(path: str | os.PathLike, width: int, height: int, mpp: float, seed: int, positive: bool,
          flavour: str | None, write_mpp: bool, masks_dir: str | os.PathLike | None,
          blank: bool) -> dict[str, Any]:
    path = Path(path)
    flavour = _infer_flavour(path, flavour)
    width, height = int(width), int(height)
    if width < 64 or height < 64:
        raise ValueError(f"slide too small: {width}x{height}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    renderer = _Renderer(int(seed), width, height, bool(positive), blank)
    dss, stats = _write_tiff(path, renderer, float(mpp), flavour, write_mpp)

    slide_id = path.name[: -len(path.suffix)] if path.suffix else path.name
    meta: dict[str, Any] = {
        "slide_id": slide_id,
        "path": str(path),
        "label": int(bool(positive)),
        "flavour": flavour,
        "width": width,
        "height": height,
        "mpp": float(mpp),
        "mpp_written": bool(write_mpp),
        "seed": int(seed),
        "level_downsamples": dss,
        "downsample": MASK_DOWNSAMPLE,
        "tissue_fraction": round(stats.tissue_px / float(width * height), 6),
        "tumour_fraction_of_tissue": round(stats.tumour_px / float(max(stats.tissue_px, 1)), 6),
    }
    if masks_dir is not None:
        md = Path(masks_dir)
        md.mkdir(parents=True, exist_ok=True)
        t_png, u_png = stats.tissue_mask, stats.tumour_mask
        assert t_png is not None and u_png is not None
        cv2.imwrite(str(md / f"{slide_id}_tissue.png"), t_png)
        cv2.imwrite(str(md / f"{slide_id}_tumour.png"), u_png)
        meta["tissue_mask"] = str(md / f"{slide_id}_tissue.png")
        meta["tumour_mask"] = str(md / f"{slide_id}_tumour.png")
        gt = {k: meta[k] for k in ("slide_id", "downsample", "width", "height", "mpp", "mpp_written", "label",
                                   "flavour", "tissue_fraction", "tumour_fraction_of_tissue")}
        gt["mask_shape"] = list(t_png.shape)
        (md / f"{slide_id}.json").write_text(json.dumps(gt, indent=2, sort_keys=True) + "\n")
    return meta


def cohort_plan(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Labels (balanced, seeded shuffle), patient ids (some patients own two slides of the same label),
    flavours (even index -> tiff, odd -> svs) and per-slide seeds for a cohort of ``n`` slides."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0407]))
    labels = np.zeros(n, dtype=int)
    labels[rng.permutation(n)[: n // 2]] = 1
    # pair up a quarter of the slides (same label) into two-slide patients
    owner = list(range(n))
    n_pairs = n // 4
    groups = [list(rng.permutation(np.flatnonzero(labels == lab))) for lab in (0, 1)]
    g = 0
    for _ in range(n_pairs):
        for _try in range(2):
            grp = groups[g % 2]
            g += 1
            if len(grp) >= 2:
                a, b = sorted((int(grp.pop()), int(grp.pop())))
                owner[b] = a
                break
    patient_of_first: dict[int, str] = {}
    plan = []
    for i in range(n):
        root = owner[i]
        if root not in patient_of_first:
            patient_of_first[root] = f"patient_{len(patient_of_first):03d}"
        flavour = "tiff" if i % 2 == 0 else "svs"
        plan.append({
            "slide_id": f"slide_{i:03d}",
            "label": int(labels[i]),
            "patient_id": patient_of_first[root],
            "flavour": flavour,
            "seed": int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0]),
        })
    return plan


def make_cohort(out_dir: str | os.PathLike, n: int = 8, width: int = 4096, height: int = 3072,
                mpp: float = 0.5, seed: int = 0) -> list[dict[str, Any]]:
    """Write ``n`` slides, ``labels.csv`` and ``masks/`` into ``out_dir``; return per-slide metadata."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    masks = out / "masks"
    metas = []
    for p in cohort_plan(int(n), seed):
        path = out / f"{p['slide_id']}{FLAVOUR_EXT[p['flavour']]}"
        meta = make_slide(path, width=width, height=height, mpp=mpp, seed=p["seed"],
                          positive=bool(p["label"]), flavour=p["flavour"], masks_dir=masks)
        meta["patient_id"] = p["patient_id"]
        metas.append(meta)
    with open(out / "labels.csv", "w", newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(["slide_id", "label", "patient_id"])
        for m in metas:
            wr.writerow([m["slide_id"], m["label"], m["patient_id"]])
    return metas


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=8, help="number of slides (default 8)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--height", type=int, default=3072)
    ap.add_argument("--mpp", type=float, default=0.5, help="level-0 micrometres per pixel (default 0.5)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    t0 = time.perf_counter()
    metas = make_cohort(args.out_dir, n=args.n, width=args.width, height=args.height, mpp=args.mpp,
                        seed=args.seed)
    for m in metas:
        print(f"{Path(m['path']).name}\tlabel={m['label']}\t{m['patient_id']}\t"
              f"tissue={m['tissue_fraction']:.2f}\ttumour/tissue={m['tumour_fraction_of_tissue']:.2f}")
    print(f"wrote {len(metas)} slides + labels.csv + masks/ to {args.out_dir} "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
