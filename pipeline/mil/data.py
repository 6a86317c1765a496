"""Labels CSV + feature bags -> an in-memory MIL dataset.

Labels CSV: columns ``slide_id,label`` and optionally ``patient_id`` (used to group slides of one patient
into the same fold), ``mpp`` and anything else (ignored). Labels may be integers or strings; the classes
are the sorted unique labels (binary when there are two: the positive class is ``classes[1]``).
"""

from __future__ import annotations

import logging
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ..store import Bag, BagError, list_bags, open_bag, read_bag
from . import MILError

log = logging.getLogger("pipeline.mil")

#: Bag attributes that must agree for bags to be mixed (and between training and inference).
# What defines a bag's feature space: bags differing in any of these must not be mixed (random-weight
# bags and bags from real weights of the same architecture differ in ``weights``).
FEATURE_ATTRS = ("model", "weights", "target_mpp", "patch_size_px", "feature_dim")


def _names(items: Sequence[Any], limit: int = 10) -> str:
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _plain(v: Any) -> Any:
    """numpy scalars -> python scalars (JSON-able, stable in CSV/JSON)."""
    return v.item() if isinstance(v, np.generic) else v


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Read a labels CSV: returns ``slide_id`` (str), ``label`` (int or str), ``patient_id`` (str, if present)."""
    path = Path(path)
    if not path.is_file():
        raise MILError(f"{path}: labels CSV not found")
    try:
        df = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str}, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MILError(f"{path}: cannot read labels CSV ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("slide_id", "label") if c not in df.columns]
    if missing:
        raise MILError(f"{path}: labels CSV lacks column(s) {missing} (has {list(df.columns)}); "
                       "expected slide_id,label[,patient_id]")
    df = df.copy()
    df["slide_id"] = df["slide_id"].astype(str).str.strip()
    bad = df["slide_id"].isna() | (df["slide_id"] == "") | (df["slide_id"] == "nan")
    if bad.any():
        raise MILError(f"{path}: empty slide_id in row(s) {_names((np.flatnonzero(bad.to_numpy()) + 2).tolist())}")
    nolabel = df["label"].isna() | (df["label"].astype(str).str.strip() == "")
    if nolabel.any():
        log.warning("%s: ignoring %d slide(s) without a label: %s", path, int(nolabel.sum()),
                    _names(df.loc[nolabel, "slide_id"].tolist()))
        df = df.loc[~nolabel].copy()
    lab = df["label"]
    if pd.api.types.is_bool_dtype(lab):
        labels = [int(v) for v in lab]
    elif pd.api.types.is_numeric_dtype(lab):
        vals = lab.to_numpy(dtype=float)
        if np.all(np.isfinite(vals)) and np.all(vals == np.round(vals)):
            labels = [int(v) for v in vals]
        else:
            raise MILError(f"{path}: labels must be integers or strings (got non-integer numbers); "
                           "regression is not supported")
    else:
        labels = [str(v).strip() for v in lab]
    df["label"] = pd.Series(labels, index=df.index, dtype=object)
    if "patient_id" in df.columns:
        pid = df["patient_id"].astype(object)
        nopid = pid.isna() | (pid.astype(str).str.strip() == "")
        if nopid.any():
            log.warning("%s: %d slide(s) without patient_id are treated as their own patient: %s", path,
                        int(nopid.sum()), _names(df.loc[nopid, "slide_id"].tolist()))
        df["patient_id"] = [s if m else str(p).strip() for p, s, m in zip(pid, df["slide_id"], nopid)]
    dup = df["slide_id"].duplicated(keep=False)
    if dup.any():
        d = df.loc[dup]
        cols = ["label"] + (["patient_id"] if "patient_id" in df.columns else [])
        conflicting = [sid for sid, g in d.groupby("slide_id", sort=True)
                       if any(g[c].astype(str).nunique() > 1 for c in cols)]
        if conflicting:
            raise MILError(f"{path}: slide(s) listed more than once with different labels: {_names(conflicting)}")
        log.warning("%s: duplicate rows for slide(s) %s (kept one)", path, _names(sorted(set(d["slide_id"]))))
        df = df.drop_duplicates("slide_id", keep="first")
    return df.reset_index(drop=True)


def class_list(labels: Iterable[Any]) -> list[Any]:
    """Sorted unique labels (ints sort numerically, strings lexicographically)."""
    return sorted({_plain(v) for v in labels})


def resolve_bag_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Each path is a single ``*.zarr`` bag or a folder of bags; returns the bag paths, in order."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.suffix == ".zarr":
            if not p.is_dir():
                raise BagError(f"{p}: no such bag")
            out.append(p)
        elif p.is_dir():
            found = list_bags(p)
            if not found:
                log.warning("%s: no finished *.zarr bags in this folder", p)
            out.extend(found)
        else:
            raise BagError(f"{p}: no such bag or bag folder")
    return out


def feature_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes that define the feature space of a bag."""
    out = {k: attrs.get(k) for k in FEATURE_ATTRS}
    out["feature_dim"] = int(out["feature_dim"])
    out["patch_size_px"] = int(out["patch_size_px"])
    out["target_mpp"] = float(out["target_mpp"])
    out["model"] = str(out["model"])
    w = out["weights"]
    out["weights"] = str(w.get("sha256") or json.dumps(w, sort_keys=True)) if isinstance(w, dict) else str(w)
    return out


def _attr_key(fa: dict[str, Any]) -> tuple:
    return tuple(round(v, 6) if isinstance(v, float) else v for v in (fa[k] for k in FEATURE_ATTRS))


