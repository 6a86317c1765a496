"""Patch grid: exact physical patch sizes, read plans, tissue fractions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.grid import make_grid, read_plan, resolve_settings, tissue_fractions
from pipeline.slide import SlideError, open_slide
from pipeline.synthetic import make_slide


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("grid")
    a = make_slide(d / "a.svs", width=2048, height=1536, mpp=0.25, seed=1, flavour="svs")["path"]
    b = make_slide(d / "b.tif", width=2048, height=1536, mpp=0.26, seed=1, flavour="tiff")["path"]
    return a, b


def test_patch_size_is_exact_in_micrometres(two_slides):
    a, b = two_slides
    with open_slide(a) as sa, open_slide(b) as sb:
        pa, pb = read_plan(sa, 224, 0.5), read_plan(sb, 224, 0.5)
    # 224 px at 0.5 µm/px = 112 µm: 448 px at 0.25, 431 px at 0.26 (not binned to "20x")
    assert pa["patch_size_level0_px"] == 448
    assert pb["patch_size_level0_px"] == 431
    for p, mpp in ((pa, 0.25), (pb, 0.26)):
        assert abs(p["patch_size_level0_px"] * mpp - 112.0) <= mpp / 2 + 1e-9
        assert p["effective_mpp"] == pytest.approx(0.5, abs=mpp / 2 / 224 * 2)
        assert p["requested_mpp"] == 0.5


def test_read_plan_uses_best_level(two_slides):
    a, _ = two_slides
    with open_slide(a) as s:
        assert s.level_downsamples[1] == pytest.approx(4.0, rel=0.01)
        p = read_plan(s, 224, 1.0)  # 4x -> level 1, no resize
        assert p["level"] == 1 and p["read_size_px"] == 224 and not p["resize"]
        p = read_plan(s, 224, 0.5)  # 2x -> level 0 and downscale 448 -> 224
        assert p["level"] == 0 and p["read_size_px"] == 448 and p["resize"]
        p = read_plan(s, 224, 2.0)  # 8x -> level 1 (4x), read 448 and downscale
        assert p["level"] == 1 and p["read_size_px"] == 448
        with pytest.raises(SlideError, match="finer than the scan"):
            read_plan(s, 224, 0.1)
        assert read_plan(s, 224, 0.24)["level"] == 0  # 4% upsampling tolerated


def test_grid_on_full_tissue_mask(two_slides):
    a, b = two_slides
    for path, size0 in ((a, 448), (b, 431)):
        with open_slide(path) as s:
            mask = np.ones((1536 // 16, 2048 // 16), bool)
            g = make_grid(s, mask, 16.0, {"patch_size": 224, "target_mpp": 0.5})
        nx, ny = (2048 - size0) // size0 + 1, (1536 - size0) // size0 + 1
        assert g["n_patches"] == g["n_candidates"] == nx * ny
        coords = np.asarray(g["coords"])
        assert coords[:, 0].max() + size0 <= 2048 and coords[:, 1].max() + size0 <= 1536
        assert set(np.diff(np.unique(coords[:, 0]))) == {size0}


def test_min_tissue_fraction_and_stride(two_slides):
    a, _ = two_slides
    with open_slide(a) as s:
        mask = np.zeros((96, 128), bool)
        mask[:, :64] = True  # left half of the slide is tissue
        g = make_grid(s, mask, 16.0, {"min_tissue_fraction": 0.5})
        coords = np.asarray(g["coords"])
        assert (coords[:, 0] + 448 / 2 <= 1024 + 1).all()  # patch centres on the tissue half
        assert min(g["tissue_fraction"]) >= 0.5
        g2 = make_grid(s, mask, 16.0, {"min_tissue_fraction": 0.5, "stride": 112})
        assert g2["n_patches"] > 3 * g["n_patches"]
        empty = make_grid(s, np.zeros((96, 128), bool), 16.0)
        assert empty["n_patches"] == 0 and empty["coords"] == []


def test_slide_smaller_than_a_patch(tmp_path):
    p = make_slide(tmp_path / "tiny.tif", width=300, height=200, mpp=0.5, seed=0, flavour="tiff")["path"]
    with open_slide(p) as s:
        g = make_grid(s, np.ones((13, 19), bool), 16.0, {"patch_size": 224, "target_mpp": 1.0})
    assert g["n_patches"] == 0


def test_tissue_fractions_integral_image():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    # level-0 squares of 10 px over a mask at downsample 2 whose top-left 5x5 (= 10x10 level-0) is tissue
    f = tissue_fractions(mask, 2.0, np.array([0, 0, 5, 10]), np.array([0, 5, 5, 10]), 10)
    np.testing.assert_allclose(f, [1.0, 0.5, 0.25, 0.0])


def test_unknown_grid_key():
    with pytest.raises(ValueError, match="patchsize"):
        resolve_settings({"patchsize": 256})
