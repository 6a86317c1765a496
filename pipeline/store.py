"""Zarr v3 feature bags: the one on-disk format that feature extraction writes and MIL reads.

Bag schema (``schema_version`` 1), one Zarr v3 group per slide at
``{results_dir}/features/{model_tag}/{slide_id}.zarr``:

* ``features``: (N, D) float16, chunked by rows
* ``coords``:   (N, 2) int32, level-0 (x, y) of each patch's top-left corner
* group attributes: ``slide_id``, ``n_patches``, ``feature_dim``, ``model``, ``weights``
  (``{"source": ..., "sha256": ...}`` or ``"random"``), ``target_mpp``, ``patch_size_px``,
  ``level0_mpp``, ``mpp_source``, ``schema_version``, ``pipeline_version`` and a ``provenance`` record.

A bag is written into a hidden sibling directory ``.{slide_id}.zarr.partial`` chunk by chunk and renamed
into place only when complete, so a directory named ``*.zarr`` is always a finished bag. The partial
directory keeps a ``progress.json`` (rows done + a fingerprint of the inputs and settings) so an
interrupted extraction resumes from the last completed chunk when nothing that matters changed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .files import disk_full_as_error, read_json_or_none, replace_into, write_json_atomic

SCHEMA_VERSION = 1
REQUIRED_ATTRS = (
    "slide_id", "n_patches", "feature_dim", "model", "weights", "target_mpp", "patch_size_px",
    "level0_mpp", "mpp_source", "schema_version", "pipeline_version",
)


class BagError(ValueError):
    """A bag is missing, incomplete or does not follow the schema."""


@dataclass
class Bag:
    slide_id: str
    features: np.ndarray  # (N, D) float16 (or a lazy zarr array from open_bag)
    coords: np.ndarray  # (N, 2) int32
    attrs: dict[str, Any]
    path: Path | None = None

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


def _zarr():
    import zarr

    return zarr


def bag_path(features_dir: str | os.PathLike, slide_id: str) -> Path:
    return Path(features_dir) / f"{slide_id}.zarr"


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


class BagWriter:
    """Write one bag chunk by chunk, resumably; ``finalize`` renames it into place.

    ``fingerprint`` identifies the inputs and settings; a partial bag with another fingerprint is
    discarded rather than resumed.
    """

    def __init__(self, path: str | os.PathLike, n_patches: int, feature_dim: int,
                 fingerprint: str, chunk_rows: int = 1024):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.n = int(n_patches)
        self.d = int(feature_dim)
        self.fingerprint = fingerprint
        self.chunk_rows = max(1, int(chunk_rows))
        self.rows_done = 0
        zarr = _zarr()
        progress = self._read_progress()
        if progress is not None and progress.get("fingerprint") == fingerprint \
                and progress.get("n_patches") == self.n and progress.get("feature_dim") == self.d \
                and progress.get("chunk_rows") == self.chunk_rows:
            try:
                self.group = zarr.open_group(store=str(self.tmp), mode="r+")
                ok = (tuple(self.group["features"].shape) == (self.n, self.d)
                      and tuple(self.group["coords"].shape) == (self.n, 2))
            except Exception:  # noqa: BLE001 - a damaged partial (e.g. disk full mid-write) is redone
                ok = False
            if ok:
                self.rows_done = int(progress["rows_done"])
                return
        with self._disk():
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.group = zarr.open_group(store=str(self.tmp), mode="w", zarr_format=3)
            rows = max(1, min(self.chunk_rows, self.n)) if self.n else 1
            self.group.create_array("features", shape=(self.n, self.d), chunks=(rows, self.d),
                                    dtype="float16", fill_value=0)
            self.group.create_array("coords", shape=(self.n, 2), chunks=(max(rows, 1), 2),
                                    dtype="int32", fill_value=0)
            self._write_progress()

    def _disk(self):
        """ENOSPC/EDQUOT while writing this bag -> DiskFullError naming the disk and the slide."""
        return disk_full_as_error(self.tmp, slide_id=self.path.name[:-5] if self.path.name.endswith(".zarr")
                                  else self.path.name)

    @property
    def resumed(self) -> bool:
        return self.rows_done > 0

    def _read_progress(self) -> dict | None:
        return read_json_or_none(self.tmp / "progress.json")[0]

    def _write_progress(self) -> None:
        write_json_atomic(self.tmp / "progress.json", {
            "fingerprint": self.fingerprint, "n_patches": self.n, "feature_dim": self.d,
            "chunk_rows": self.chunk_rows, "rows_done": self.rows_done,
        })

    def write(self, start: int, features: np.ndarray, coords: np.ndarray) -> None:
        """Write rows ``[start, start+len)``; ``start`` must equal ``rows_done`` (append-only)."""
        features = np.asarray(features)
        coords = np.asarray(coords)
        if start != self.rows_done:
            raise BagError(f"{self.path}: rows must be written in order (expected {self.rows_done}, got {start})")
        k = features.shape[0]
        if features.shape != (k, self.d) or coords.shape != (k, 2):
            raise BagError(f"{self.path}: bad block shapes {features.shape} / {coords.shape}")
        if not np.isfinite(features).all():
            raise BagError(f"{self.path}: non-finite features in rows {start}..{start + k}")
        with self._disk():
            self.group["features"][start:start + k] = features.astype(np.float16)
            self.group["coords"][start:start + k] = coords.astype(np.int32)
            self.rows_done += k
            # Record progress only at chunk boundaries (or the end): those rows are fully on disk.
            if self.rows_done % self.chunk_rows == 0 or self.rows_done == self.n:
                self._write_progress()

    def finalize(self, attrs: dict[str, Any]) -> Path:
        if self.rows_done != self.n:
            raise BagError(f"{self.path}: finalize with {self.rows_done}/{self.n} rows written")
        attrs = dict(attrs)
        attrs.update(n_patches=self.n, feature_dim=self.d, schema_version=SCHEMA_VERSION)
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise BagError(f"{self.path}: missing bag attributes {missing}")
        with self._disk():
            self.group.attrs.update(json.loads(json.dumps(attrs, default=str)))
            (self.tmp / "progress.json").unlink(missing_ok=True)
            replace_into(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Remove the partial bag (its rows cannot be trusted, e.g. the slide changed while being read)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_bag(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray,
              attrs: dict[str, Any], chunk_rows: int = 1024) -> Path:
    """Write a whole bag at once (atomic)."""
    features = np.asarray(features)
    w = BagWriter(path, features.shape[0], features.shape[1], fingerprint="write_bag", chunk_rows=chunk_rows)
    w.write(0, features, coords) if features.shape[0] else None
    return w.finalize(attrs)


def open_bag(path: str | os.PathLike) -> Bag:
    """Open a bag lazily (zarr arrays); validates the schema."""
    path = Path(path)
    if not path.is_dir():
        raise BagError(f"{path}: no such bag")
    zarr = _zarr()
    try:
        g = zarr.open_group(store=str(path), mode="r")
        attrs = dict(g.attrs)
        feats, coords = g["features"], g["coords"]
    except Exception as exc:  # noqa: BLE001 - any zarr failure means an unreadable bag
        raise BagError(f"{path}: not a readable Zarr v3 bag ({exc})") from exc
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise BagError(f"{path}: missing bag attributes {missing}")
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise BagError(f"{path}: schema_version {attrs['schema_version']} (this pipeline reads {SCHEMA_VERSION})")
    n, d = int(attrs["n_patches"]), int(attrs["feature_dim"])
    if tuple(feats.shape) != (n, d) or tuple(coords.shape) != (n, 2):
        raise BagError(f"{path}: array shapes {feats.shape}/{coords.shape} disagree with attributes n={n}, d={d}")
    return Bag(slide_id=str(attrs["slide_id"]), features=feats, coords=coords, attrs=attrs, path=path)


def read_bag(path: str | os.PathLike) -> Bag:
    """Read a bag fully into memory (features float16 (N, D), coords int32 (N, 2))."""
    bag = open_bag(path)
    return Bag(slide_id=bag.slide_id, features=np.asarray(bag.features[:], dtype=np.float16),
               coords=np.asarray(bag.coords[:], dtype=np.int32), attrs=bag.attrs, path=bag.path)


def list_bags(features_dir: str | os.PathLike) -> list[Path]:
    """Finished bags in a folder (hidden partial directories are ignored), sorted by slide id."""
    d = Path(features_dir)
    if not d.is_dir():
        raise BagError(f"{d}: no such bag folder")
    return sorted(p for p in d.iterdir() if p.is_dir() and p.suffix == ".zarr" and not p.name.startswith("."))


def iter_bags(features_dir: str | os.PathLike) -> Iterator[Bag]:
    for p in list_bags(features_dir):
        yield read_bag(p)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.store import|export``: CLAM / TRIDENT / STAMP ``.h5`` <-> bags (:mod:`pipeline.h5io`)."""
    from .h5io import main as h5_main

    return h5_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
