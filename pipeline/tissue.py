"""Classical, resolution-aware tissue segmentation.

The whole slide is read at about ``seg_mpp`` µm/px (8 µm/px by default: a 20x40 mm section is a few
thousand pixels), converted to HSV, and a pixel is tissue when its (median-blurred) saturation is at
least ``max(Otsu threshold, min_saturation)`` and its value is at least ``min_value`` (black pen,
scanner borders and folds of dense ink are excluded). The binary mask is then closed, small holes are
filled and small components dropped.

Every size parameter is physical (µm or µm²) and converted to pixels with the actual resolution of the
segmentation image, so a 0.25 µm/px and a 0.5 µm/px scan of the same tissue give the same mask area.

Outputs of :func:`run_tissue` (all written atomically, ``tissue.json`` last so that its presence means
the stage finished):

``mask.png``       uint8 0/255, one pixel per ``mask_downsample`` level-0 pixels
``thumbnail.png``  RGB thumbnail with the tissue contours drawn in green
``tissue.geojson`` FeatureCollection of Polygon features (level-0 pixel coordinates, QuPath-importable)
``tissue.json``    slide info, mask downsample, merged params, stats and provenance
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .config import resolve
from .files import feature_collection, polygon_feature, write_json_atomic, write_png
from .layout import TISSUE_FILES
from .provenance import provenance

_CONTOUR_COLOUR = (0, 200, 0)  # RGB


@dataclass
class TissueResult:
    """Result of :func:`segment_tissue`."""

    mask: np.ndarray                  # bool (h, w), one pixel = mask_downsample level-0 pixels
    mask_downsample: float            # level-0 pixels per mask pixel (along x)
    thumbnail: np.ndarray             # RGB uint8 with tissue contours drawn
    polygons: list[list[list[list[float]]]]  # [polygon][ring][point] = [x, y] level-0; ring 0 exterior
    stats: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def resolve_settings(params: dict[str, Any] | None) -> dict[str, Any]:
    """The stage's settings (``tissue`` section): defaults from :mod:`pipeline.config` overlaid with
    ``params``; unknown keys or invalid values raise ValueError naming the key."""
    return resolve("tissue", params)


# -- pixel-level segmentation -----------------------------------------------------------------------
def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of uint8 values (the first value of the upper class); 0 for empty/constant input."""
    if values.size == 0:
        return 0.0
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)                    # weight of class {<= t}
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mt = m0[-1]
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return float(values.ravel()[0])
    between = np.zeros(256)
    between[valid] = (mt * w0[valid] / total - m0[valid]) ** 2 / (w0[valid] * w1[valid])
    t = int(np.argmax(between))             # class 0 = {<= t}
    return float(t + 1)


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 == 1 else k + 1


def fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Fill background regions enclosed by tissue whose area (px) is below ``max_hole_px``."""
    if max_hole_px <= 0 or not mask.any():
        return mask
    bg = (~mask).astype(np.uint8)
    # 4-connected background is the dual of 8-connected foreground.
    n, labels, stats, _ = cv2.connectedComponentsWithStats(bg, connectivity=4)
    if n <= 1:
        return mask
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    touches_border = (x == 0) | (y == 0) | (x + bw >= w) | (y + bh >= h)
    fill = (area < max_hole_px) & ~touches_border
    fill[0] = False  # label 0 = the tissue itself
    if not fill.any():
        return mask
    return mask | fill[labels]


def remove_small_components(mask: np.ndarray, min_area_px: float) -> tuple[np.ndarray, int]:
    """Drop 8-connected components smaller than ``min_area_px``; returns (mask, number kept)."""
    if not mask.any():
        return mask, 0
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False
    return keep[labels], int(keep.sum())


def mask_from_rgb(rgb: np.ndarray, pixel_um: float, params: dict[str, Any] | None = None
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """Tissue mask (bool, same height/width as ``rgb``) of an RGB uint8 image at ``pixel_um`` µm/px.

    Returns (mask, info) where info holds the thresholds and the pixel sizes actually used.
    """
    p = resolve_settings(params)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got shape {rgb.shape} dtype {rgb.dtype}")
    if not (pixel_um > 0 and math.isfinite(pixel_um)):
        raise ValueError(f"pixel_um must be a positive number, not {pixel_um!r}")
    rgb = np.ascontiguousarray(rgb[..., :3])
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat, val = hsv[..., 1], hsv[..., 2]

    blur_px = _odd(p["blur_um"] / pixel_um)  # medianBlur needs an odd window; borders are replicated
    if blur_px > 1:
        sat = cv2.medianBlur(np.ascontiguousarray(sat), blur_px)
        val = cv2.medianBlur(np.ascontiguousarray(val), blur_px)

    not_dark = val >= p["min_value"]
    otsu = _otsu(sat[not_dark])
    threshold = max(otsu, float(p["min_saturation"]))
    mask = (sat >= threshold) & not_dark

    close_r = int(round(p["close_um"] / pixel_um))
    if close_r >= 1 and mask.any():
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * close_r + 1, 2 * close_r + 1))
        # Pad so that closing does not glue tissue to the image border.
        m = cv2.copyMakeBorder(mask.astype(np.uint8), close_r, close_r, close_r, close_r,
                               cv2.BORDER_CONSTANT, value=0)
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, k)
        mask = m[close_r:-close_r, close_r:-close_r].astype(bool)

    px_area = pixel_um * pixel_um
    mask = fill_small_holes(mask, p["fill_holes_max_um2"] / px_area)
    mask, n_comp = remove_small_components(mask, p["min_tissue_area_um2"] / px_area)
    info = {
        "otsu_saturation": otsu,
        "threshold_saturation": threshold,
        "blur_px": blur_px,
        "close_radius_px": close_r,
        "min_tissue_area_px": p["min_tissue_area_um2"] / px_area,
        "fill_holes_max_px": p["fill_holes_max_um2"] / px_area,
        "n_components": n_comp,
    }
    return mask, info


# -- polygons ---------------------------------------------------------------------------------------
def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _ring(contour: np.ndarray, downsample: float, dims: tuple[int, int] | None, positive: bool
          ) -> list[list[float]] | None:
    pts = contour.reshape(-1, 2).astype(np.float64)
    if len(pts) < 3:
        return None
    # A mask pixel (i, j) covers level-0 [j*ds, (j+1)*ds); contours run through pixel centres.
    pts = (pts + 0.5) * downsample
    if dims is not None:
        pts[:, 0] = np.clip(pts[:, 0], 0, dims[0])
        pts[:, 1] = np.clip(pts[:, 1], 0, dims[1])
    a = _signed_area(pts)
    if a == 0:
        return None
    if (a > 0) != positive:
        pts = pts[::-1]
    pts = np.round(pts, 2)
    ring = pts.tolist()
    ring.append(ring[0])
    return ring


def mask_to_polygons(mask: np.ndarray, downsample: float, dims: tuple[int, int] | None = None
                     ) -> list[list[list[list[float]]]]:
    """Polygons (exterior ring + hole rings, closed) of a bool mask, in level-0 pixel coordinates.

    Exterior rings have positive shoelace area in (x, y) and holes negative, i.e. exteriors are
    counter-clockwise / holes clockwise when drawn with the y axis pointing up (RFC 7946 convention).
    """
    if not mask.any():
        return []
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hier = hierarchy[0]
    polygons = []
    for i, c in enumerate(contours):
        if hier[i][3] != -1:  # a hole: emitted with its parent
            continue
        ext = _ring(c, downsample, dims, positive=True)
        if ext is None:
            continue
        rings = [ext]
        child = hier[i][2]
        while child != -1:
            hole = _ring(contours[child], downsample, dims, positive=False)
            if hole is not None:
                rings.append(hole)
            child = hier[child][0]
        polygons.append(rings)
    return polygons


def polygons_to_geojson(polygons: list[list[list[list[float]]]]) -> dict[str, Any]:
    """A QuPath-importable GeoJSON FeatureCollection of Tissue annotations."""
    props = {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 200, 0]}}
    return feature_collection([polygon_feature(rings, props, feature_id=f"tissue-{i}")
                               for i, rings in enumerate(polygons)])


# -- slide-level API --------------------------------------------------------------------------------
def _thumbnail(slide, seg_rgb: np.ndarray, seg_ds: float, contours_mask: np.ndarray, max_px: int
               ) -> np.ndarray:
    W, H = slide.dimensions
    want_ds = max(1.0, max(W, H) / max_px)
    img, ds = seg_rgb, seg_ds
    if want_ds < seg_ds * 0.9:
        # The segmentation image is coarser than the thumbnail should be: read a finer one.
        try:
            img, ds = slide.read_at_downsample(want_ds)
        except Exception:  # noqa: BLE001 - a nicer thumbnail is not worth failing the stage
            img, ds = seg_rgb, seg_ds
    elif max(img.shape[:2]) > max_px:
        scale = max_px / max(img.shape[:2])
        tw, th = max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        ds = W / tw
    img = np.ascontiguousarray(img.copy())
    if contours_mask.any():
        contours, _ = cv2.findContours(contours_mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        scale = seg_ds / ds
        scaled = [np.round((c.astype(np.float64) + 0.5) * scale - 0.5).astype(np.int32) for c in contours]
        cv2.polylines(img, scaled, isClosed=True, color=_CONTOUR_COLOUR, thickness=2, lineType=cv2.LINE_8)
    return img


def segment_tissue(slide, params: dict[str, Any] | None = None) -> TissueResult:
    """Segment the tissue of an open :class:`pipeline.slide.Slide`."""
    p = resolve_settings(params)
    target_ds = max(1.0, p["seg_mpp"] / slide.mpp)
    rgb, ds = slide.read_at_downsample(target_ds)
    pixel_um = ds * slide.mpp
    mask, info = mask_from_rgb(rgb, pixel_um, p)
    polygons = mask_to_polygons(mask, ds, slide.dimensions)
    thumb = _thumbnail(slide, rgb, ds, mask, p["thumbnail_max_px"])
    n_px = int(mask.sum())
    stats = {
        "tissue_area_mm2": n_px * pixel_um * pixel_um / 1e6,
        "tissue_fraction": n_px / mask.size if mask.size else 0.0,
        "n_components": info["n_components"],
        "n_polygons": len(polygons),
        "threshold_saturation": info["threshold_saturation"],
        "otsu_saturation": info["otsu_saturation"],
        "mask_shape": [int(mask.shape[0]), int(mask.shape[1])],
        "mask_downsample": ds,
        "seg_mpp": pixel_um,
        "seg_mpp_requested": p["seg_mpp"],
        "level0_mpp": slide.mpp,
        "blur_px": info["blur_px"],
        "close_radius_px": info["close_radius_px"],
    }
    return TissueResult(mask=mask, mask_downsample=ds, thumbnail=thumb, polygons=polygons, stats=stats,
                        params=p)


def run_tissue(slide, out_dir: str | os.PathLike, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Segment ``slide`` and write mask.png, thumbnail.png, tissue.geojson and (last) tissue.json."""
    p = resolve_settings(params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = segment_tissue(slide, p)
    write_png(out / TISSUE_FILES["mask"], res.mask.astype(np.uint8) * 255)
    write_png(out / TISSUE_FILES["thumbnail"], res.thumbnail)
    write_json_atomic(out / TISSUE_FILES["geojson"], polygons_to_geojson(res.polygons))
    record = {
        "slide_id": slide.slide_id,
        "slide": slide.info(),
        "mask_downsample": res.mask_downsample,
        "params": p,
        "stats": res.stats,
        "provenance": provenance("tissue", p),
    }
    write_json_atomic(out / TISSUE_FILES["stats"], record)
    return record


def write_failed(out_dir: str | os.PathLike, slide_id: str, reason: str, params: dict[str, Any] | None,
                 stage: str = "tissue") -> None:
    """Explicit failed outputs of a slide that cannot be used (``on_slide_error: skip``): an empty mask,
    a blank thumbnail, an empty GeoJSON and ``tissue.json`` with ``status: failed``, the stage and the
    reason (written last)."""
    out = Path(out_dir)
    write_png(out / TISSUE_FILES["mask"], np.zeros((1, 1), np.uint8))
    write_png(out / TISSUE_FILES["thumbnail"], np.full((64, 64, 3), 128, np.uint8))
    write_json_atomic(out / TISSUE_FILES["geojson"], feature_collection())
    write_json_atomic(out / TISSUE_FILES["stats"], {"slide_id": slide_id, "status": "failed", "stage": stage,
                                                    "error": reason, "provenance": provenance("tissue", params)})


def load_mask(out_dir: str | os.PathLike) -> tuple[np.ndarray, float]:
    """(bool mask, mask_downsample) from a finished tissue output folder."""
    out = Path(out_dir)
    meta_path, mask_path = out / TISSUE_FILES["stats"], out / TISSUE_FILES["mask"]
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: tissue stage output missing (tissue.json)")
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    img = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise FileNotFoundError(f"{mask_path}: missing or unreadable tissue mask")
    shape = meta.get("stats", {}).get("mask_shape")
    if shape is not None and list(img.shape) != list(shape):
        raise ValueError(f"{mask_path}: shape {list(img.shape)} does not match tissue.json {shape}")
    return img > 127, float(meta["mask_downsample"])
