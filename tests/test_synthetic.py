"""Synthetic slides: real pyramidal JPEG TIFFs that OpenSlide and tiffslide read, with ground truth."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from pipeline import synthetic
from pipeline.synthetic import make_blank_slide, make_cohort, make_slide

W, H, MPP = 1536, 1024, 0.5
LEVEL_DIMS = [(1536, 1024), (384, 256), (96, 64)]
MASK_SHAPE = (64, 96)  # (H/16, W/16)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    metas = make_cohort(out, n=4, width=W, height=H, mpp=MPP, seed=7)
    return out, metas


def _props(path):
    with openslide.OpenSlide(str(path)) as s:
        return dict(s.properties), s.level_count, list(s.level_dimensions), list(s.level_downsamples)


def _masks(out: Path, sid: str):
    tissue = cv2.imread(str(out / "masks" / f"{sid}_tissue.png"), cv2.IMREAD_UNCHANGED)
    tumour = cv2.imread(str(out / "masks" / f"{sid}_tumour.png"), cv2.IMREAD_UNCHANGED)
    return tissue, tumour


def _read(path, x, y, size=224):
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((int(x), int(y)), 0, (size, size)).convert("RGB")).astype(float)


def _centre_of(mask: np.ndarray, erode: int) -> tuple[int, int]:
    """Level-0 top-left of a 224 px patch centred on a mask pixel far inside ``mask`` (downsample 16);
    the whole patch lies inside the slide."""
    inner = cv2.erode((mask > 0).astype(np.uint8), np.ones((erode, erode), np.uint8),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0)
    valid = np.zeros_like(inner)
    valid[7: (H - 120) // 16 + 1, 7: (W - 120) // 16 + 1] = 1
    ys, xs = np.nonzero(inner & valid)
    assert len(ys), "no interior pixel"
    i = len(ys) // 2
    return int(xs[i]) * 16 + 8 - 112, int(ys[i]) * 16 + 8 - 112


def test_layout_and_flavours(cohort):
    out, metas = cohort
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert names == ["labels.csv", "slide_000.tif", "slide_001.svs", "slide_002.tif", "slide_003.svs"]
    assert [m["slide_id"] for m in metas] == [f"slide_{i:03d}" for i in range(4)]
    for m in metas:
        assert Path(m["path"]).exists()
        for suffix in ("_tissue.png", "_tumour.png", ".json"):
            assert (out / "masks" / f"{m['slide_id']}{suffix}").exists()


def test_openslide_generic_tiff(cohort):
    out, _ = cohort
    props, n, dims, ds = _props(out / "slide_000.tif")
    assert props["openslide.vendor"] == "generic-tiff"
    assert n == 3 and int(props["openslide.level-count"]) == 3
    assert dims == LEVEL_DIMS
    assert ds == pytest.approx([1.0, 4.0, 16.0])
    assert float(props["openslide.mpp-x"]) == pytest.approx(MPP)
    assert float(props["openslide.mpp-y"]) == pytest.approx(MPP)
    assert props["tiff.ResolutionUnit"] == "centimeter"
    assert float(props["tiff.XResolution"]) == pytest.approx(1e4 / MPP)


def test_openslide_aperio(cohort):
    out, _ = cohort
    props, n, dims, ds = _props(out / "slide_001.svs")
    assert props["openslide.vendor"] == "aperio"
    assert n == 3 and int(props["openslide.level-count"]) == 3
    assert dims == LEVEL_DIMS
    assert float(props["openslide.mpp-x"]) == pytest.approx(MPP)
    assert float(props["aperio.MPP"]) == pytest.approx(MPP)
    assert props["openslide.objective-power"] == "20"
    with openslide.OpenSlide(str(out / "slide_001.svs")) as s:
        assert "thumbnail" in s.associated_images


@pytest.mark.parametrize("name,vendor", [("slide_000.tif", None), ("slide_001.svs", "aperio")])
def test_tiffslide_opens_both(cohort, name, vendor):
    out, _ = cohort
    with tiffslide.TiffSlide(str(out / name)) as s:
        assert [tuple(d) for d in s.level_dimensions] == LEVEL_DIMS
        assert s.properties["tiffslide.vendor"] == vendor
        assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(MPP)
        region = np.asarray(s.read_region((0, 0), 2, (96, 64)))
        assert region.shape[:2] == (64, 96)


@pytest.mark.parametrize("flavour", ["tiff", "svs"])
def test_write_mpp_false_gives_no_mpp(tmp_path, flavour):
    path = tmp_path / f"nompp{synthetic.FLAVOUR_EXT[flavour]}"
    meta = make_slide(path, width=768, height=512, seed=1, flavour=flavour, write_mpp=False)
    assert meta["mpp_written"] is False
    props, n, _, _ = _props(path)
    assert props["openslide.vendor"] == ("aperio" if flavour == "svs" else "generic-tiff")
    assert "openslide.mpp-x" not in props and "openslide.mpp-y" not in props
    assert props.get("tiff.ResolutionUnit", "none") == "none"
    with tiffslide.TiffSlide(str(path)) as s:
        assert s.properties["tiffslide.mpp-x"] is None


def test_labels_csv(cohort):
    out, metas = cohort
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == ["slide_id", "label", "patient_id"]
    assert [r["slide_id"] for r in rows] == [f"slide_{i:03d}" for i in range(4)]
    labels = [int(r["label"]) for r in rows]
    assert sorted(labels) == [0, 0, 1, 1]
    patients = [r["patient_id"] for r in rows]
    assert all(p.startswith("patient_") and len(p) == len("patient_000") for p in patients)
    assert len(set(patients)) < len(patients)  # some patient owns two slides
    for p in set(patients):  # ... with a single, well-defined label
        assert len({lab for lab, q in zip(labels, patients) if q == p}) == 1
    assert [m["label"] for m in metas] == labels


def test_cohort_plan_balance_and_flavours():
    plan = synthetic.cohort_plan(8, seed=0)
    assert sum(p["label"] for p in plan) == 4
    assert [p["flavour"] for p in plan] == ["tiff", "svs"] * 4
    assert len({p["patient_id"] for p in plan}) == 6
    assert synthetic.cohort_plan(8, seed=0) == plan
    assert [p["label"] for p in synthetic.cohort_plan(8, seed=1)] != [p["label"] for p in plan] or \
        [p["seed"] for p in synthetic.cohort_plan(8, seed=1)] != [p["seed"] for p in plan]


def test_ground_truth_masks(cohort):
    out, metas = cohort
    for m in metas:
        sid = m["slide_id"]
        tissue, tumour = _masks(out, sid)
        assert tissue.dtype == np.uint8 and tumour.dtype == np.uint8
        assert tissue.shape == MASK_SHAPE and tumour.shape == MASK_SHAPE
        assert set(np.unique(tissue)) <= {0, 255} and set(np.unique(tumour)) <= {0, 255}
        gt = json.loads((out / "masks" / f"{sid}.json").read_text())
        assert gt["downsample"] == 16 and gt["width"] == W and gt["height"] == H
        assert gt["mpp"] == pytest.approx(MPP) and gt["label"] == m["label"]
        frac = (tissue > 0).mean()
        assert 0.15 < frac < 0.7
        assert gt["tissue_fraction"] == pytest.approx(frac, abs=0.02)
        # a strip of glass along the borders
        assert not tissue[0].any() and not tissue[-1].any() and not tissue[:, 0].any() and not tissue[:, -1].any()
        assert not ((tumour > 0) & (tissue == 0)).any(), "tumour outside tissue"
        if m["label"] == 1:
            t_frac = (tumour > 0).sum() / (tissue > 0).sum()
            assert 0.05 < t_frac < 0.4
        else:
            assert not tumour.any()


def test_pixels_match_ground_truth(cohort):
    out, metas = cohort
    for m in metas:
        tissue, tumour = _masks(out, m["slide_id"])
        stroma = (tissue > 0) & (tumour == 0)
        x, y = _centre_of(stroma, 9)
        px = _read(m["path"], x, y)
        mean = px.reshape(-1, 3).mean(axis=0)
        assert mean.mean() < 215, f"tissue patch looks like background: {mean}"
        assert mean[0] > mean[1], f"not H&E-like (red <= green): {mean}"
        bx, by = _centre_of(tissue == 0, 15)
        bg = _read(m["path"], bx, by).reshape(-1, 3).mean(axis=0)
        assert (bg > 225).all(), f"background not bright: {bg}"
        if m["label"] == 1:
            tx, ty = _centre_of(tumour, 3)
            tum = _read(m["path"], tx, ty).reshape(-1, 3).mean(axis=0)
            # tumour: darker and bluer than stroma
            assert tum.mean() < mean.mean()
            assert tum[2] / tum[0] > mean[2] / mean[0]


def test_blank_slide(tmp_path):
    meta = make_blank_slide(tmp_path / "blank.tif", 1024, 768, 0.5, masks_dir=tmp_path / "masks")
    assert meta["tissue_fraction"] == 0 and meta["label"] == 0
    props, n, dims, _ = _props(tmp_path / "blank.tif")
    assert props["openslide.vendor"] == "generic-tiff" and float(props["openslide.mpp-x"]) == pytest.approx(0.5)
    with openslide.OpenSlide(str(tmp_path / "blank.tif")) as s:
        img = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB")).astype(float)
    assert img.min() > 200 and img.mean() > 230
    assert not cv2.imread(str(tmp_path / "masks" / "blank_tissue.png"), cv2.IMREAD_UNCHANGED).any()


def test_deterministic(tmp_path):
    def build(d: Path, seed: int):
        make_slide(d / "a.svs", width=768, height=512, seed=seed, positive=True, masks_dir=d / "m")
        make_slide(d / "b.tif", width=700, height=600, seed=seed, positive=False, masks_dir=d / "m")
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    a = build(tmp_path / "one", 3)
    b = build(tmp_path / "two", 3)
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:
        assert a[k] == b[k], k
    c = build(tmp_path / "three", 4)
    assert c["a.svs"] != a["a.svs"]


def test_level_downsamples_and_cli(tmp_path):
    assert synthetic.level_downsamples(4096, 3072) == [1, 4, 16]
    assert synthetic.level_downsamples(16384, 16384) == [1, 4, 16, 64]
    assert synthetic.main([str(tmp_path / "out"), "--n", "2", "--width", "768", "--height", "512",
                           "--mpp", "0.25", "--seed", "5"]) == 0
    out = tmp_path / "out"
    assert (out / "slide_000.tif").exists() and (out / "slide_001.svs").exists()
    assert float(_props(out / "slide_001.svs")[0]["openslide.mpp-x"]) == pytest.approx(0.25)
    assert float(_props(out / "slide_000.tif")[0]["openslide.mpp-x"]) == pytest.approx(0.25)
    assert json.loads((out / "masks" / "slide_000.json").read_text())["mpp"] == pytest.approx(0.25)


def test_tiles_are_seamless():
    """Every pixel is a function of its position: a tile rendered at any origin (here straddling four tiles
    of the stored grid, through tissue, tumour and glass) equals that window of the stitched tile rows."""
    r = synthetic._Renderer(5, 1536, 1024, positive=True, blank=False)
    rows = [r.row(ty) for ty in range(r.nty)]
    full = np.concatenate([row[0] for row in rows], axis=0)
    assert sum(row[4] for row in rows) > 0, "no tumour on the test slide"
    n_tumour = 0
    for y in (120, 376, 632):
        for x in (128, 384, 640, 896, 1152):
            tile, tissue, tumour = r.tile_at(x, y)
            np.testing.assert_array_equal(tile, full[y:y + 256, x:x + 256], err_msg=f"tile at {(x, y)}")
            n_tumour += int(tumour.any())
    assert n_tumour > 0


def test_memory_does_not_grow_with_height(tmp_path):
    """Slides are generated one tile row at a time: 16x the rows, the same peak of traced (numpy/OpenCV)
    memory. (Level 0 of the tall slide alone is 12 MiB of RGB; the old in-memory generator peaked at 144 MB.)"""
    import tracemalloc

    peaks = []
    for h in (1024, 16384):
        tracemalloc.start()
        try:
            make_slide(tmp_path / f"h{h}.svs", width=256, height=h, mpp=0.5, seed=1, positive=True)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    short, tall = peaks
    assert tall < 1.2 * short + (2 << 20), f"peak {short / 2**20:.1f} MiB -> {tall / 2**20:.1f} MiB"


def test_reduced_levels_are_downsamples_of_level0(tmp_path):
    """The streamed pyramid: each level is the 4x area average of the one above (up to JPEG error),
    including partial blocks at the right/bottom edges."""
    path = make_slide(tmp_path / "p.tif", width=1000, height=1100, mpp=0.5, seed=6, positive=True)["path"]
    with tifffile.TiffFile(path) as tf:
        levels = [page.asarray() for page in tf.pages]
    assert [lv.shape[:2] for lv in levels] == [(1100, 1000), (275, 250), (69, 63)]
    for hi, lo in zip(levels, levels[1:]):
        h, w = hi.shape[:2]
        pad = cv2.copyMakeBorder(hi, 0, (-h) % 4, 0, (-w) % 4, cv2.BORDER_REPLICATE)
        ref = cv2.resize(pad, (pad.shape[1] // 4, pad.shape[0] // 4), interpolation=cv2.INTER_AREA)
        diff = np.abs(ref.astype(float) - lo)
        shifted = np.abs(ref[:, 1:].astype(float) - lo[:, :-1]).mean()  # what a one-pixel error would give
        assert diff.mean() < 6 and diff.mean() < 0.6 * shifted, (diff.mean(), shifted)  # JPEG q80 error only
        assert diff[-1].mean() < 8 and diff[:, -1].mean() < 8, "edge rows/columns"


@pytest.mark.parametrize("name", ["big.svs", "big.tif"])
def test_bigtiff_for_large_slides(tmp_path, monkeypatch, name):
    """Slides with >= 4 GiB of raw level 0 are BigTIFF (here forced small): both readers and the direct
    tiled-JPEG decoder handle them."""
    from pipeline.slide import open_slide

    monkeypatch.setattr(synthetic, "_BIGTIFF_RAW_BYTES", 1)
    path = make_slide(tmp_path / name, width=1024, height=768, mpp=0.25, seed=2, positive=True)["path"]
    with tifffile.TiffFile(path) as tf:
        assert tf.is_bigtiff
    props, n, dims, _ = _props(path)
    assert props["openslide.vendor"] == ("aperio" if name.endswith(".svs") else "generic-tiff")
    assert dims == [(1024, 768), (256, 192), (64, 48)]
    assert float(props["openslide.mpp-x"]) == pytest.approx(0.25)
    with tiffslide.TiffSlide(str(path)) as s:
        assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
    with open_slide(path, reader="openslide") as s:
        assert s.decoder(0) == "tiled-jpeg-direct"
        np.testing.assert_array_equal(s.read_level_region(0, 200, 100, 300, 250), s.read_region(200, 100, 0, 300, 250))
