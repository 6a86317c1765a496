"""Cohort view: all bags of one model_tag as one lazy dask array; out-of-core statistics and table export."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.mil import MILError
from pipeline.mil.__main__ import main
from pipeline.mil.cohort import cohort_view, export_table, feature_stats
from pipeline.store import write_bag


def _attrs(sid, **over):
    a = dict(slide_id=sid, model="toy", weights="random", target_mpp=0.5, patch_size_px=224, level0_mpp=0.25,
             mpp_source="test", pipeline_version="0.1.0")
    a.update(over)
    return a


@pytest.fixture()
def bags(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"c": 7, "a": 30, "b": 0, "d": 12}  # b is an empty bag (no tissue)
    data = {}
    for sid, n in sizes.items():
        f = (rng.normal(size=(n, 5)) * 3 + 2).astype(np.float16)
        xy = rng.integers(0, 10_000, size=(n, 2)).astype(np.int32)
        write_bag(tmp_path / "bags" / f"{sid}.zarr", f, xy, _attrs(sid), chunk_rows=4)
        data[sid] = (f, xy)
    return tmp_path / "bags", data


def test_lazy_view_concatenates_bags_with_a_slide_index(bags):
    folder, data = bags
    view = cohort_view(folder)
    features, slide_index, slide_ids = view  # unpacks as a 3-tuple
    assert slide_ids == ["a", "b", "c", "d"]
    import dask.array as da

    assert isinstance(features, da.Array) and isinstance(slide_index, da.Array)
    assert features.shape == (49, 5) and features.dtype == np.float16
    assert features.chunks[0][:3] == (4, 4, 4)  # the bags' own zarr chunks: read chunk by chunk
    idx = slide_index.compute()
    assert np.bincount(idx, minlength=4).tolist() == [30, 0, 7, 12]
    x = features.compute()
    for pos, sid in enumerate(slide_ids):
        np.testing.assert_array_equal(x[idx == pos], data[sid][0])
        np.testing.assert_array_equal(view.coords.compute()[idx == pos], data[sid][1])
    sub = view.select(["d", "a"])
    assert sub.slide_ids == ["a", "d"] and sub.features.shape == (42, 5)
    with pytest.raises(MILError, match="not in the cohort"):
        view.select(["zz"])


def test_feature_stats_out_of_core(bags):
    folder, data = bags
    view = cohort_view(folder)
    mean, std = feature_stats(view, ["a", "c"])
    ref = np.concatenate([data["a"][0], data["c"][0]]).astype(np.float64)
    assert np.allclose(mean, ref.mean(0), atol=1e-4) and np.allclose(std, ref.std(0), atol=1e-4)
    with pytest.raises(MILError, match="at least one patch"):
        feature_stats(view, ["b"])


def test_failed_slide_placeholders_left_out(bags, caplog):
    folder, _ = bags
    write_bag(folder / "broken.zarr", np.zeros((0, 5), np.float16), np.zeros((0, 2), np.int32),
              _attrs("broken", status="failed", stage="tissue", error="unreadable", target_mpp=None, weights=None))
    with caplog.at_level("WARNING", logger="pipeline.mil"):
        view = cohort_view(folder)
    assert "broken" not in view.slide_ids and "broken" in caplog.text


def test_mixed_feature_settings_refused(bags, tmp_path):
    folder, _ = bags
    write_bag(folder / "odd.zarr", np.zeros((2, 5), np.float16), np.zeros((2, 2), np.int32),
              _attrs("odd", patch_size_px=256))
    with pytest.raises(MILError, match=r"odd\.zarr.*patch_size_px"):
        cohort_view(folder)


@pytest.mark.parametrize("fmt", ["zarr", "csv"])
def test_export_table(bags, tmp_path, fmt):
    folder, data = bags
    out = tmp_path / f"table.{fmt}"
    info = export_table(folder, out, chunk_rows=5)
    assert info["rows"] == 49 and info["slides"] == 4 and info["dim"] == 5
    if fmt == "zarr":
        import zarr

        g = zarr.open_group(str(out), mode="r")
        assert g.attrs["slide_ids"] == ["a", "b", "c", "d"] and g.attrs["n_patches"] == [30, 0, 7, 12]
        idx = np.asarray(g["slide_index"][:])
        np.testing.assert_array_equal(np.asarray(g["features"][:])[idx == 3], data["d"][0])
        np.testing.assert_array_equal(np.asarray(g["coords"][:])[idx == 2], data["c"][1])
    else:
        df = pd.read_csv(out)
        assert list(df.columns[:4]) == ["slide_id", "x", "y", "f0"] and len(df) == 49
        d = df[df.slide_id == "d"]
        np.testing.assert_allclose(d[[f"f{j}" for j in range(5)]].to_numpy(), data["d"][0].astype(np.float32),
                                   rtol=1e-5)
    assert not list(tmp_path.glob(".*tmp*"))


def test_export_cli(bags, tmp_path, capsys):
    folder, _ = bags
    assert main(["export", "--bags", str(folder), "--out", str(tmp_path / "t.zarr")]) == 0
    assert (tmp_path / "t.zarr").is_dir()
    assert main(["export", "--bags", str(tmp_path / "none"), "--out", str(tmp_path / "u.csv")]) == 2
    assert "none" in capsys.readouterr().err