def check_compatible(bags: Sequence[tuple[str, dict[str, Any]]],
                     expected: dict[str, Any] | None = None, expected_from: str = "") -> dict[str, Any]:
    """Check that bags ``(name, attrs)`` share ``FEATURE_ATTRS`` (and match ``expected`` if given).

    Returns the common feature attributes; raises ``MILError`` naming the offending bags otherwise.
    """
    if not bags:
        raise MILError("no bags to check")
    fas = [(name, feature_attrs(attrs)) for name, attrs in bags]
    if expected is not None:
        ref = feature_attrs(expected)
        bad = [(n, fa) for n, fa in fas if _attr_key(fa) != _attr_key(ref)]
        if bad:
            lines = []
            for n, fa in bad[:10]:
                diff = ", ".join(f"{k}={fa[k]!r} (expected {ref[k]!r})" for k in FEATURE_ATTRS
                                 if _attr_key({**ref, k: fa[k]}) != _attr_key(ref))
                lines.append(f"{n}: {diff}")
            more = f"; ... ({len(bad) - 10} more)" if len(bad) > 10 else ""
            raise MILError(f"bag(s) incompatible with {expected_from or 'the trained model'}: "
                           + "; ".join(lines) + more)
        return ref
    groups: dict[tuple, list[str]] = {}
    for n, fa in fas:
        groups.setdefault(_attr_key(fa), []).append(n)
    if len(groups) > 1:
        # The largest group is taken as the reference; every other bag is named.
        ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
        ref_key, ref_names = ordered[0]
        ref = dict(zip(FEATURE_ATTRS, ref_key))
        parts = []
        for key, names in ordered[1:]:
            fa = dict(zip(FEATURE_ATTRS, key))
            diff = ", ".join(f"{k}={fa[k]!r}" for k in FEATURE_ATTRS if fa[k] != ref[k])
            parts.append(f"{_names(names)} have {diff}")
        refdesc = ", ".join(f"{k}={ref[k]!r}" for k in FEATURE_ATTRS)
        raise MILError(f"refusing to mix bags with different feature settings: {len(ref_names)} bag(s) have "
                       f"{refdesc}, but " + "; ".join(parts))
    return fas[0][1]


@dataclass
class MILDataset:
    """Bags held in memory (features float16), one per labelled slide, sorted by slide id."""

    slide_ids: list[str]
    features: list[np.ndarray]  # (N_i, D) float16
    coords: list[np.ndarray]  # (N_i, 2) int32
    labels: list[Any]  # original labels
    y: np.ndarray  # (n,) int64 class indices into ``classes``
    classes: list[Any]
    feature_attrs: dict[str, Any]
    groups: np.ndarray | None = None  # (n,) patient ids, when the labels CSV has them
    paths: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def in_dim(self) -> int:
        return int(self.feature_attrs["feature_dim"])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def n_instances(self, i: int) -> int:
        return int(self.features[i].shape[0])

    def tensor(self, i: int, device: Any = None):
        """Features of bag ``i`` as a float32 tensor ``(N, D)``."""
        import torch

        return torch.from_numpy(self.features[i].astype(np.float32)).to(device)


def open_bags(paths: Iterable[str | os.PathLike]) -> dict[str, Bag]:
    """Open the bags lazily (attributes only), keyed by slide id; duplicate slide ids are an error."""
    out: dict[str, Bag] = {}
    for p in resolve_bag_paths(paths):
        bag = open_bag(p)
        if bag.slide_id in out:
            raise MILError(f"slide {bag.slide_id!r} has two bags: {out[bag.slide_id].path} and {p}")
        out[bag.slide_id] = bag
    return out


def load_dataset(bag_paths: Iterable[str | os.PathLike], labels_csv: str | os.PathLike) -> MILDataset:
    """Labelled bags: the intersection of the labels CSV and the bags (others are named in a warning)."""
    labels = read_labels(labels_csv)
    bags = open_bags(bag_paths)
    if not bags:
        raise MILError(f"no bags found in {', '.join(str(p) for p in bag_paths)}")
    labelled = set(labels["slide_id"])
    no_bag = [s for s in labels["slide_id"] if s not in bags]
    no_label = sorted(s for s in bags if s not in labelled)
    if no_bag:
        log.warning("%d slide(s) in %s have no bag (skipped): %s", len(no_bag), labels_csv, _names(no_bag))
    if no_label:
        log.warning("%d bag(s) have no label in %s (skipped): %s", len(no_label), labels_csv, _names(no_label))
    rows = labels[labels["slide_id"].isin(bags)].sort_values("slide_id", kind="stable").reset_index(drop=True)
    if len(rows) < 2:
        raise MILError(f"{labels_csv}: only {len(rows)} slide(s) have both a label and a bag; need at least 2")
    classes = class_list(rows["label"])
    if len(classes) < 2:
        raise MILError(f"{labels_csv}: all {len(rows)} usable slides have the same label {classes[0]!r}; "
                       "need at least 2 classes")
    used = [bags[s] for s in rows["slide_id"]]
    fa = check_compatible([(str(b.path), b.attrs) for b in used])
    feats, coords = [], []
    for b in used:
        full = read_bag(b.path)
        feats.append(full.features)
        coords.append(full.coords)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[_plain(v)] for v in rows["label"]], dtype=np.int64)
    groups = rows["patient_id"].astype(str).to_numpy() if "patient_id" in rows.columns else None
    return MILDataset(slide_ids=rows["slide_id"].tolist(), features=feats, coords=coords,
                      labels=[_plain(v) for v in rows["label"]], y=y, classes=classes, feature_attrs=fa,
                      groups=groups, paths=[Path(b.path) for b in used])
