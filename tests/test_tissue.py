"""Tissue segmentation on small synthetic slides with ground-truth masks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.slide import open_slide
from pipeline.synthetic import MASK_DOWNSAMPLE, make_blank_slide, make_slide
from pipeline.config import STAGE_DEFAULTS
from pipeline.tissue import (load_mask, mask_from_rgb, mask_to_polygons, resolve_settings, run_tissue,
                             segment_tissue)

W, H = 2048, 1536


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tissue_slides")
    out = {}
    for name, flavour, seed, positive in (("tif_slide", "tiff", 1, False), ("svs_slide", "svs", 4, True)):
        p = d / (name + (".tif" if flavour == "tiff" else ".svs"))
        make_slide(p, width=W, height=H, mpp=0.5, seed=seed, positive=positive, flavour=flavour,
                   masks_dir=d / "masks")
        out[name] = p
    out["masks"] = d / "masks"
    return out


def _gt(slides: dict[str, Path], name: str) -> np.ndarray:
    return cv2.imread(str(slides["masks"] / f"{name}_tissue.png"), cv2.IMREAD_GRAYSCALE) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        a = cv2.resize(a.astype(np.uint8), (b.shape[1], b.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _write_half_resolution(src: Path, dst: Path, mpp: float) -> None:
    """The same tissue as ``src`` (generic TIFF) at half the pixel density: level 0 downscaled by 2."""
    import tifffile

    img = tifffile.imread(src, key=0)
    half = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    ppcm = 10000.0 / mpp
    with tifffile.TiffWriter(dst) as tw:
        tw.write(half, photometric="rgb", tile=(256, 256), compression="jpeg", resolution=(ppcm, ppcm),
                 resolutionunit="CENTIMETER", subfiletype=0, metadata=None)
        low = cv2.resize(half, (half.shape[1] // 4, half.shape[0] // 4), interpolation=cv2.INTER_AREA)
        tw.write(low, photometric="rgb", tile=(256, 256), compression="jpeg", subfiletype=1, metadata=None)


# (1) accuracy against the ground truth, both container flavours
@pytest.mark.parametrize("name", ["tif_slide", "svs_slide"])
def test_iou_against_ground_truth(slides, name):
    with open_slide(slides[name]) as s:
        res = segment_tissue(s, {})
    gt = _gt(slides, name)
    assert res.mask.dtype == bool
    assert res.mask_downsample == pytest.approx(MASK_DOWNSAMPLE, rel=0.02)  # 8 µm/px / 0.5 µm/px
    iou = _iou(res.mask, gt)
    assert iou >= 0.85, f"{name}: IoU {iou:.3f}"
    gt_area = gt.sum() * (MASK_DOWNSAMPLE * 0.5) ** 2 / 1e6
    assert res.stats["tissue_area_mm2"] == pytest.approx(gt_area, rel=0.15)
    assert res.stats["n_components"] >= 1
    assert res.thumbnail.dtype == np.uint8 and res.thumbnail.ndim == 3
    assert max(res.thumbnail.shape[:2]) <= STAGE_DEFAULTS["tissue"]["thumbnail_max_px"]
    # contours are drawn in green
    green = (res.thumbnail[..., 1] >= 190) & (res.thumbnail[..., 0] < 20) & (res.thumbnail[..., 2] < 20)
    assert green.sum() > 100


# (2) resolution awareness: same tissue at 0.5 and 1.0 µm/px, and segmented at two seg_mpp values
def test_area_independent_of_scan_resolution(slides, tmp_path):
    half = tmp_path / "half_res.tif"
    _write_half_resolution(slides["tif_slide"], half, mpp=1.0)
    with open_slide(slides["tif_slide"]) as s05, open_slide(half) as s10:
        assert s10.mpp == pytest.approx(1.0) and s10.dimensions == (W // 2, H // 2)
        a = segment_tissue(s05, {})
        b = segment_tissue(s10, {})
        c = segment_tissue(s05, {"seg_mpp": 4.0})
    assert a.stats["seg_mpp"] == pytest.approx(8.0, rel=0.02)
    assert b.stats["seg_mpp"] == pytest.approx(8.0, rel=0.02)
    assert b.mask_downsample == pytest.approx(a.mask_downsample / 2, rel=0.02)
    area_a, area_b, area_c = (r.stats["tissue_area_mm2"] for r in (a, b, c))
    assert area_a > 0
    assert abs(area_a - area_b) / area_a < 0.10, (area_a, area_b)
    assert abs(area_a - area_c) / area_a < 0.10, (area_a, area_c)


# (3) a blank slide: no tissue, no exception
def test_blank_slide(tmp_path):
    p = tmp_path / "blank.tif"
    make_blank_slide(p, width=1536, height=1024, mpp=0.5)
    with open_slide(p) as s:
        rec = run_tissue(s, tmp_path / "out", {})
    assert rec["stats"]["tissue_area_mm2"] == 0
    assert rec["stats"]["tissue_fraction"] == 0
    assert rec["stats"]["n_components"] == 0
    assert rec["stats"]["threshold_saturation"] >= STAGE_DEFAULTS["tissue"]["min_saturation"]
    gj = json.loads((tmp_path / "out" / "tissue.geojson").read_text())
    assert gj == {"type": "FeatureCollection", "features": []}
    mask, ds = load_mask(tmp_path / "out")
    assert not mask.any() and ds > 1


# (4) polygons are in level-0 pixel coordinates
def test_geojson_level0_coordinates(slides, tmp_path):
    name = "svs_slide"
    with open_slide(slides[name]) as s:
        rec = run_tissue(s, tmp_path / "out", {})
    gj = json.loads((tmp_path / "out" / "tissue.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]
    xs, ys = [], []
    for f in gj["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tissue"
        for k, ring in enumerate(f["geometry"]["coordinates"]):
            assert len(ring) >= 4 and ring[0] == ring[-1]
            pts = np.asarray(ring, dtype=float)
            area = 0.5 * np.sum(pts[:-1, 0] * pts[1:, 1] - pts[1:, 0] * pts[:-1, 1])
            assert (area > 0) if k == 0 else (area < 0)  # exterior vs hole orientation
            xs.extend(pts[:, 0])
            ys.extend(pts[:, 1])
    assert 0 <= min(xs) and max(xs) <= W and 0 <= min(ys) and max(ys) <= H
    gt = _gt(slides, name)
    rows, cols = np.nonzero(gt)
    tol = 4 * MASK_DOWNSAMPLE
    assert min(xs) == pytest.approx(cols.min() * MASK_DOWNSAMPLE, abs=tol)
    assert max(xs) == pytest.approx((cols.max() + 1) * MASK_DOWNSAMPLE, abs=tol)
    assert min(ys) == pytest.approx(rows.min() * MASK_DOWNSAMPLE, abs=tol)
    assert max(ys) == pytest.approx((rows.max() + 1) * MASK_DOWNSAMPLE, abs=tol)
    # rasterising the polygons at the mask resolution gives back (about) the mask
    mask, ds = load_mask(tmp_path / "out")
    raster = np.zeros(mask.shape, np.uint8)
    for f in gj["features"]:
        rings = [np.round(np.asarray(r) / ds - 0.5).astype(np.int32) for r in f["geometry"]["coordinates"]]
        cv2.fillPoly(raster, rings[:1], 1)
        if len(rings) > 1:
            cv2.fillPoly(raster, rings[1:], 0)
    assert _iou(raster > 0, mask) > 0.95
    assert rec["stats"]["n_polygons"] == len(gj["features"])


# (5) the output files and tissue.json keys
def test_output_files(slides, tmp_path):
    out = tmp_path / "out"
    with open_slide(slides["tif_slide"]) as s:
        rec = run_tissue(s, out, {"thumbnail_max_px": 512})
        info = s.info()
    assert sorted(p.name for p in out.iterdir()) == ["mask.png", "thumbnail.png", "tissue.geojson", "tissue.json"]
    meta = json.loads((out / "tissue.json").read_text())
    assert meta == json.loads(json.dumps(rec))
    for key in ("slide_id", "slide", "mask_downsample", "params", "stats", "provenance"):
        assert key in meta, key
    assert meta["slide_id"] == "tif_slide"
    assert meta["slide"] == json.loads(json.dumps(info))
    assert meta["params"] == {**STAGE_DEFAULTS["tissue"], "thumbnail_max_px": 512}
    assert meta["provenance"]["stage"] == "tissue"
    for key in ("tissue_area_mm2", "tissue_fraction", "n_components", "threshold_saturation", "mask_shape",
                "mask_downsample", "seg_mpp"):
        assert key in meta["stats"], key
    mask_png = cv2.imread(str(out / "mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask_png.dtype == np.uint8 and mask_png.ndim == 2 and set(np.unique(mask_png)) <= {0, 255}
    assert list(mask_png.shape) == meta["stats"]["mask_shape"]
    thumb = cv2.imread(str(out / "thumbnail.png"), cv2.IMREAD_COLOR)
    assert max(thumb.shape[:2]) == 512
    mask, ds = load_mask(out)
    assert mask.dtype == bool and ds == meta["mask_downsample"]
    area = mask.sum() * (ds * info["level0_mpp"]) ** 2 / 1e6
    assert meta["stats"]["tissue_area_mm2"] == pytest.approx(area, rel=1e-6)
    assert meta["stats"]["tissue_fraction"] == pytest.approx(mask.mean())


# (6) unknown / invalid parameters
def test_unknown_parameter(slides, tmp_path):
    with pytest.raises(ValueError, match="min_tisue_area_um2"):
        resolve_settings({"min_tisue_area_um2": 1})
    with open_slide(slides["tif_slide"]) as s:
        with pytest.raises(ValueError, match="bogus_key"):
            run_tissue(s, tmp_path / "out", {"bogus_key": 3})
        with pytest.raises(ValueError, match="seg_mpp"):
            segment_tissue(s, {"seg_mpp": -1})
    assert not (tmp_path / "out" / "tissue.json").exists()


# (7) small specks and holes, sized in µm
def _blob_image() -> np.ndarray:
    img = np.full((200, 300, 3), (238, 236, 240), np.uint8)
    pink = (214, 120, 170)
    cv2.rectangle(img, (20, 20), (140, 160), pink, -1)          # big section
    cv2.rectangle(img, (60, 60), (65, 65), (238, 236, 240), -1)  # 6x6 px hole
    cv2.rectangle(img, (90, 100), (109, 119), (238, 236, 240), -1)  # 20x20 px hole
    cv2.rectangle(img, (220, 40), (231, 51), pink, -1)          # 12x12 px speck
    cv2.rectangle(img, (220, 140), (231, 151), pink, -1)        # another speck
    cv2.rectangle(img, (180, 90), (200, 110), (10, 10, 10), -1)  # black pen mark
    rng = np.random.default_rng(0)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def test_small_specks_removed_and_holes_filled():
    img = _blob_image()
    # 8 µm/px: a speck is 144 px = 9216 µm² < 20000 µm² -> removed
    mask, info = mask_from_rgb(img, 8.0, {"blur_um": 0})
    assert info["n_components"] == 1
    assert not mask[40:52, 220:232].any() and not mask[140:152, 220:232].any()
    assert not mask[90:111, 180:201].any()  # dark pen mark is not tissue
    assert mask[30:150, 30:130][:, :30].all()
    # 6x6 px hole = 2304 µm² < 5000 -> filled; 20x20 px = 25600 µm² -> kept
    assert mask[60:66, 60:66].all()
    assert not mask[104:116, 94:106].any()
    # the same image at 16 µm/px: specks are 36864 µm² -> kept; the small hole is now 9216 µm² -> kept
    mask16, info16 = mask_from_rgb(img, 16.0, {"blur_um": 0, "close_um": 0})
    assert info16["n_components"] == 3
    assert mask16[42:50, 222:230].all()
    assert not mask16[61:65, 61:65].any()
    # thresholds follow the parameters
    _, info_lo = mask_from_rgb(img, 8.0, {"blur_um": 0, "min_tissue_area_um2": 5000})
    assert info_lo["n_components"] == 3
    # polygons of the synthetic mask: one polygon, exterior + one hole, scaled to level 0
    polys = mask_to_polygons(mask, 4.0)
    assert len(polys) == 1 and len(polys[0]) == 2
    ext = np.asarray(polys[0][0])
    assert ext[:, 0].min() == pytest.approx(20.5 * 4, abs=4) and ext[:, 0].max() == pytest.approx(140.5 * 4, abs=4)


def test_blank_image_is_not_tissue():
    rng = np.random.default_rng(1)
    glass = np.clip(np.full((256, 256, 3), 238.0) + rng.normal(0, 4, (256, 256, 3)), 0, 255).astype(np.uint8)
    mask, info = mask_from_rgb(glass, 8.0)
    assert not mask.any() and info["threshold_saturation"] >= STAGE_DEFAULTS["tissue"]["min_saturation"]
