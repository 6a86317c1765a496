"""Cohort view: every bag of one feature folder (one ``model_tag``) as one lazy dask array.

``cohort_view(source)`` opens the bags (attributes only; a bag's arrays are read chunk by chunk when a
computation needs them) and returns a :class:`CohortView` that unpacks as
``features, slide_index, slide_ids = cohort_view(...)``:

* ``features``: dask array ``(Σ N_i, D)`` float16, the bags' ``features`` concatenated in slide order;
* ``slide_index``: dask array ``(Σ N_i,)`` int32, row -> position of its slide in ``slide_ids``;
* ``slide_ids``: the slide ids, sorted (bags with no patches are listed but contribute no rows).

``view.coords`` is the matching ``(Σ N_i, 2)`` int32 dask array, ``view.select(ids)`` a sub-view. Bags
whose feature settings differ (``model``, ``weights``, ``target_mpp``, ``patch_size_px``, ``feature_dim``)
are refused, naming them, as in training.

Two consumers, both out of core (dask evaluates chunk by chunk, so memory holds a few chunks, never the
cohort): :func:`feature_stats` (per-dimension mean and standard deviation over a set of slides, used for
the training-fold feature standardisation) and :func:`export_table` (one cohort feature table, Zarr or
CSV, written chunk by chunk).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..store import Bag, BagError
from . import MILError
from .data import check_compatible, open_bags

__all__ = ["CohortView", "cohort_view", "feature_stats", "safe_std", "export_table"]


def _da():
    import dask.array as da

    return da


def _lazy(arr) -> Any:
    """A zarr array as a dask array with the zarr chunking (read lazily, chunk by chunk)."""
    da = _da()
    chunks = tuple(max(1, int(c)) for c in arr.chunks)
    return da.from_array(arr, chunks=chunks, lock=False, asarray=True, name=False)


@dataclass
class CohortView:
    """Lazy view over the bags of a cohort (see the module docstring)."""

    bags: list[Bag]  # opened lazily (zarr arrays)
    feature_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def slide_ids(self) -> list[str]:
        return [b.slide_id for b in self.bags]

    @property
    def paths(self) -> list[Path]:
        return [Path(b.path) for b in self.bags]

    @property
    def n_rows(self) -> np.ndarray:
        return np.array([b.n for b in self.bags], dtype=np.int64)

    @property
    def dim(self) -> int:
        return int(self.feature_attrs.get("feature_dim") or (self.bags[0].features.shape[1] if self.bags else 0))

    def _parts(self, attr: str, width: int, dtype) -> Any:
        da = _da()
        parts = [_lazy(getattr(b, attr)) for b in self.bags if b.n > 0]
        if not parts:
            return da.zeros((0, width), dtype=dtype, chunks=(1, width))
        return da.concatenate(parts, axis=0)

    @property
    def features(self) -> Any:
        return self._parts("features", self.dim, np.float16)

    @property
    def coords(self) -> Any:
        return self._parts("coords", 2, np.int32)

    @property
    def slide_index(self) -> Any:
        da = _da()
        parts = [da.full((b.n,), i, dtype=np.int32, chunks=(_lazy(b.features).chunks[0],))
                 for i, b in enumerate(self.bags) if b.n > 0]
        if not parts:
            return da.zeros((0,), dtype=np.int32, chunks=(1,))
        return da.concatenate(parts, axis=0)

    def __iter__(self) -> Iterator[Any]:
        yield self.features
        yield self.slide_index
        yield self.slide_ids

    def __len__(self) -> int:
        return 3  # unpacks as (features, slide_index, slide_ids)

    def select(self, slide_ids: Iterable[str]) -> "CohortView":
        """The sub-view of ``slide_ids`` (unknown ids are an error), in this view's order."""
        want = set(slide_ids)
        have = set(self.slide_ids)
        unknown = sorted(want - have)
        if unknown:
            raise MILError(f"slide(s) not in the cohort view: {', '.join(unknown[:10])}")
        return CohortView([b for b in self.bags if b.slide_id in want], self.feature_attrs)


