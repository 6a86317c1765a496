"""Bag schema round trip, atomic finalisation and resumable partial bags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.store import (SCHEMA_VERSION, BagError, BagWriter, list_bags, open_bag, partial_path, read_bag,
                            write_bag)

ATTRS = dict(slide_id="s1", model="test_resnet", weights="random", target_mpp=0.5, patch_size_px=224,
             level0_mpp=0.25, mpp_source="openslide.mpp-x", pipeline_version="0.1.0")


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(37, 12)).astype(np.float32)
    c = rng.integers(0, 10_000, size=(37, 2))
    p = write_bag(tmp_path / "s1.zarr", f, c, ATTRS, chunk_rows=8)
    bag = read_bag(p)
    assert bag.features.dtype == np.float16 and bag.features.shape == (37, 12)
    assert bag.coords.dtype == np.int32 and np.array_equal(bag.coords, c)
    np.testing.assert_allclose(bag.features, f.astype(np.float16))
    assert bag.attrs["n_patches"] == 37 and bag.attrs["feature_dim"] == 12
    assert bag.attrs["schema_version"] == SCHEMA_VERSION
    # it is a plain Zarr v3 group others can read
    meta = json.loads((p / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    assert list_bags(tmp_path) == [p]


def test_empty_bag(tmp_path):
    p = write_bag(tmp_path / "e.zarr", np.zeros((0, 8), np.float32), np.zeros((0, 2)), {**ATTRS, "slide_id": "e"})
    bag = read_bag(p)
    assert bag.n == 0 and bag.features.shape == (0, 8) and bag.coords.shape == (0, 2)


def test_missing_attrs_refused(tmp_path):
    with pytest.raises(BagError, match="mpp_source"):
        write_bag(tmp_path / "x.zarr", np.zeros((2, 4)), np.zeros((2, 2)),
                  {k: v for k, v in ATTRS.items() if k != "mpp_source"})
    assert not (tmp_path / "x.zarr").exists()


def test_partial_bag_is_invisible_and_resumes(tmp_path):
    path = tmp_path / "s1.zarr"
    f = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    c = np.zeros((40, 2), np.int32)
    w = BagWriter(path, 40, 4, fingerprint="abc", chunk_rows=8)
    w.write(0, f[:8], c[:8])
    w.write(8, f[8:16], c[8:16])
    w.write(16, f[16:20], c[16:20])  # half a chunk: not recorded as done
    del w  # "killed"
    assert not path.exists() and partial_path(path).is_dir()
    assert list_bags(tmp_path) == []
    with pytest.raises(BagError):
        open_bag(path)
    w = BagWriter(path, 40, 4, fingerprint="abc", chunk_rows=8)
    assert w.resumed and w.rows_done == 16
    w.write(16, f[16:40], c[16:40])
    w.finalize(ATTRS)
    np.testing.assert_array_equal(read_bag(path).features, f.astype(np.float16))
    assert not partial_path(path).exists()


def test_partial_with_other_fingerprint_is_discarded(tmp_path):
    path = tmp_path / "s1.zarr"
    w = BagWriter(path, 16, 4, fingerprint="old", chunk_rows=8)
    w.write(0, np.ones((8, 4)), np.zeros((8, 2)))
    w = BagWriter(path, 16, 4, fingerprint="new", chunk_rows=8)
    assert w.rows_done == 0


def test_shape_and_nan_checks(tmp_path):
    w = BagWriter(tmp_path / "b.zarr", 4, 3, fingerprint="x", chunk_rows=2)
    with pytest.raises(BagError, match="order"):
        w.write(2, np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(BagError, match="non-finite"):
        w.write(0, np.full((2, 3), np.nan), np.zeros((2, 2)))
    with pytest.raises(BagError, match="finalize"):
        w.finalize(ATTRS)
