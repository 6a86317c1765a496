"""Reading a results folder for the QC report: plain data, no HTML.

Everything is read defensively: a slide without a grid yet, a failed slide, a corrupt file or no MIL run
at all gives a record that says so, never an exception. Paths come from :class:`pipeline.layout.Layout`.
"""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable


from ..curves import CurveError, km_groups, read_predictions
from ..curves import roc_curves as roc_curves_of
from ..files import read_json_or_none
from ..layout import Layout

HEATMAP_EXTENSIONS = (".png", ".jpg", ".jpeg", ".svg", ".webp")


# -- failures -----------------------------------------------------------------------------------------
def read_failures(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a ``slide_id<TAB>stage<TAB>reason<TAB>path`` file (header optional); [] when absent."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    cols = ("slide_id", "stage", "reason", "path")
    for i, parts in enumerate(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)):
        if not parts or not any(p.strip() for p in parts):
            continue
        if i == 0 and [p.strip().lower() for p in parts[:2]] == ["slide_id", "stage"]:
            continue  # header
        parts = parts[:3] + ["\t".join(parts[3:])] if len(parts) > 4 else parts + [""] * (4 - len(parts))
        rows.append(dict(zip(cols, (p.strip() for p in parts))))
    return rows


def read_failure_records(layout: Layout) -> list[dict[str, str]] | None:
    """The per-slide records under ``failures/`` (current: a later success removes them); None when the
    folder does not exist."""
    d = Path(layout.failures_dir())
    if not d.is_dir():
        return None
    recs = []
    for p in sorted(d.glob("*.json")):
        rec, _ = read_json_or_none(p)
        if rec and rec.get("slide_id"):
            recs.append({k: str(rec.get(k) or "") for k in ("slide_id", "stage", "reason", "path")})
    return recs


def is_slide_failure(f: dict[str, str]) -> bool:
    return bool(f.get("slide_id")) and f["slide_id"] not in ("-", "*", "NA")


def slide_failures(rec: dict[str, Any], records: list[dict[str, str]] | None, tsv: list[dict[str, str]],
                   tsv_mtime: float | None) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(current, resolved) failures of one slide.

    Current: the slide's records under ``failures/`` and failed outputs (``status: failed``). Rows of
    ``failures.tsv`` (the summary of the last finished run) are current when there is no ``failures/``
    folder and that stage's output is not newer than the file; otherwise they are shown as resolved.
    """
    current: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(f: dict[str, str], to: list[dict[str, str]]) -> None:
        key = (str(f.get("stage") or ""), str(f.get("reason") or ""))
        if key not in seen:
            seen.add(key)
            to.append(f)

    for f in records or []:
        add(f, current)
    if records is None:
        for f in tsv:
            out = rec["stage_outputs"].get(str(f.get("stage") or "").strip().lower())
            try:
                newer = out is not None and tsv_mtime is not None and out.exists() and out.stat().st_mtime > tsv_mtime
            except OSError:
                newer = False
            if not newer:
                add(f, current)
    if not current:
        for f in rec["failed_outputs"]:
            add(f, current)
    resolved: list[dict[str, str]] = []
    for f in tsv:
        add(f, resolved)
    return current, resolved


# -- slides -------------------------------------------------------------------------------------------
def bag_status(layout: Layout, slide_id: str) -> dict[str, Any]:
    """Status of a slide's feature bag: present / partial / invalid / failed / missing, with N and weights."""
    from ..store import open_bag, partial_path

    for tag in layout.tags():
        path = Path(layout.bag(slide_id, tag))
        if path.is_dir():
            try:
                attrs = open_bag(path).attrs
            except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
                return {"status": "invalid", "path": str(path), "error": str(exc)}
            if attrs.get("status") == "failed":
                return {"status": "failed", "path": str(path), "stage": attrs.get("stage") or "features",
                        "error": attrs.get("error") or "failed"}
            w = attrs.get("weights")
            if w == "random":
                weights = "random"
            elif isinstance(w, dict):
                weights = f"sha256 {str(w.get('sha256') or '?')[:12]}"
            else:
                weights = str(w)
            return {"status": "present", "path": str(path), "n": int(attrs.get("n_patches", 0)),
                    "weights": weights, "random": w == "random", "model": attrs.get("model"),
                    "tag": tag, "mtime": path.stat().st_mtime}
        part = partial_path(path)
        if part.is_dir():
            prog, _ = read_json_or_none(part / "progress.json")
            done = f"{prog.get('rows_done')}/{prog.get('n_patches')}" if prog else "?"
            return {"status": "partial", "path": str(part), "progress": done}
    return {"status": "missing"}


