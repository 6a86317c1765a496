"""Existing features: CLAM / TRIDENT / STAMP .h5 files imported as bags, bags exported to CLAM's layout,
and MIL's refusal to mix bags whose encoder is unknown."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.h5io import FeatureImportError, import_folder, import_h5
from pipeline.mil import MILError
from pipeline.mil.data import check_compatible, load_dataset
from pipeline.store import main as store_main
from pipeline.store import open_bag, read_bag, write_bag

RNG = np.random.default_rng(0)


def _feats(n=20, d=12):
    return RNG.normal(size=(n, d)).astype(np.float32), (RNG.integers(0, 50, size=(n, 2)) * 256).astype(np.int64)


def _clam(path, feats, coords, coords_attrs=None, leading_one=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("features", data=feats[None] if leading_one else feats)
        c = fh.create_dataset("coords", data=coords)
        for k, v in (coords_attrs or {}).items():
            c.attrs[k] = v
    return path


def test_clam_without_attributes_records_unknowns(tmp_path):
    f, c = _feats()
    src = _clam(tmp_path / "h5_files" / "slide_a.h5", f, c)
    bag_path = import_h5(src, tmp_path / "bags")
    bag = read_bag(bag_path)
    np.testing.assert_array_equal(bag.features, f.astype(np.float16))
    np.testing.assert_array_equal(bag.coords, c.astype(np.int32))
    imp = bag.attrs["imported"]
    assert bag.slide_id == "slide_a" and imp["format"] == "clam" and bag.attrs["status"] == "imported"
    assert bag.attrs["model"] is None and bag.attrs["weights"] is None and bag.attrs["target_mpp"] is None
    assert set(imp["unknown"]) >= {"model", "weights", "target_mpp", "patch_size_px", "level0_mpp"}
    assert bag.attrs["provenance"]["stage"] == "import" and imp["source_file"] == str(src.resolve())
    with pytest.raises(FeatureImportError, match="already exists"):
        import_h5(src, tmp_path / "bags")


def test_clam_patch_level_and_leading_batch_axis(tmp_path):
    f, c = _feats()
    src = _clam(tmp_path / "x.h5", f, c, {"patch_size": 256, "patch_level": 1, "downsample": [4.0, 4.0]},
                leading_one=True)
    bag = read_bag(import_h5(src, tmp_path / "bags", encoder="resnet50_trunc", level0_mpp=0.25))
    assert bag.n == 20 and bag.attrs["feature_dim"] == 12
    assert bag.attrs["patch_size_px"] == 256 and bag.attrs["patch_size_level0_px"] == 1024
    assert bag.attrs["target_mpp"] == pytest.approx(1.0) and bag.attrs["model"] == "resnet50_trunc"
    assert bag.attrs["imported"]["from"]["model"] == "user" and bag.attrs["imported"]["said"]["patch_level"] == 1
    assert bag.attrs["imported"]["unknown"] == ["weights"]


def test_trident_folder_names_the_encoder_and_slides_give_mpp(tmp_path):
    from pipeline.synthetic import make_slide

    slides = tmp_path / "wsis"
    make_slide(slides / "case1.tif", width=512, height=384, mpp=0.25, seed=1)
    f, c = _feats(d=16)
    src = _clam(tmp_path / "job" / "20x_224px_0px_overlap" / "features_uni_v1" / "case1.h5", f, c,
                {"patch_size": 224, "patch_size_level0": 448, "target_magnification": 20,
                 "level0_magnification": 40, "overlap": 0})
    from pipeline.slide import discover_cohort

    res = import_folder(src.parent, tmp_path / "bags", slides=discover_cohort(slides_dir=slides))
    assert not res["failed"]
    bag = read_bag(res["imported"][0])
    imp = bag.attrs["imported"]
    assert imp["format"] == "trident" and bag.attrs["model"] == "uni_v1" and imp["from"]["model"] == "folder name"
    assert bag.attrs["level0_mpp"] == pytest.approx(0.25) and bag.attrs["mpp_source"].startswith("slide")
    assert bag.attrs["target_mpp"] == pytest.approx(0.5) and bag.attrs["patch_size_level0_px"] == 448
    assert imp["said"]["target_magnification"] == 20
    with pytest.raises(FeatureImportError, match="says encoder 'uni_v1'"):
        import_h5(src, tmp_path / "bags2", encoder="conch")


def test_stamp_coordinates_in_microns(tmp_path):
    f, _ = _feats(n=5, d=8)
    coords_um = np.array([[0, 0], [112, 0], [224, 0], [0, 112], [112, 112]], np.float32)
    src = tmp_path / "stamp" / "s1.h5"
    src.parent.mkdir()
    with h5py.File(src, "w") as fh:
        fh["feats"] = f.astype(np.float16)
        fh["coords"] = coords_um
        fh.attrs.update({"extractor": "ctranspath", "unit": "um", "tile_size_um": 112.0, "tile_size_px": 224,
                         "stamp_version": "2.1.0", "feat_type": "tile"})
    with pytest.raises(FeatureImportError, match="µm and the file does not say the slide's µm/px"):
        import_h5(src, tmp_path / "bags")
    bag = read_bag(import_h5(src, tmp_path / "bags", level0_mpp=0.25))
    assert bag.attrs["imported"]["format"] == "stamp" and bag.attrs["model"] == "ctranspath"
    assert bag.attrs["target_mpp"] == pytest.approx(0.5) and bag.attrs["patch_size_px"] == 224
    assert bag.attrs["patch_size_level0_px"] == 448
    np.testing.assert_array_equal(bag.coords, (coords_um / 0.25).astype(np.int32))


def test_bad_files_are_named(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "junk.h5").write_bytes(b"not hdf5")
    with h5py.File(tmp_path / "in" / "shape.h5", "w") as fh:
        fh["features"] = np.zeros((4, 3), np.float32)
        fh["coords"] = np.zeros((5, 2), np.int64)
    f, c = _feats()
    _clam(tmp_path / "in" / "good.h5", f, c)
    res = import_folder(tmp_path / "in", tmp_path / "bags")
    assert [p.name for p in res["imported"]] == ["good.zarr"]
    assert "not a readable HDF5" in res["failed"][str(tmp_path / "in" / "junk.h5")]
    assert "expected (4, 2)" in res["failed"][str(tmp_path / "in" / "shape.h5")]


def _our_bag(path, n=10, d=12, model="resnet50_trunc", sid=None):
    f, c = _feats(n, d)
    return write_bag(path, f, c.astype(np.int32), {
        "slide_id": sid or path.stem, "model": model, "model_tag": model, "weights": "random",
        "target_mpp": 0.5, "effective_mpp": 0.5, "patch_size_px": 224, "patch_size_level0_px": 448,
        "level0_mpp": 0.25, "mpp_source": "openslide.mpp-x", "schema_version": 1, "pipeline_version": "x"})


def test_export_to_clam_layout_and_back(tmp_path):
    ours = _our_bag(tmp_path / "bags" / "s9.zarr")
    assert store_main(["export", str(tmp_path / "bags"), "--out", str(tmp_path / "h5")]) == 0
    out = tmp_path / "h5" / "s9.h5"
    with h5py.File(out, "r") as fh:
        assert fh["features"].dtype == np.float32 and fh["features"].shape == (10, 12)
        assert fh["coords"].dtype == np.int64 and fh["coords"].attrs["patch_size"] == 448
        assert fh["coords"].attrs["patch_level"] == 0 and fh.attrs["encoder"] == "resnet50_trunc"
    assert store_main(["import", str(tmp_path / "h5"), "--out", str(tmp_path / "back")]) == 0
    back, orig = read_bag(tmp_path / "back" / "s9.zarr"), read_bag(ours)
    np.testing.assert_array_equal(back.features, orig.features)
    np.testing.assert_array_equal(back.coords, orig.coords)
    for k in ("model", "target_mpp", "patch_size_px", "patch_size_level0_px", "level0_mpp"):
        assert back.attrs[k] == orig.attrs[k], k
    assert back.attrs["imported"]["unknown"] == ["weights"]  # the exact weights cannot be verified


def test_mil_refuses_unknown_encoder_mixed_with_others(tmp_path):
    d = 12
    for i in range(3):
        f, c = _feats(d=d)
        _clam(tmp_path / "clam" / f"imp{i}.h5", f, c)
        _clam(tmp_path / "clam2" / f"other{i}.h5", f, c)
    import_folder(tmp_path / "clam", tmp_path / "bags")
    import_folder(tmp_path / "clam2", tmp_path / "bags2")
    ours = [_our_bag(tmp_path / "ours" / f"s{i}.zarr", d=d) for i in range(3)]
    imported = [open_bag(p) for p in sorted((tmp_path / "bags").glob("*.zarr"))]
    imported2 = [open_bag(p) for p in sorted((tmp_path / "bags2").glob("*.zarr"))]
    one_import = [(str(b.path), b.attrs) for b in imported]
    assert check_compatible(one_import)["model"] is None  # one import: fine together
    mixed = one_import + [(str(p), open_bag(p).attrs) for p in ours]
    with pytest.raises(MILError, match="allow_unknown_encoder") as exc:
        check_compatible(mixed)
    assert "imp0" in str(exc.value) and "model" in str(exc.value)
    with pytest.raises(MILError, match="another import"):
        check_compatible(one_import + [(str(b.path), b.attrs) for b in imported2])
    fa = check_compatible(mixed, allow_unknown_encoder=True)
    assert fa["model"] == "resnet50_trunc" and fa["feature_dim"] == d
    bad_dim = _our_bag(tmp_path / "ours" / "wide.zarr", d=d + 1)
    with pytest.raises(MILError, match="feature_dim"):
        check_compatible(mixed + [(str(bad_dim), open_bag(bad_dim).attrs)], allow_unknown_encoder=True)
    # through the dataset loader (what `python -m pipeline.mil train --allow-unknown-encoder` uses)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"imp{i},{i % 2}\ns{i},{(i + 1) % 2}\n" for i in range(3)))
    paths = [tmp_path / "bags", *ours]
    with pytest.raises(MILError, match="unknown"):
        load_dataset(paths, labels)
    assert len(load_dataset(paths, labels, allow_unknown_encoder=True)) == 6
