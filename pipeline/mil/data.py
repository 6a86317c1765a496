"""Labels CSV + feature bags -> an in-memory MIL dataset.

Labels CSV: ``slide_id`` plus the target columns of the task, optionally ``patient_id`` (used to group slides
of one patient into the same fold), ``split`` (``train``/``val``/``test``: a fixed split instead of k-fold
CV; ``val`` rows select the checkpoint and stop training early, without them a validation part is held out of
the ``train`` rows), ``mpp`` and anything else (ignored). Slide and patient ids are NFC-normalised (as slide
file names are); a slide listed twice, an empty or NaN target and a label column mixing types are errors
naming the line. The task is decided by the CSV unless given explicitly:

* ``time`` and ``event`` columns -> survival (``event`` 1/0, true/false; ``time`` >= 0);
* a ``label`` column of non-integer numbers -> regression;
* otherwise ``label`` (integers, true/false or text) -> classification; the classes are the sorted unique
  labels (binary when there are two: the positive class is ``classes[1]``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import unicodedata
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


#: Cell values read as "missing" (pandas' defaults): a label, time or event like this is an error.
_MISSING = {"", "nan", "na", "n/a", "null", "none", "#n/a", "<na>", "-nan", "nan"}
_INT_RE = re.compile(r"^[+-]?\d+(\.0*)?$")
_BOOL = {"true": 1, "false": 0}


def _is_missing(v: str) -> bool:
    return v.strip().lower() in _MISSING


def _as_float(v: str) -> float | None:
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def _kind(v: str) -> str:
    """``int`` (also ``1.0``), ``float``, ``bool`` (true/false) or ``text``."""
    t = v.strip()
    if _INT_RE.match(t):
        return "int"
    if t.lower() in _BOOL:
        return "bool"
    return "float" if _as_float(t) is not None else "text"


def _where(path: Path, line: int, sid: str) -> str:
    return f"{path}: line {line} (slide_id {sid!r})"


def _detect_task(cols: Sequence[str], rows: list[dict[str, str]], path: Path) -> str:
    if "time" in cols and "event" in cols:
        return "survival"
    if "label" in cols:
        kinds = {_kind(r["label"]) for r in rows if not _is_missing(r["label"])}
        if kinds == {"float"} or kinds == {"int", "float"}:
            return "regression"
        return "classification"
    raise MILError(f"{path}: labels CSV lacks a label column (has {list(cols)}); expected "
                   "slide_id,label[,patient_id] or slide_id,time,event[,patient_id]")


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows (each with its 1-based file ``_line``) of a CSV, cells stripped, ids NFC-normalised."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            try:
                header = [str(c).strip() for c in next(reader)]
            except StopIteration:
                raise MILError(f"{path}: cannot read labels CSV (the file is empty)") from None
            rows = []
            for rec in reader:
                if not rec or all(not c.strip() for c in rec):
                    continue  # blank line
                if len(rec) > len(header):
                    raise MILError(f"{path}: line {reader.line_num} has {len(rec)} fields, the header "
                                   f"{len(header)}")
                row = {h: (rec[j].strip() if j < len(rec) else "") for j, h in enumerate(header)}
                row["_line"] = reader.line_num
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise MILError(f"{path}: cannot read labels CSV ({exc})") from None
    except csv.Error as exc:
        raise MILError(f"{path}: cannot read labels CSV ({exc})") from None
    for r in rows:
        for c in ("slide_id", "patient_id"):
            if c in r:
                r[c] = unicodedata.normalize("NFC", r[c])
    return header, rows


def _classification_labels(rows: list[dict[str, str]], path: Path) -> list[Any]:
    kinds = [_kind(r["label"]) for r in rows]
    present = set(kinds)
    if present == {"int"}:
        return [int(float(r["label"])) for r in rows]
    if present == {"bool"}:
        return [_BOOL[r["label"].lower()] for r in rows]
    if present <= {"int", "float"}:
        r = rows[kinds.index("float")]
        raise MILError(f"{_where(path, r['_line'], r['slide_id'])}: label {r['label']!r} is not an integer; "
                       "classification labels must be integers or text (use --task regression for a numeric "
                       "target)")
    if present == {"text"}:
        return [r["label"] for r in rows]
    # Mixed: name the first row of the rarer kind (most likely the typo).
    counts = {k: kinds.count(k) for k in present}
    rare = min(counts, key=lambda k: (counts[k], k))
    major = max(counts, key=lambda k: (counts[k], k))
    r = rows[kinds.index(rare)]
    names = {"int": "an integer", "float": "a number", "bool": "true/false", "text": "text"}
    raise MILError(f"{_where(path, r['_line'], r['slide_id'])}: label {r['label']!r} is {names[rare]} while "
                   f"{counts[major]} other label(s) are {names[major]}; a label column must hold one type "
                   f"(kinds found: {', '.join(f'{names[k]} x{n}' for k, n in sorted(counts.items()))})")


def _numbers(rows: list[dict[str, str]], col: str, path: Path) -> np.ndarray:
    out = []
    for r in rows:
        f = _as_float(r[col])
        if f is None:
            raise MILError(f"{_where(path, r['_line'], r['slide_id'])}: column {col!r} must be a finite number "
                           f"(got {r[col]!r})")
        out.append(f)
    return np.asarray(out, dtype=np.float64)


#: Values of a ``split`` column (case-insensitive).
SPLIT_VALUES = ("train", "val", "test")


def _coded(rows: list[dict[str, Any]], col: str, codes: dict[str, Any], path: Any, message: str) -> list[Any]:
    """Column ``col`` of every row through ``codes`` (case-insensitive); the first value not in it is an
    error naming the file, line and slide (``message`` formatted with the value)."""
    out = []
    for r in rows:
        v = r[col].lower()
        if v not in codes:
            raise MILError(f"{_where(path, r['_line'], r['slide_id'])}: " + message.format(r[col]))
        out.append(codes[v])
    return out


def read_labels(path: str | os.PathLike, task: str | None = None) -> pd.DataFrame:
    """Read a labels CSV.

    Returns ``slide_id`` (str, NFC-normalised), the targets (``label``: int or str for classification,
    float for regression; ``time`` float and ``event`` int for survival), ``patient_id`` (str, if present)
    and ``split`` (``train``/``val``/``test``, if present); ``df.attrs["task"]`` holds the task (``task`` if
    given, else detected) and ``df.attrs["lines"]`` the file line of every row. A slide listed twice, an
    empty / NaN target, a label column mixing types (integers and text, say) or an unknown split value is an
    error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise MILError(f"{path}: labels CSV not found")
    cols, rows = _read_rows(path)
    if "slide_id" not in cols:
        raise MILError(f"{path}: labels CSV lacks column(s) ['slide_id'] (has {list(cols)}); "
                       "expected slide_id,label[,patient_id]")
    if task in (None, "auto"):
        task = _detect_task(cols, rows, path)
    needed = {"classification": ["label"], "regression": ["label"], "survival": ["time", "event"]}.get(task)
    if needed is None:
        raise MILError(f"unknown task {task!r} (known: classification, survival, regression)")
    missing = [c for c in needed if c not in cols]
    if missing:
        raise MILError(f"{path}: labels CSV lacks column(s) {missing} (has {list(cols)}); "
                       f"a {task} task needs slide_id,{','.join(needed)}[,patient_id]")
    seen: dict[str, int] = {}
    for r in rows:
        sid = r["slide_id"]
        if _is_missing(sid):
            raise MILError(f"{path}: line {r['_line']}: empty slide_id")
        if sid in seen:
            raise MILError(f"{path}: line {r['_line']}: slide_id {sid!r} listed twice (also line {seen[sid]}); "
                           "list every slide once")
        seen[sid] = r["_line"]
        for c in needed:
            if _is_missing(r[c]):
                raise MILError(f"{_where(path, r['_line'], sid)}: empty {c!r} ({r[c]!r}); give every listed "
                               "slide a value, or leave the slide out of the labels CSV")
    data: dict[str, Any] = {"slide_id": [r["slide_id"] for r in rows]}
    if task == "classification":
        data["label"] = pd.Series(_classification_labels(rows, path), dtype=object)
    elif task == "regression":
        data["label"] = _numbers(rows, "label", path)
    else:
        data["time"] = _numbers(rows, "time", path)
        events = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}
        data["event"] = np.asarray(_coded(rows, "event", events, path, "column 'event' must be 1/0 (or "
                                          "true/false); got {!r}"), dtype=np.int64)
        neg = [r for r, t in zip(rows, data["time"]) if t < 0]
        if neg:
            raise MILError(f"{_where(path, neg[0]['_line'], neg[0]['slide_id'])}: negative survival time "
                           f"{neg[0]['time']}")
    if "patient_id" in cols:
        nopid = [r["slide_id"] for r in rows if _is_missing(r["patient_id"])]
        if nopid:
            log.warning("%s: %d slide(s) without patient_id are treated as their own patient: %s", path,
                        len(nopid), _names(nopid))
        data["patient_id"] = [r["slide_id"] if _is_missing(r["patient_id"]) else r["patient_id"] for r in rows]
    if "split" in cols:
        data["split"] = _coded(rows, "split", {v: v for v in SPLIT_VALUES}, path,
                               "split {!r} is not one of " + ", ".join(SPLIT_VALUES))
    df = pd.DataFrame(data)
    df.attrs["task"] = task
    df.attrs["lines"] = [r["_line"] for r in rows]
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
    split: np.ndarray | None = None  # (n,) "train"/"val"/"test" when the labels CSV has a split column

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