def slide_record(layout: Layout, slide_id: str) -> dict[str, Any]:
    """Everything the report shows about one slide (missing pieces are None, problems listed)."""
    rec: dict[str, Any] = {"slide_id": slide_id, "problems": []}
    tissue_json = Path(layout.tissue_json(slide_id))
    tissue, err = read_json_or_none(tissue_json)
    if err:
        rec["problems"].append(err)
    rec["tissue"] = tissue
    grid_path = Path(layout.grid(slide_id))
    grid, err = read_json_or_none(grid_path)
    if err:
        rec["problems"].append(err)
    rec["grid"] = grid
    rec["thumbnail"] = Path(layout.tissue_file(slide_id, "thumbnail"))
    rec["bag"] = bag_status(layout, slide_id)
    # Explicit failed outputs (on_slide_error: skip) carry status "failed", the stage and the reason.
    rec["failed_outputs"] = []
    for obj in (tissue, grid, rec["bag"]):
        if obj and obj.get("status") == "failed":
            f = {"slide_id": slide_id, "stage": str(obj.get("stage") or "?"), "reason": str(obj.get("error") or "")}
            if (f["stage"], f["reason"]) not in {(g["stage"], g["reason"]) for g in rec["failed_outputs"]}:
                rec["failed_outputs"].append(f)
    if tissue and tissue.get("status") == "failed":
        tissue = rec["tissue"] = None
        rec["thumbnail"] = None
    if grid and grid.get("status") == "failed":
        grid = rec["grid"] = None
    slide = (tissue or {}).get("slide") or (grid or {}).get("slide") or {}
    rec["dimensions"] = slide.get("dimensions")
    rec["level0_mpp"] = slide.get("level0_mpp")
    rec["mpp_source"] = slide.get("mpp_source")
    plan = (grid or {}).get("read_plan") or {}
    rec["requested_mpp"] = plan.get("requested_mpp")
    rec["effective_mpp"] = plan.get("effective_mpp")
    rec["patch_size_px"] = plan.get("patch_size_px")
    rec["tissue_area_mm2"] = ((tissue or {}).get("stats") or {}).get("tissue_area_mm2")
    rec["n_patches"] = (grid or {}).get("n_patches") if grid else None
    bag = rec["bag"]
    if grid and bag.get("status") == "present" and rec["n_patches"] is not None and bag["n"] != rec["n_patches"]:
        rec["problems"].append(f"bag has {bag['n']} patches, grid {rec['n_patches']} (bag older than grid?)")
    rec["stage_outputs"] = {"tissue": tissue_json, "grid": grid_path,
                            "features": Path(bag["path"]) if bag.get("status") == "present" else None}
    return rec


def slide_status(rec: dict[str, Any], failures: list[dict[str, str]]) -> str:
    if failures:
        return "failed"
    if rec["tissue"] and rec["grid"] and rec["bag"].get("status") == "present" and not rec["problems"]:
        return "ok"
    return "incomplete"


def discover_slide_ids(layout: Layout, failures: Iterable[dict[str, str]] = ()) -> list[str]:
    """Every slide id with any output (tissue, grid, bag) or a recorded failure, sorted."""
    ids = set(layout.slide_ids())
    ids.update(f["slide_id"] for f in failures if is_slide_failure(f))
    return sorted(ids)


