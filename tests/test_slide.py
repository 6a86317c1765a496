"""Slide opening and µm/px resolution: manifest > vendor metadata > config default > clear error."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from pipeline.slide import (SlideError, discover_slides, manifest_mpp, mpp_from_properties, open_slide,
                            read_manifest, slide_id_from_path)
from pipeline.synthetic import make_slide


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    out = {}
    out["tif"] = make_slide(d / "a.tif", width=1024, height=768, mpp=0.25, seed=3, flavour="tiff")["path"]
    out["svs"] = make_slide(d / "b.svs", width=1024, height=768, mpp=0.26, seed=4, flavour="svs")["path"]
    out["nompp"] = make_slide(d / "c.tif", width=1024, height=768, mpp=0.5, seed=5, flavour="tiff",
                              write_mpp=False)["path"]
    return out


@pytest.mark.parametrize("reader", ["openslide", "tiffslide", "auto"])
def test_mpp_from_vendor_metadata(slides, reader):
    with open_slide(slides["tif"], reader=reader) as s:
        assert s.mpp == pytest.approx(0.25, rel=1e-6)
        assert s.mpp_source in ("openslide.mpp-x", "tiffslide.mpp-x", "tiff.resolution")
        assert s.dimensions == (1024, 768)
    with open_slide(slides["svs"], reader=reader) as s:
        assert s.mpp == pytest.approx(0.26, rel=1e-6)


def test_svs_is_read_as_aperio_by_openslide(slides):
    with open_slide(slides["svs"], reader="openslide") as s:
        assert s.vendor == "aperio"
        assert s.mpp_source == "openslide.mpp-x"


def test_manifest_mpp_wins_over_metadata(slides):
    with open_slide(slides["tif"], mpp=0.3) as s:
        assert (s.mpp, s.mpp_source) == (0.3, "manifest")


def test_no_mpp_is_a_clear_error_unless_default_given(slides):
    with pytest.raises(SlideError) as exc:
        open_slide(slides["nompp"])
    msg = str(exc.value)
    assert str(slides["nompp"]) in msg and "mpp" in msg and "default_mpp" in msg
    with open_slide(slides["nompp"], default_mpp=0.5) as s:
        assert (s.mpp, s.mpp_source) == (0.5, "config.default_mpp")
    # metadata still wins over the config default
    with open_slide(slides["tif"], default_mpp=0.5) as s:
        assert s.mpp == pytest.approx(0.25)


def test_implausible_metadata_is_rejected():
    # 72 dpi placeholder resolution = 352.8 µm/px: must not be trusted
    mpp, src, notes = mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"})
    assert mpp is None and src is None and notes
    mpp, src, _ = mpp_from_properties({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"})
    assert mpp == pytest.approx(0.25) and src == "tiff.resolution"
    mpp, src, _ = mpp_from_properties({"openslide.mpp-x": "0.2527"})
    assert (mpp, src) == (0.2527, "openslide.mpp-x")


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    text = tmp_path / "notes.tif"
    text.write_text("this is not a slide\n")
    for p, why in ((empty, "empty"), (text, "cannot open"), (tmp_path / "missing.svs", "does not exist")):
        with pytest.raises(SlideError) as exc:
            open_slide(p)
        assert str(p) in str(exc.value) and why in str(exc.value)


def test_read_region_returns_rgb_and_white_outside(slides):
    with open_slide(slides["tif"]) as s:
        a = s.read_region(0, 0, 0, 64, 32)
        assert a.shape == (32, 64, 3) and a.dtype == np.uint8
        outside = s.read_region(2000, 2000, 0, 16, 16)  # beyond the slide: transparent -> white
        assert outside.min() >= 250
        assert s.best_level_for_downsample(4.0) >= 1
        assert s.best_level_for_downsample(1.0) == 0


def test_discover_and_duplicate_ids(tmp_path):
    (tmp_path / "x 1 é.svs").write_bytes(b"1")
    (tmp_path / "y.tiff").write_bytes(b"1")
    (tmp_path / "readme.txt").write_text("no")
    found = discover_slides(tmp_path)
    assert sorted(found) == ["x 1 é", "y"]
    (tmp_path / "y.svs").write_bytes(b"1")
    with pytest.raises(SlideError) as exc:
        discover_slides(tmp_path)
    assert "y.svs" in str(exc.value) and "y.tiff" in str(exc.value)
    assert slide_id_from_path("/a/b/c.ome.tif") == "c.ome"
    (tmp_path / "y.svs").unlink()
    (tmp_path / "a <b>.svs").write_bytes(b"1")
    with pytest.raises(SlideError, match="rename the file"):
        discover_slides(tmp_path)


def test_manifest(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,label,mpp\na,1,0.25\nb,0,\n")
    rows = read_manifest(csv)
    assert manifest_mpp(rows, "a") == 0.25 and manifest_mpp(rows, "b") is None and manifest_mpp(rows, "z") is None
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\na,1\n")
    with pytest.raises(SlideError, match="slide_id"):
        read_manifest(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("slide_id,label\na,1\na,0\n")
    with pytest.raises(SlideError, match="twice"):
        read_manifest(dup)


def test_tiff_without_pyramid_still_opens(tmp_path):
    p = tmp_path / "flat.tif"
    tifffile.imwrite(p, np.full((300, 400, 3), 240, np.uint8), tile=(128, 128), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        assert s.dimensions == (400, 300) and s.mpp == pytest.approx(0.5)
