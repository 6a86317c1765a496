"""Patch grid at a fixed physical resolution.

A patch is ``patch_size`` pixels at ``target_mpp`` µm/px, i.e. ``patch_size * target_mpp`` µm wide. Its
size in level-0 pixels is computed from the slide's own level-0 µm/px, never binned to a nominal
magnification: a 0.25 and a 0.26 µm/px scan give different level-0 patch sizes (896 vs 862 px for
224 px at 1.0 µm/px) and so cover the same tissue area. Patches are read from the coarsest pyramid level
that is still at least as fine as the target and resized to ``patch_size`` (the read plan).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import resolve
from .files import write_json_atomic
from .provenance import provenance
from .slide import Slide, SlideError

def resolve_settings(params: dict[str, Any] | None) -> dict[str, Any]:
    """The stage's settings (``grid`` section, defaults from :mod:`pipeline.config`); ``stride`` None
    becomes ``patch_size``. Unknown keys or invalid values raise ValueError naming the key."""
    return resolve("grid", params)


def read_plan(slide: Slide, patch_size: int, target_mpp: float, max_upsample: float = 1.1) -> dict[str, Any]:
    """How to read one patch: which level, how many pixels there, and the effective µm/px."""
    scale = target_mpp / slide.mpp  # level-0 pixels per output pixel
    if scale < 1.0 / max_upsample:
        raise SlideError(slide.path, f"target {target_mpp} µm/px is finer than the scan's {slide.mpp:.4g} µm/px "
                                     f"(upsampling x{1 / scale:.2f} > max_upsample {max_upsample})")
    size0 = level0_patch_size(patch_size, target_mpp, slide.mpp)
    level = slide.best_level_for_downsample(scale)
    ds = slide.level_downsamples[level]
    read_px = max(1, round(size0 / ds))
    return {
        "requested_mpp": float(target_mpp),
        "effective_mpp": size0 * slide.mpp / patch_size,
        "level0_mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "patch_size_px": int(patch_size),
        "patch_size_level0_px": int(size0),
        "level": int(level),
        "level_downsample": float(ds),
        "level_mpp": slide.mpp * ds,
        "read_size_px": int(read_px),
        "resize": read_px != patch_size,
    }


def tissue_fractions(mask: np.ndarray, mask_downsample: float, xs: np.ndarray, ys: np.ndarray,
                     size0: int) -> np.ndarray:
    """Fraction of tissue pixels of ``mask`` under each level-0 square (x, y, size0), vectorised with an
    integral image. Mask pixels are weighted by area overlap at the mask's resolution (rounded edges)."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), axis=0), axis=1)
    x0 = np.clip(np.round(xs / mask_downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.round(ys / mask_downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.round((xs + size0) / mask_downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.round((ys + size0) / mask_downsample).astype(np.int64), 0, h)
    area = (x1 - x0) * (y1 - y0)
    s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(area > 0, s / np.maximum(area, 1), 0.0)
    return frac


def make_grid(slide: Slide, mask: np.ndarray, mask_downsample: float, params: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Compute the patch grid of one slide. Returns a JSON-able dict (see :func:`run_grid`)."""
    p = resolve_settings(params)
    plan = read_plan(slide, int(p["patch_size"]), float(p["target_mpp"]), float(p["max_upsample"]))
    size0 = plan["patch_size_level0_px"]
    stride0 = max(1, round(int(p["stride"]) * float(p["target_mpp"]) / slide.mpp))
    W, H = slide.dimensions
    xs = np.arange(0, W - size0 + 1, stride0, dtype=np.int64)
    ys = np.arange(0, H - size0 + 1, stride0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    gx, gy = gx.ravel(), gy.ravel()
    frac = tissue_fractions(mask, mask_downsample, gx, gy, size0) if gx.size else np.zeros(0)
    keep = frac >= float(p["min_tissue_fraction"]) - 1e-9
    if float(p["min_tissue_fraction"]) > 0:
        keep &= frac > 0
    coords = np.stack([gx[keep], gy[keep]], axis=1).astype(np.int64)
    plan["stride_level0_px"] = int(stride0)
    return {
        "slide_id": slide.slide_id,
        "params": p,
        "read_plan": plan,
        "n_candidates": int(gx.size),
        "n_patches": int(coords.shape[0]),
        "coords": coords.tolist(),
        "tissue_fraction": [round(float(f), 4) for f in frac[keep]],
    }


def run_grid(slide: Slide, tissue_dir: str | os.PathLike, out_path: str | os.PathLike,
             params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Grid stage: read the tissue mask, compute the grid, write ``out_path`` (JSON) atomically."""
    from .tissue import load_mask

    mask, ds = load_mask(tissue_dir)
    grid = make_grid(slide, mask, ds, params)
    grid["slide"] = slide.info()
    grid["provenance"] = provenance("grid", grid["params"], tissue_dir=str(tissue_dir))
    write_json_atomic(out_path, grid)
    return grid


def write_failed(out_path: str | os.PathLike, slide_id: str, reason: str, params: dict[str, Any] | None,
                 stage: str = "grid") -> None:
    """Explicit failed grid (``on_slide_error: skip``): no patches, ``status: failed``, the failed stage
    (this one or an upstream one) and the reason."""
    write_json_atomic(out_path, {"slide_id": slide_id, "status": "failed", "stage": stage, "error": reason,
                                 "n_patches": 0, "coords": [], "tissue_fraction": [], "read_plan": None,
                                 "provenance": provenance("grid", params)})


def load_grid(path: str | os.PathLike) -> dict[str, Any]:
    import json

    path = Path(path)
    try:
        g = json.loads(path.read_text())
        g["coords"] = np.asarray(g["coords"], dtype=np.int64).reshape(-1, 2)
        g["read_plan"]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError) as exc:
        raise SlideError(path, f"not a readable grid file ({exc})") from exc
    return g


def level0_patch_size(patch_size: int, target_mpp: float, level0_mpp: float) -> int:
    """Level-0 side length in pixels of a ``patch_size`` px patch at ``target_mpp`` (exact in µm)."""
    return max(1, round(patch_size * target_mpp / level0_mpp))


__all__ = ["make_grid", "run_grid", "load_grid", "read_plan", "tissue_fractions", "level0_patch_size",
           "resolve_settings", "write_failed"]