def cohort_view(source: str | os.PathLike | Iterable[str | os.PathLike]) -> CohortView:
    """Open every bag of a feature folder (or of a list of bag paths / folders) as one lazy view."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    bags = open_bags(source)  # duplicate slide ids refused; failed-slide bags left out, named
    if not bags:
        raise BagError(f"no bags found in {', '.join(str(s) for s in source)}")
    ordered = [bags[s] for s in sorted(bags)]
    fa = check_compatible([(str(b.path), b.attrs) for b in ordered])
    return CohortView(ordered, fa)


def safe_std(std: np.ndarray, min_std: float = 1e-6, rel: float = 1e-2) -> np.ndarray:
    """Standard deviations for standardisation: dimensions that are (nearly) constant, with a standard
    deviation below ``min_std`` or below ``rel`` times the median one, get 1 so that standardising only
    centres them (dividing float16 rounding noise by a tiny deviation would blow it up)."""
    std = np.asarray(std, dtype=np.float64).copy()
    med = float(np.median(std)) if std.size else 0.0
    std[std < max(min_std, rel * med)] = 1.0
    return std


def feature_stats(view: CohortView, slide_ids: Iterable[str] | None = None,
                  min_std: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation ``(D,)`` float32 over the rows of ``slide_ids`` (all slides
    if None), computed out of core with dask (float64 accumulation, one pass per chunk). (Nearly) constant
    dimensions get a standard deviation of 1 (:func:`safe_std`)."""
    import dask

    sub = view if slide_ids is None else view.select(slide_ids)
    x = sub.features
    if x.shape[0] == 0:
        raise MILError("feature statistics need at least one patch; the selected bags are all empty")
    x64 = x.astype(np.float64)
    mean, sq = dask.compute(x64.mean(axis=0), (x64 ** 2).mean(axis=0), scheduler="threads")
    var = np.maximum(sq - mean ** 2, 0.0)
    std = safe_std(np.sqrt(var), min_std)
    return mean.astype(np.float32), std.astype(np.float32)


def _rows(view: CohortView, chunk_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    """(slide position, features block, coords block, start row in the table), bag by bag, chunk by chunk."""
    start = 0
    for i, b in enumerate(view.bags):
        for s in range(0, b.n, chunk_rows):
            e = min(b.n, s + chunk_rows)
            yield i, np.asarray(b.features[s:e]), np.asarray(b.coords[s:e]), start + s
        start += b.n


def export_table(source: str | os.PathLike | Iterable[str | os.PathLike] | CohortView, out: str | os.PathLike,
                 chunk_rows: int = 4096) -> dict[str, Any]:
    """Write the cohort's features as one table, chunk by chunk (never the whole cohort in memory).

    ``out`` ending in ``.zarr``: a Zarr v3 group with ``features`` ``(Σ N, D)`` float16, ``coords``
    ``(Σ N, 2)`` int32, ``slide_index`` ``(Σ N,)`` int32 and attributes ``slide_ids``, ``n_patches`` (per
    slide), ``feature_attrs``. Otherwise a CSV ``slide_id,x,y,f0..f{D-1}``. Written under a temporary name
    and moved into place when complete. Returns a summary (rows, slides, dim, path).
    """
    from ..files import atomic_path

    view = source if isinstance(source, CohortView) else cohort_view(source)
    out = Path(out)
    chunk_rows = max(1, int(chunk_rows))
    total, d = int(view.n_rows.sum()), view.dim
    ids = view.slide_ids
    if out.suffix == ".zarr":
        import zarr

        with atomic_path(out, is_dir=True) as tmp:
            shutil.rmtree(tmp)
            g = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
            rows = max(1, min(chunk_rows, total))
            f = g.create_array("features", shape=(total, d), chunks=(rows, d), dtype="float16", fill_value=0)
            c = g.create_array("coords", shape=(total, 2), chunks=(rows, 2), dtype="int32", fill_value=0)
            si = g.create_array("slide_index", shape=(total,), chunks=(rows,), dtype="int32", fill_value=0)
            for i, fb, cb, s in _rows(view, chunk_rows):
                f[s:s + len(fb)] = fb.astype(np.float16)
                c[s:s + len(cb)] = cb.astype(np.int32)
                si[s:s + len(fb)] = np.full(len(fb), i, dtype=np.int32)
            g.attrs.update(json.loads(json.dumps({
                "slide_ids": ids, "n_patches": view.n_rows.tolist(), "feature_attrs": view.feature_attrs,
                "n_rows": total}, default=str)))
    else:
        with atomic_path(out) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh, lineterminator="\n")
                w.writerow(["slide_id", "x", "y"] + [f"f{j}" for j in range(d)])
                for i, fb, cb, _ in _rows(view, chunk_rows):
                    fb32 = fb.astype(np.float32)
                    for k in range(len(fb32)):
                        w.writerow([ids[i], int(cb[k, 0]), int(cb[k, 1])] + [f"{v:.6g}" for v in fb32[k]])
    return {"path": str(out), "rows": total, "slides": len(ids), "dim": d}