# -- MIL ----------------------------------------------------------------------------------------------
def roc_curves(pred_csv: Path, metrics: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """ROC curves from out-of-fold predictions (:func:`pipeline.curves.roc_curves`), or why there are none."""
    if not Path(pred_csv).is_file():
        return [], "no out-of-fold predictions.csv"
    try:
        df = read_predictions(pred_csv)
    except CurveError as exc:
        return [], f"unreadable predictions.csv ({exc})"
    if "label" not in df.columns:
        return [], "predictions.csv has no label column (not a classification task)"
    if "prob" not in df.columns and not any(str(c).startswith("prob_") for c in df.columns):
        return [], "predictions.csv has no prob / prob_<class> columns"
    curves = roc_curves_of(df, metrics)
    if "prob" in df.columns:
        for c in curves:
            c["name"] = f"positive class {c['name']}"
        return curves, None if curves else "out-of-fold predictions hold a single class: ROC undefined"
    return curves, None if curves else "no class has both positives and negatives: ROC undefined"


def km_curves(pred_csv: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Kaplan-Meier curves by predicted risk group (:func:`pipeline.curves.km_groups`), or why there are none."""
    try:
        return km_groups(read_predictions(pred_csv), str(pred_csv)), None
    except CurveError as exc:
        return None, str(exc)


def comparison(layout: Layout, runs: list[Path]) -> dict[str, Any] | None:
    """The table of ``comparison.csv`` (every run, mean ± sd over folds per metric), when it exists."""
    path = Path(layout.mil_comparison("csv")) if layout.tag else None
    if path is None or not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error) as exc:
        return {"error": f"unreadable {path.name} ({exc})"}
    names = {r.name for r in runs}
    rows = [r for r in rows if Path(r.get("run", "")).name in names] or rows
    metrics = [c[:-len("_mean")] for c in (rows[0] if rows else {}) if c.endswith("_mean")]

    def cell(r: dict[str, str], m: str) -> str:
        mean, sd = _float(r.get(f"{m}_mean")), _float(r.get(f"{m}_sd"))
        if not math.isfinite(mean):
            return "n/a"
        return f"{mean:.3f}" + (f" ± {sd:.3f}" if math.isfinite(sd) else "")

    return {"metrics": metrics, "rows": [{"run": Path(r.get("run", "")).name, "model": r.get("model"),
                                          "same_folds": r.get("same_folds"),
                                          "cells": [cell(r, m) for m in metrics]} for r in rows]}


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def mil_run(layout: Layout, run_dir: Path) -> dict[str, Any]:
    """One MIL run for the report: metrics table (per fold + mean), notes, ROC curves."""
    metrics, err = read_json_or_none(run_dir / "metrics.json")
    run: dict[str, Any] = {"title": run_dir.relative_to(layout.mil_root()).as_posix(), "error": None}
    if metrics is None:
        run["error"] = err or "metrics.json missing"
        return run
    info = [f"task {metrics.get('task', 'classification')}", f"model {metrics.get('model', '?')}",
            f"mode {metrics.get('mode', '?')}", f"{metrics.get('n_bags', '?')} bags"]
    if metrics.get("classes") is not None:
        info.append("classes " + ", ".join(str(c) for c in metrics["classes"]))
    run["info"] = info
    run["note"] = metrics.get("note")
    folds = [f for f in metrics.get("folds") or [] if isinstance(f, dict)]
    mean = metrics.get("mean") or {}
    keys: list[str] = []
    for f in folds:
        keys += [k for k in f if k not in keys and not k.endswith("_note") and not isinstance(f[k], (dict, list))]
    run["columns"], run["folds"], run["mean"] = keys, folds, mean
    notes = [f"fold {f.get('fold', i)}: {f[k]}" for i, f in enumerate(folds) for k in f if k.endswith("_note")]
    notes += [f"{k}: {v}" for k, v in mean.items() if k.endswith("_note")]
    run["notes"] = notes
    run["mean_items"] = [(k, v) for k, v in mean.items() if not k.endswith("_note")]
    run["task"] = metrics.get("task", "classification")
    run["curves"], run["roc_note"], run["km"] = [], None, None
    if run["task"] == "survival":
        run["km"], run["roc_note"] = km_curves(run_dir / "predictions.csv")
    else:
        run["curves"], run["roc_note"] = roc_curves(run_dir / "predictions.csv", metrics)
    return run


# -- heatmaps and the pre-flight estimate --------------------------------------------------------------------
def find_heatmaps(layout: Layout, slide_ids: Iterable[str]) -> tuple[dict[str, list[Path]], list[Path]]:
    """Heatmap images under ``heatmaps/``: per slide (file stem or a folder named after the slide, or a
    stem starting with ``{slide}_`` / ``{slide}.``; the longest matching id wins) and the rest."""
    base = Path(layout.heatmaps_dir())
    per: dict[str, list[Path]] = {}
    other: list[Path] = []
    if not base.is_dir():
        return per, other
    ids = sorted(set(slide_ids), key=len, reverse=True)
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in HEATMAP_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(base).parts))
    for f in files:
        dirs = set(f.relative_to(base).parts[:-1])
        stem = f.name[: -len(f.suffix)]
        match = next((s for s in ids if stem == s or s in dirs), None)
        if match is None:
            match = next((s for s in ids if stem.startswith((f"{s}_", f"{s}.", f"{s}-"))), None)
        if match is None:
            other.append(f)
        else:
            per.setdefault(match, []).append(f)
    return per, other


def preflight_line(layout: Layout) -> str | None:
    pre, _ = read_json_or_none(layout.preflight_json())
    if not pre:
        return None
    try:
        created = str((pre.get("provenance") or {}).get("created") or "?")
        return (f"{int(pre['total_patches']):,} patches in {pre.get('n_slides', '?')} slide(s), about "
                f"{pre['total_human']} at {float(pre['throughput_patches_per_s']):.1f} patches/s "
                f"({pre.get('model')}, {pre.get('device')}; estimated {created})")
    except (KeyError, TypeError, ValueError):
        return None


# -- the cohort summary ------------------------------------------------------------------------------------
_PATHISH = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s:;,()'\"]+)+")


def reason_kind(reason: str) -> str:
    """A failure reason with file paths and numbers taken out, so that slides failing for the same reason
    group together (``/data/a.svs: file is empty (0 bytes)`` and ``/data/b.svs: ...`` are one kind)."""
    text = _PATHISH.sub("…", str(reason or ""))
    return re.sub(r"\d+(?:\.\d+)?", "N", text).strip()


def failure_summary(per_slide: dict[str, list[dict[str, str]]]) -> list[dict[str, Any]]:
    """Current failures grouped by stage, then by kind of reason: ``[{"stage", "n", "reasons": [{"reason",
    "n", "slides"}]}]``, largest groups first."""
    by_stage: dict[str, dict[str, list[str]]] = {}
    for sid, fails in per_slide.items():
        for f in fails:
            stage = str(f.get("stage") or "?")
            by_stage.setdefault(stage, {}).setdefault(reason_kind(f.get("reason", "")), []).append(sid)
    out = []
    for stage, kinds in by_stage.items():
        reasons = sorted(({"reason": k, "n": len(set(v)), "slides": sorted(set(v))} for k, v in kinds.items()),
                         key=lambda r: -r["n"])
        out.append({"stage": stage, "n": len({s for r in reasons for s in r["slides"]}), "reasons": reasons})
    return sorted(out, key=lambda g: -g["n"])


def cohort_check(layout: Layout) -> dict[str, Any] | None:
    """``cohort.json`` written when the run started: labels vs slides and the files left out."""
    rec, _ = read_json_or_none(layout.cohort_json())
    return rec
