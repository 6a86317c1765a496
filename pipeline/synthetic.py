"""Synthetic H&E-like whole-slide images for the demo and the test suite.

Each slide is a real pyramidal, tiled (256x256) JPEG TIFF written with tifffile, in one of two flavours:

``tiff``  (``.tif``) a generic tiled TIFF: level 0, then reduced pages (NewSubfileType=1) at downsample
          4, 16 (and 64 while that level is still >= 256 px on its short side). The resolution is stored
          in XResolution/YResolution with ResolutionUnit=CENTIMETER (10000/mpp px per cm); OpenSlide
          (vendor ``generic-tiff``) and tiffslide both report it as mpp.
``svs``   (``.svs``) Aperio layout: page 0 = level 0 whose ImageDescription starts with an Aperio header
          carrying ``AppMag`` and ``MPP``; page 1 = a stripped thumbnail; pages 2.. = the tiled reduced
          levels. OpenSlide reports vendor ``aperio``; tiffslide reads the same header.

Content: 1-3 irregular tissue sections on near-white glass, with eosin-pink fibrous stroma and scattered
hematoxylin nuclei (spindle fibroblasts and round lymphocytes). Positive slides (label 1) contain a few
"tumour" patches (about 10-30% of the tissue): purple-blue cytoplasm crowded with large, dark,
pleomorphic nuclei. Ground truth (tissue and tumour masks at downsample 16, plus a JSON) goes to
``masks_dir``. Output is deterministic for a given seed (byte-identical files).

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
import time
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

_GRID = 4  # geometry (tissue/tumour/hole fields) is computed on a grid at this downsample
_BASE = 2  # stroma/cytoplasm colour texture is computed at this downsample, then upsampled


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


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, unit-std float32 noise of ``shape`` (h, w) with features about ``cell`` px across."""
    h, w = shape
    gh, gw = max(2, int(math.ceil(h / cell)) + 2), max(2, int(math.ceil(w / cell)) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    # smooth at a small intermediate scale (cheap), then interpolate up to the full size
    mid = cv2.resize(coarse, (gw * 4, gh * 4), interpolation=cv2.INTER_CUBIC)
    mid = cv2.GaussianBlur(mid, (0, 0), 1.5, borderType=cv2.BORDER_REFLECT)
    big = cv2.resize(mid, (int(round(gw * cell)), int(round(gh * cell))), interpolation=cv2.INTER_LINEAR)
    big = np.ascontiguousarray(big[:h, :w])
    big -= big.mean()
    sd = float(big.std())
    return big / sd if sd > 0 else big


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


def _sample_where(rng: np.random.Generator, mask: np.ndarray, n: int) -> np.ndarray:
    """``n`` random (row, col) indices where ``mask`` is true (empty array if none)."""
    idx = np.flatnonzero(mask)
    if idx.size == 0 or n <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    pick = idx[rng.integers(0, idx.size, size=n)]
    return np.stack(np.unravel_index(pick, mask.shape), axis=1)


# ----------------------------------------------------------------------------------------------------
# geometry: tissue, holes, tumour (float fields on the _GRID grid; > 0 means inside)
# ----------------------------------------------------------------------------------------------------
def _tissue_field(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    gw, gh = _ceil_div(width, _GRID), _ceil_div(height, _GRID)
    xx = ((np.arange(gw, dtype=np.float32) + 0.5) * _GRID)[None, :]
    yy = ((np.arange(gh, dtype=np.float32) + 0.5) * _GRID)[:, None]
    margin = 0.05 * min(width, height)
    n_blobs = int(rng.integers(1, 4))
    # one cell per blob along the long side, so sections do not overlap and keep a margin
    horizontal = width >= height
    long_side = width if horizontal else height
    cuts = np.sort(rng.uniform(0.35, 0.65, size=n_blobs - 1)) if n_blobs > 1 else np.array([])
    if n_blobs == 3:
        cuts = np.array([rng.uniform(0.28, 0.38), rng.uniform(0.62, 0.72)])
    edges = np.concatenate([[0.0], cuts, [1.0]]) * long_side
    blobs = []
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
        cx, cy = (c_l, c_s) if horizontal else (c_s, c_l)
        a, b = (half_l * fill_l, half_s * fill_s) if horizontal else (half_s * fill_s, half_l * fill_l)
        rot = float(rng.uniform(-0.25, 0.25))
        blobs.append((cx, cy, a, b, rot, _radial_profile(rng, 0.13)))
    noise = _smooth_noise(rng, (gh, gw), cell=max(8.0, 220.0 / _GRID))
    fine = _smooth_noise(rng, (gh, gw), cell=max(3.0, 60.0 / _GRID))
    field = np.full((gh, gw), -1.0, np.float32)
    for cx, cy, a, b, rot, harm in blobs:
        field = np.maximum(field, _blob_field(xx, yy, cx, cy, a, b, rot, harm))
    field += 0.10 * noise + 0.025 * fine
    # keep a strip of glass along every border
    bx = np.minimum(xx, width - xx) - margin * 0.6
    by = np.minimum(yy, height - yy) - margin * 0.6
    field = np.minimum(field, np.minimum(bx, by) / (0.5 * margin))
    return field


def _add_holes(rng: np.random.Generator, field: np.ndarray, width: int, height: int) -> np.ndarray:
    """Occasional small holes and thin tears inside the tissue."""
    if rng.random() < 0.3:
        return field
    gh, gw = field.shape
    xx = ((np.arange(gw, dtype=np.float32) + 0.5) * _GRID)[None, :]
    yy = ((np.arange(gh, dtype=np.float32) + 0.5) * _GRID)[:, None]
    n = int(rng.integers(1, 5))
    centres = _sample_where(rng, field > 0.3, n)
    scale = min(width, height) / 3072.0
    for r, c in centres:
        cy, cx = (r + 0.5) * _GRID, (c + 0.5) * _GRID
        if rng.random() < 0.6:  # round-ish hole (vessel lumen, fat, lost tissue)
            a = rng.uniform(40, 140) * max(scale, 0.5)
            b = a * rng.uniform(0.5, 1.0)
        else:  # thin tear
            a = rng.uniform(180, 520) * max(scale, 0.4)
            b = rng.uniform(10, 22)
        # only a window around the hole is evaluated
        rad = int(a * 1.5 / _GRID) + 2
        r0, r1 = max(0, r - rad), min(gh, r + rad + 1)
        c0, c1 = max(0, c - rad), min(gw, c + rad + 1)
        hf = -_blob_field(xx[:, c0:c1], yy[r0:r1], cx, cy, a, b, float(rng.uniform(0, np.pi)),
                          _radial_profile(rng, 0.2))
        field[r0:r1, c0:c1] = np.minimum(field[r0:r1, c0:c1], hf)
    return field


def _tumour_field(rng: np.random.Generator, tissue_field: np.ndarray) -> np.ndarray:
    """Tumour patches covering ~10-30% of the tissue (positive slides only)."""
    gh, gw = tissue_field.shape
    tissue = tissue_field > 0
    tissue_px = int(tissue.sum())
    xx = ((np.arange(gw, dtype=np.float32) + 0.5) * _GRID)[None, :]
    yy = ((np.arange(gh, dtype=np.float32) + 0.5) * _GRID)[:, None]
    n = int(rng.integers(2, 5))
    inner = tissue_field > 0.25
    centres = _sample_where(rng, inner if inner.any() else tissue, n)
    target = float(rng.uniform(0.14, 0.24))
    weights = rng.dirichlet(np.full(n, 2.0))
    shapes = [(float(rng.uniform(0.6, 1.0)), float(rng.uniform(0, np.pi)), _radial_profile(rng, 0.22))
              for _ in range(n)]
    noise = _smooth_noise(rng, (gh, gw), cell=max(3.0, 90.0 / _GRID))
    area_px = tissue_px * _GRID * _GRID
    scale = 1.0
    field = np.full((gh, gw), -1.0, np.float32)
    for _ in range(8):
        field[:] = -1.0
        for (r, c), w, (asp, rot, harm) in zip(centres, weights, shapes):
            a = math.sqrt(max(w * target * area_px, 1.0) / (math.pi * asp)) * scale
            field = np.maximum(field, _blob_field(xx, yy, (c + 0.5) * _GRID, (r + 0.5) * _GRID,
                                                  a, a * asp, rot, harm))
        field += 0.12 * noise
        frac = float(((field > 0) & tissue).sum()) / max(tissue_px, 1)
        if 0.10 <= frac <= 0.30 and abs(frac - target) < 0.05:
            break
        scale *= math.sqrt(target / max(frac, 1e-3))
    return np.minimum(field, tissue_field * 4.0)


# ----------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------
def _upsample(field: np.ndarray, factor: int, width: int, height: int) -> np.ndarray:
    gh, gw = field.shape
    big = cv2.resize(field, (gw * factor, gh * factor), interpolation=cv2.INTER_LINEAR)
    return big[:height, :width]


def _line_kernel(length: int, angle: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2.0
    dx, dy = math.cos(angle) * c, math.sin(angle) * c
    cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1,
             cv2.LINE_AA)
    return k / k.sum()


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Glass colour (per-slide tint) and a low-frequency illumination field, at base resolution."""
    glass = np.array([rng.uniform(236, 243), rng.uniform(235, 242), rng.uniform(238, 245)], np.float32)
    illum = _smooth_noise(rng, (h, w), cell=max(16.0, 600.0 / _BASE)) * 1.5
    return glass, illum


def _render(rng: np.random.Generator, width: int, height: int, tissue_field: np.ndarray | None,
            tumour_field: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level-0 RGB image and full-resolution boolean tissue / tumour masks."""
    bh, bw = _ceil_div(height, _BASE), _ceil_div(width, _BASE)
    glass, illum = _background(rng, bh, bw)
    base = np.empty((bh, bw, 3), np.float32)
    for ch in range(3):
        base[..., ch] = glass[ch] + illum

    if tissue_field is None:
        tissue_full = np.zeros((height, width), bool)
        tumour_full = np.zeros((height, width), bool)
    else:
        f = _GRID // _BASE
        tissue_b = _upsample(tissue_field, f, bw, bh)
        tissue_alpha = cv2.GaussianBlur((tissue_b > 0).astype(np.float32), (0, 0), 1.2)
        # eosin stroma: low-frequency stain variation + fibres running along a wavy direction
        stain = np.array([rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)], np.float32)
        lf = _smooth_noise(rng, (bh, bw), cell=max(8.0, 260.0 / _BASE))
        white = cv2.GaussianBlur(rng.standard_normal((bh, bw)).astype(np.float32), (0, 0), 0.8)
        ang = float(rng.uniform(0, np.pi))
        fib1 = cv2.filter2D(white, -1, _line_kernel(19, ang), borderType=cv2.BORDER_REFLECT)
        fib2 = cv2.filter2D(white, -1, _line_kernel(19, ang + 1.1), borderType=cv2.BORDER_REFLECT)
        mix = np.clip(0.5 + 0.5 * _smooth_noise(rng, (bh, bw), cell=max(8.0, 300.0 / _BASE)), 0, 1)
        fib = fib1 * mix + fib2 * (1 - mix)
        fib /= max(float(fib.std()), 1e-6)
        loose = np.clip(_smooth_noise(rng, (bh, bw), cell=max(6.0, 140.0 / _BASE)) - 1.2, 0, None)
        e = np.clip(0.55 + 0.15 * lf + 0.15 * fib - 0.35 * loose, 0.02, 1.0) * stain[0]
        light = np.array([246, 205, 228], np.float32)
        dark = np.array([214, 104, 168], np.float32)
        stroma = light[None, None, :] + (dark - light)[None, None, :] * np.clip(e, 0, 1.2)[..., None]
        if tumour_field is not None:
            tumour_b = _upsample(tumour_field, f, bw, bh)
            tumour_alpha = cv2.GaussianBlur((tumour_b > 0).astype(np.float32), (0, 0), 2.0)
            t_e = np.clip(0.6 + 0.15 * lf + 0.12 * rng.standard_normal((bh, bw)).astype(np.float32), 0, 1) * stain[1]
            t_light = np.array([222, 172, 218], np.float32)
            t_dark = np.array([170, 104, 178], np.float32)
            tum = t_light[None, None, :] + (t_dark - t_light)[None, None, :] * t_e[..., None]
            stroma += (tum - stroma) * tumour_alpha[..., None]
        base += (stroma - base) * tissue_alpha[..., None]
        tissue_full = _upsample(tissue_field, _GRID, width, height) > 0
        tumour_full = ((_upsample(tumour_field, _GRID, width, height) > 0) & tissue_full
                       if tumour_field is not None else np.zeros((height, width), bool))

    base_u8 = np.clip(base + 0.5, 0, 255).astype(np.uint8)
    img = cv2.resize(base_u8, (bw * _BASE, bh * _BASE), interpolation=cv2.INTER_LINEAR)[:height, :width]
    img = np.ascontiguousarray(img)

    if tissue_field is not None:
        _draw_nuclei(rng, img, tissue_full, tumour_full, ang)

    # pixel noise: faint on glass, stronger (granular chromatin/eosin texture) in tissue
    _add_pixel_noise(rng, img, tissue_full)
    return img, tissue_full, tumour_full


def _points_in(rng: np.random.Generator, mask: np.ndarray, n: int, cell: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """About ``n`` uniformly spread random (y, x) pixels inside the boolean ``mask``."""
    h, w = mask.shape
    mh, mw = _ceil_div(h, cell), _ceil_div(w, cell)
    pad = np.zeros((mh * cell, mw * cell), bool)
    pad[:h, :w] = mask
    coarse = pad.reshape(mh, cell, mw, cell).any(axis=(1, 3))
    cells = _sample_where(rng, coarse, int(n * 1.6) + 1)
    ys = np.minimum(cells[:, 0] * cell + rng.integers(0, cell, len(cells)), h - 1)
    xs = np.minimum(cells[:, 1] * cell + rng.integers(0, cell, len(cells)), w - 1)
    keep = mask[ys, xs]
    return ys[keep][:n], xs[keep][:n]


def _draw_nuclei(rng: np.random.Generator, img: np.ndarray, tissue: np.ndarray, tumour: np.ndarray,
                 fibre_angle: float) -> None:
    h, w = tissue.shape
    SH = 4  # fixed-point bits for sub-pixel drawing
    one = 1 << SH
    aa = cv2.LINE_AA

    # --- stroma nuclei: spindle fibroblasts + round lymphocytes, density varies (inflamed areas) ------
    stroma = tissue & ~tumour
    n_cand = int(stroma.sum() / 700)
    if n_cand:
        ys, xs = _points_in(rng, stroma, n_cand)
        dens = _smooth_noise(rng, (max(2, h // 64), max(2, w // 64)), cell=6.0)
        d = dens[np.minimum(ys // 64, dens.shape[0] - 1), np.minimum(xs // 64, dens.shape[1] - 1)]
        keep = rng.random(ys.size) < np.clip(0.5 + 0.4 * d, 0.05, 1.0)
        ys, xs = ys[keep], xs[keep]
        m = ys.size
        lymph = rng.random(m) < np.clip(0.3 + 0.25 * d[keep], 0.05, 0.9)
        ax_a = np.where(lymph, rng.uniform(4.5, 6.5, m), rng.uniform(8.0, 14.0, m))
        ax_b = np.where(lymph, ax_a * rng.uniform(0.85, 1.0, m), rng.uniform(2.4, 4.0, m))
        angle = np.degrees(fibre_angle + rng.normal(0, 0.35, m))
        shade = rng.uniform(-1, 1, m)
        col = np.stack([np.where(lymph, 58, 92) + 14 * shade,
                        np.where(lymph, 36, 56) + 10 * shade,
                        np.where(lymph, 112, 140) + 14 * shade], axis=1)
        cx = ((xs + rng.random(m)) * one).astype(np.int64)
        cy = ((ys + rng.random(m)) * one).astype(np.int64)
        A = (ax_a * one).astype(np.int64)
        B = (ax_b * one).astype(np.int64)
        for i in range(m):
            cv2.ellipse(img, (int(cx[i]), int(cy[i])), (int(A[i]), int(B[i])), float(angle[i]), 0, 360,
                        tuple(float(v) for v in col[i]), -1, aa, SH)

    # --- tumour nuclei: crowded, large, pleomorphic, hyperchromatic, bluer; some with nucleoli ------
    n_t = int(tumour.sum() / 420)
    if n_t:
        ys, xs = _points_in(rng, tumour, n_t)
        m = ys.size
        K = 14
        r = np.exp(rng.normal(math.log(10.5), 0.25, m))
        asp = rng.uniform(0.6, 1.0, m)
        rot = rng.uniform(0, 2 * np.pi, m)
        th = np.linspace(0, 2 * np.pi, K, endpoint=False)[None, :]
        jitter = 1.0 + rng.uniform(-0.18, 0.18, (m, K))
        jitter = (jitter + np.roll(jitter, 1, axis=1) + np.roll(jitter, -1, axis=1)) / 3.0
        px = r[:, None] * jitter * np.cos(th)
        py = r[:, None] * asp[:, None] * jitter * np.sin(th)
        c, s = np.cos(rot)[:, None], np.sin(rot)[:, None]
        ox, oy = xs + rng.random(m), ys + rng.random(m)
        fx = ox[:, None] + px * c - py * s
        fy = oy[:, None] + px * s + py * c
        pts = (np.stack([fx, fy], axis=2) * one).astype(np.int32)
        shade = rng.uniform(-1, 1, m)
        col = np.stack([66 + 18 * shade, 40 + 14 * shade, 132 + 16 * shade], axis=1)
        has_nucleolus = rng.random(m) < 0.35
        nuc = ((np.stack([ox, oy], axis=1) + rng.uniform(-0.3, 0.3, (m, 2)) * r[:, None]) * one).astype(np.int64)
        rad_n = (rng.uniform(1.4, 2.4, m) * one).astype(np.int64)
        for i in range(m):
            cv2.fillPoly(img, [pts[i]], tuple(float(v) for v in col[i]), aa, SH)
            if has_nucleolus[i]:
                cv2.circle(img, (int(nuc[i, 0]), int(nuc[i, 1])), int(rad_n[i]), (34.0, 16.0, 78.0), -1, aa, SH)


def _add_pixel_noise(rng: np.random.Generator, img: np.ndarray, tissue: np.ndarray) -> None:
    h, w = tissue.shape
    T = 512
    weak = np.clip(rng.normal(0, 1.6, (T, T, 3)), -6, 6).astype(np.int16)
    lum = rng.normal(0, 5.0, (T, T, 1))
    strong = np.clip(lum + rng.normal(0, 2.5, (T, T, 3)), -20, 20).astype(np.int16)
    # process in horizontal stripes to bound memory
    for y0 in range(0, h, T):
        y1 = min(h, y0 + T)
        stripe = img[y0:y1].astype(np.int16)
        tm = tissue[y0:y1]
        reps = _ceil_div(w, T)
        wk = np.tile(weak[: y1 - y0], (1, reps, 1))[:, :w]
        st = np.tile(strong[: y1 - y0], (1, reps, 1))[:, :w]
        stripe += np.where(tm[..., None], st, wk)
        np.clip(stripe, 0, 255, out=stripe)
        img[y0:y1] = stripe.astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------
def _pyramid(img: np.ndarray, downsamples: list[int]) -> list[np.ndarray]:
    h, w = img.shape[:2]
    out = [img]
    prev = img
    for ds in downsamples[1:]:
        size = (max(1, _ceil_div(w, ds)), max(1, _ceil_div(h, ds)))
        prev = cv2.resize(prev, size, interpolation=cv2.INTER_AREA)
        out.append(prev)
    return out


def _write_tiff(path: Path, img: np.ndarray, mpp: float, flavour: str, write_mpp: bool) -> list[int]:
    import tifffile

    h, w = img.shape[:2]
    dss = level_downsamples(w, h)
    levels = _pyramid(img, dss)
    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY},
                  metadata=None, software="pipeline.synthetic", maxworkers=2)
    tiled = dict(common, tile=(TILE, TILE))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        if flavour == "tiff":
            res = {}
            if write_mpp:
                ppcm = 10000.0 / mpp
                res = dict(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            tw.write(levels[0], subfiletype=0, **tiled, **res)
            for lvl in levels[1:]:
                tw.write(lvl, subfiletype=1, **tiled)
        else:
            head = f"{APERIO_HEADER} \n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q={JPEG_QUALITY}"
            meta = "|AppMag = 20" + (f"|MPP = {mpp:g}" if write_mpp else "")
            tw.write(levels[0], description=head + meta, **tiled)
            # page 1: stripped thumbnail (OpenSlide's aperio driver names directory 1 "thumbnail")
            tscale = 768.0 / max(w, h)
            tsize = (max(1, round(w * min(tscale, 1.0))), max(1, round(h * min(tscale, 1.0))))
            thumb = cv2.resize(img, tsize, interpolation=cv2.INTER_AREA)
            tw.write(thumb, description=f"{APERIO_HEADER} \n{w}x{h} -> {tsize[0]}x{tsize[1]} - " + meta,
                     rowsperstrip=16, **common)
            for lvl in levels[1:]:
                lh, lw = lvl.shape[:2]
                tw.write(lvl, description=f"{head} -> {lw}x{lh}" + meta, **tiled)
    os.replace(tmp, path)
    return dss


def _mask_png(mask_full: np.ndarray, ds: int) -> np.ndarray:
    """Boolean full-resolution mask -> uint8 0/255 at downsample ``ds`` (majority of each ds x ds cell)."""
    h, w = mask_full.shape
    mh, mw = _ceil_div(h, ds), _ceil_div(w, ds)
    pad = np.zeros((mh * ds, mw * ds), np.uint8)
    pad[:h, :w] = mask_full
    frac = pad.reshape(mh, ds, mw, ds).sum(axis=(1, 3), dtype=np.int32)
    return np.where(frac * 2 >= ds * ds, 255, 0).astype(np.uint8)


def make_slide(path: str | os.PathLike, width: int = 4096, height: int = 3072, mpp: float = 0.5,
               seed: int = 0, positive: bool = False, flavour: str | None = None, write_mpp: bool = True,
               masks_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write one synthetic slide to ``path`` and return its metadata.

    ``flavour`` is ``'tiff'`` (generic tiled TIFF, mpp in the resolution tags) or ``'svs'`` (Aperio
    header with ``MPP``); ``None`` picks ``'svs'`` for a ``.svs`` path, else ``'tiff'``. With
    ``write_mpp=False`` no physical resolution is stored (readers report no mpp). With ``masks_dir``,
    writes ``{slide_id}_tissue.png``, ``{slide_id}_tumour.png`` (uint8 0/255, downsample 16) and
    ``{slide_id}.json`` there.
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
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    if blank:
        tissue_field = tumour_field = None
    else:
        tissue_field = _add_holes(rng, _tissue_field(rng, width, height), width, height)
        tumour_field = _tumour_field(rng, tissue_field) if positive else None
    img, tissue, tumour = _render(rng, width, height, tissue_field, tumour_field)
    dss = _write_tiff(path, img, float(mpp), flavour, write_mpp)

    slide_id = path.name[: -len(path.suffix)] if path.suffix else path.name
    tissue_px = int(tissue.sum())
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
        "tissue_fraction": round(tissue_px / float(width * height), 6),
        "tumour_fraction_of_tissue": round(int(tumour.sum()) / float(max(tissue_px, 1)), 6),
    }
    if masks_dir is not None:
        md = Path(masks_dir)
        md.mkdir(parents=True, exist_ok=True)
        t_png, u_png = _mask_png(tissue, MASK_DOWNSAMPLE), _mask_png(tumour, MASK_DOWNSAMPLE)
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
