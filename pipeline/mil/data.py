"""Labels CSV + feature bags -> an in-memory MIL dataset.

Labels CSV: ``slide_id`` plus the target columns of the task, optionally ``patient_id`` (used to group slides
of one patient into the same fold), ``split`` (``train``/``test``; a fixed split instead of k-fold CV),
``mpp`` and anything else (ignored). The task is decided by the CSV unless given explicitly:

* ``time`` and ``event`` columns -> survival (``event`` 1/0, true/false; ``time`` > 0);
* a ``label`` column of non-integer numbers -> regression;
* otherwise ``label`` (integers or strings) -> classification; the classes are the sorted unique labels
  (binary when there are two: the positive class is ``classes[1]``).
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


def _detect_task(df: pd.DataFrame, path: Path) -> str:
    if "time" in df.columns and "event" in df.columns:
        return "survival"
    if "label" in df.columns:
        lab = df["label"].dropna()
        if pd.api.types.is_numeric_dtype(lab) and not pd.api.types.is_bool_dtype(lab):
            vals = lab.to_numpy(dtype=float)
            if len(vals) and not np.all(vals == np.round(vals)):
                return "regression"
        return "classification"
    raise MILError(f"{path}: labels CSV lacks a label column (has {list(df.columns)}); expected "
                   "slide_id,label[,patient_id] or slide_id,time,event[,patient_id]")


def _drop_missing(df: pd.DataFrame, cols: Sequence[str], path: Path) -> pd.DataFrame:
    missing = np.zeros(len(df), dtype=bool)
    for c in cols:
        missing |= (df[c].isna() | (df[c].astype(str).str.strip() == "")).to_numpy()
    if missing.any():
        log.warning("%s: ignoring %d slide(s) without %s: %s", path, int(missing.sum()), "/".join(cols),
                    _names(df.loc[missing, "slide_id"].tolist()))
        df = df.loc[~missing].copy()
    return df


def _numbers(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    vals = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(vals)
    if bad.any():
        raise MILError(f"{path}: column {col!r} must be numeric; bad value(s) for slide(s) "
                       f"{_names(df.loc[bad, 'slide_id'].tolist())}")
    return vals


def read_labels(path: str | os.PathLike, task: str | None = None) -> pd.DataFrame:
    """Read a labels CSV.

    Returns ``slide_id`` (str), the targets (``label``: int or str for classification, float for
    regression; ``time`` float and ``event`` int for survival), ``patient_id`` (str, if present) and
    ``split`` (if present); ``df.attrs["task"]`` holds the task (``task`` if given, else detected).
    """
    path = Path(path)
    if not path.is_file():
        raise MILError(f"{path}: labels CSV not found")
    try:
        df = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str}, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MILError(f"{path}: cannot read labels CSV ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if "slide_id" not in df.columns:
        raise MILError(f"{path}: labels CSV lacks column(s) ['slide_id'] (has {list(df.columns)}); "
                       "expected slide_id,label[,patient_id]")
    if task in (None, "auto"):
        task = _detect_task(df, path)
    needed = {"classification": ["label"], "regression": ["label"], "survival": ["time", "event"]}.get(task)
    if needed is None:
        raise MILError(f"unknown task {task!r} (known: classification, survival, regression)")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise MILError(f"{path}: labels CSV lacks column(s) {missing} (has {list(df.columns)}); "
                       f"a {task} task needs slide_id,{','.join(needed)}[,patient_id]")
    df = df.copy()
    df["slide_id"] = df["slide_id"].astype(str).str.strip()
    bad = df["slide_id"].isna() | (df["slide_id"] == "") | (df["slide_id"] == "nan")
    if bad.any():
        raise MILError(f"{path}: empty slide_id in row(s) {_names((np.flatnonzero(bad.to_numpy()) + 2).tolist())}")
    df = _drop_missing(df, needed, path)
    if task == "classification":
        lab = df["label"]
        if pd.api.types.is_bool_dtype(lab):
            labels = [int(v) for v in lab]
        elif pd.api.types.is_numeric_dtype(lab):
            vals = lab.to_numpy(dtype=float)
            if np.all(np.isfinite(vals)) and np.all(vals == np.round(vals)):
                labels = [int(v) for v in vals]
            else:
                raise MILError(f"{path}: classification labels must be integers or strings (got non-integer "
                               "numbers; use --task regression for a numeric target)")
        else:
            labels = [str(v).strip() for v in lab]
        df["label"] = pd.Series(labels, index=df.index, dtype=object)
        target_cols = ["label"]
    elif task == "regression":
        df["label"] = _numbers(df, "label", path)
        target_cols = ["label"]
    else:
        df["time"] = _numbers(df, "time", path)
        ev = df["event"]
        if pd.api.types.is_bool_dtype(ev):
            events = ev.astype(int).to_numpy()
        else:
            text = ev.astype(str).str.strip().str.lower()
            mapping = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}
            badev = ~text.isin(list(mapping))
            if badev.any():
                raise MILError(f"{path}: column 'event' must be 1/0 (or true/false); bad value(s) for slide(s) "
                               f"{_names(df.loc[badev, 'slide_id'].tolist())}")
            events = text.map(mapping).to_numpy(dtype=np.int64)
        df["event"] = events.astype(np.int64)
        if (df["time"] < 0).any():
            raise MILError(f"{path}: negative survival time for slide(s) "
                           f"{_names(df.loc[df['time'] < 0, 'slide_id'].tolist())}")
        target_cols = ["time", "event"]
    if "patient_id" in df.columns:
        pid = df["patient_id"].astype(object)
        nopid = pid.isna() | (pid.astype(str).str.strip() == "")
        if nopid.any():
            log.warning("%s: %d slide(s) without patient_id are treated as their own patient: %s", path,
                        int(nopid.sum()), _names(df.loc[nopid, "slide_id"].tolist()))
        df["patient_id"] = [s if m else str(p).strip() for p, s, m in zip(pid, df["slide_id"], nopid)]
    if "split" in df.columns:
        sp = df["split"].astype(str).str.strip().str.lower()
        sp = sp.replace({"val": "train", "validation": "train", "training": "train", "testing": "test"})
        badsp = ~sp.isin(["train", "test"])
        if badsp.any():
            raise MILError(f"{path}: column 'split' must be train or test; bad value(s) for slide(s) "
                           f"{_names(df.loc[badsp, 'slide_id'].tolist())}")
        df["split"] = sp
    dup = df["slide_id"].duplicated(keep=False)
    if dup.any():
        d = df.loc[dup]
        cols = target_cols + [c for c in ("patient_id", "split") if c in df.columns]
        conflicting = [sid for sid, g in d.groupby("slide_id", sort=True)
                       if any(g[c].astype(str).nunique() > 1 for c in cols)]
        if conflicting:
            raise MILError(f"{path}: slide(s) listed more than once with different labels: {_names(conflicting)}")
        log.warning("%s: duplicate rows for slide(s) %s (kept one)", path, _names(sorted(set(d["slide_id"]))))
        df = df.drop_duplicates("slide_id", keep="first")
    df = df.reset_index(drop=True)
    df.attrs["task"] = task
    return df


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
    """The attributes that define the feature space of a bag (``None`` where an imported bag's source
    did not say, see :func:`unknown_attrs`)."""
    out = {k: attrs.get(k) for k in FEATURE_ATTRS}
    out["feature_dim"] = int(out["feature_dim"])
    if out["patch_size_px"] is not None:
        out["patch_size_px"] = int(out["patch_size_px"])
    if out["target_mpp"] is not None:
        out["target_mpp"] = float(out["target_mpp"])
    if out["model"] is not None:
        out["model"] = str(out["model"])
    w = out["weights"]
    if w is not None:
        out["weights"] = str(w.get("sha256") or json.dumps(w, sort_keys=True)) if isinstance(w, dict) else str(w)
    return out


def unknown_attrs(attrs: dict[str, Any]) -> list[str]:
    """Feature-space attributes a bag does not know (imported bags whose source file did not say them)."""
    return [k for k in FEATURE_ATTRS if attrs.get(k) is None]


def _batch(attrs: dict[str, Any]) -> str | None:
    """Bags imported together (one ``python -m pipeline.store import`` of one folder) share a batch."""
    imp = attrs.get("imported")
    return str(imp.get("batch")) if isinstance(imp, dict) and imp.get("batch") else None


def _attr_key(fa: dict[str, Any]) -> tuple:
    return tuple(round(v, 6) if isinstance(v, float) else v for v in (fa[k] for k in FEATURE_ATTRS))


def _check_unknown(bags: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Refuse bags whose encoder (or another feature attribute) is unknown next to bags they cannot be
    checked against: bags of another import, or of this pipeline."""
    unknown = [(n, unknown_attrs(a), _batch(a)) for n, a in bags if unknown_attrs(a)]
    if not unknown:
        return
    batches = {b for _, _, b in unknown}
    known = [n for n, a in bags if not unknown_attrs(a)]
    mixed_batches = len(batches) > 1 or None in batches
    if not known and not mixed_batches:
        return  # all from one import: the source tool used one encoder for them
    fields = sorted({f for _, u, _ in unknown for f in u})
    what = (f"{len(known)} bag(s) with known settings (e.g. {_names(known, 3)})" if known else
            "bags of another import")
    raise MILError(f"refusing to mix {len(unknown)} imported bag(s) whose {', '.join(fields)} is unknown "
                   f"(e.g. {_names([n for n, _, _ in unknown], 3)}) with {what}: their features may come from "
                   "another encoder or resolution. Import them with --encoder/--target-mpp if you know these, "
                   "or pass allow_unknown_encoder=True (--allow-unknown-encoder) to mix them anyway")


def _wildcard_compatible(fas: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Known values must agree; unknown (None) ones match anything. Returns the merged attributes."""
    merged: dict[str, Any] = {}
    for k in FEATURE_ATTRS:
        vals: dict[Any, list[str]] = {}
        for n, fa in fas:
            if fa[k] is not None:
                vals.setdefault(round(fa[k], 6) if isinstance(fa[k], float) else fa[k], []).append(n)
        if len(vals) > 1:
            parts = "; ".join(f"{_names(ns, 3)} have {k}={v!r}" for v, ns in vals.items())
            raise MILError(f"refusing to mix bags with different {k}: {parts}")
        merged[k] = next(iter(vals), None)
    return merged


def check_compatible(bags: Sequence[tuple[str, dict[str, Any]]],
                     expected: dict[str, Any] | None = None, expected_from: str = "",
                     allow_unknown_encoder: bool = False) -> dict[str, Any]:
    """Check that bags ``(name, attrs)`` share ``FEATURE_ATTRS`` (and match ``expected`` if given).

    Imported bags may not know their encoder (or resolution): they are refused next to bags they cannot be
    checked against (bags of another import or of this pipeline) unless ``allow_unknown_encoder``, in which
    case unknown values match anything and known ones must agree. Against ``expected`` (a trained model's
    attributes) an unknown value matches only an unknown one (unless ``allow_unknown_encoder``).

    Returns the common feature attributes; raises ``MILError`` naming the offending bags otherwise.
    """
    if not bags:
        raise MILError("no bags to check")
    fas = [(name, feature_attrs(attrs)) for name, attrs in bags]
    if allow_unknown_encoder:
        if expected is not None:
            ref = feature_attrs(expected)
            fas = fas + [(expected_from or "the trained model", ref)]
        return _wildcard_compatible(fas)
    if expected is not None:
        ref = feature_attrs(expected)  # unknown (None) values match only unknown ones
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
    _check_unknown(bags)
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
    """Bags held in memory (features float16), one per labelled slide, sorted by slide id.

    ``y`` is what CV stratifies on: the class index (classification), the event indicator (survival) or
    the target's quartile (regression).
    """

    slide_ids: list[str]
    features: list[np.ndarray]  # (N_i, D) float16
    coords: list[np.ndarray]  # (N_i, 2) int32
    labels: list[Any]  # original labels (classification, regression) or event (survival)
    y: np.ndarray  # (n,) int64 class indices into ``classes`` / strata
    classes: list[Any]
    feature_attrs: dict[str, Any]
    groups: np.ndarray | None = None  # (n,) patient ids, when the labels CSV has them
    paths: list[Path] = field(default_factory=list)
    task: str = "classification"
    target: np.ndarray | None = None  # (n,) float: regression target
    time: np.ndarray | None = None  # (n,) float: survival time
    event: np.ndarray | None = None  # (n,) int: survival event (1 observed, 0 censored)
    split: np.ndarray | None = None  # (n,) "train"/"test" when the labels CSV has a split column

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
    """Open the bags lazily (attributes only), keyed by slide id; duplicate slide ids are an error.

    Bags marked ``status: failed`` (written for broken slides under ``on_slide_error: skip``) are left
    out, each named with the stage and reason it failed."""
    out: dict[str, Bag] = {}
    left_out = []
    for p in resolve_bag_paths(paths):
        bag = open_bag(p)
        if bag.attrs.get("status") == "failed":
            left_out.append(f"{bag.slide_id} ({bag.attrs.get('stage', '?')}: {bag.attrs.get('error', '?')})")
            continue
        if bag.slide_id in out:
            raise MILError(f"slide {bag.slide_id!r} has two bags: {out[bag.slide_id].path} and {p}")
        out[bag.slide_id] = bag
    if left_out:
        log.warning("left out %d failed slide(s): %s", len(left_out), "; ".join(left_out))
    return out


def regression_strata(target: np.ndarray, max_bins: int = 4) -> np.ndarray:
    """Quantile bins of a continuous target, for stratified splits (fewer bins for few bags)."""
    t = np.asarray(target, dtype=np.float64)
    k = int(max(1, min(max_bins, len(t) // 4)))
    if k < 2:
        return np.zeros(len(t), dtype=np.int64)
    edges = np.quantile(t, np.arange(1, k) / k)
    return np.searchsorted(edges, t, side="right").astype(np.int64)


def load_dataset(bag_paths: Iterable[str | os.PathLike], labels_csv: str | os.PathLike,
                 task: str | None = None, allow_unknown_encoder: bool = False) -> MILDataset:
    """Labelled bags: the intersection of the labels CSV and the bags (others are named in a warning).
    ``allow_unknown_encoder``: see :func:`check_compatible`."""
    labels = read_labels(labels_csv, task)
    task = labels.attrs["task"]
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
    extra: dict[str, Any] = {"task": task}
    if task == "classification":
        classes = class_list(rows["label"])
        if len(classes) < 2:
            raise MILError(f"{labels_csv}: all {len(rows)} usable slides have the same label {classes[0]!r}; "
                           "need at least 2 classes")
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[_plain(v)] for v in rows["label"]], dtype=np.int64)
        labels_out = [_plain(v) for v in rows["label"]]
    elif task == "regression":
        classes = []
        target = rows["label"].to_numpy(dtype=np.float64)
        if np.all(target == target[0]):
            raise MILError(f"{labels_csv}: all {len(rows)} usable slides have the same target {target[0]!r}")
        extra["target"] = target
        y = regression_strata(target)
        labels_out = [float(v) for v in target]
    else:
        classes = []
        extra["time"] = rows["time"].to_numpy(dtype=np.float64)
        extra["event"] = rows["event"].to_numpy(dtype=np.int64)
        if extra["event"].sum() == 0:
            raise MILError(f"{labels_csv}: no usable slide has an observed event (event = 1); "
                           "survival models cannot be trained")
        y = extra["event"].copy()
        labels_out = [int(v) for v in extra["event"]]
    if "split" in rows.columns:
        extra["split"] = rows["split"].astype(str).to_numpy()
    used = [bags[s] for s in rows["slide_id"]]
    fa = check_compatible([(str(b.path), b.attrs) for b in used], allow_unknown_encoder=allow_unknown_encoder)
    feats, coords = [], []
    for b in used:
        full = read_bag(b.path)
        feats.append(full.features)
        coords.append(full.coords)
    groups = rows["patient_id"].astype(str).to_numpy() if "patient_id" in rows.columns else None
    return MILDataset(slide_ids=rows["slide_id"].tolist(), features=feats, coords=coords,
                      labels=labels_out, y=y, classes=classes, feature_attrs=fa,
                      groups=groups, paths=[Path(b.path) for b in used], **extra)
