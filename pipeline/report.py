"""Cohort QC report: one self-contained HTML file built from the cached outputs of a results folder.

    python -m pipeline.report --results DIR --out HTML [--tag T] [--mil-model M] [--slides ID ...]

Per slide: the tissue thumbnail (with its contour) and the patch grid drawn on it, level-0 µm/px and
where it came from, requested/effective µm/px of the patches, tissue area, patch count, bag status
(present, N, weights) and, from ``{results}/failures.tsv`` when present, the failed stage and reason.
Then the MIL metrics (per fold and mean) with ROC curves computed from the out-of-fold predictions,
and links to heatmap images under ``{results}/heatmaps/`` when there are any.

Everything is read defensively: a slide without a grid yet, a failed slide, a corrupt file or no MIL
run at all gives a row that says so, never an exception. Images are embedded as base64 data URIs and
the CSS is inline, so the file opens offline and can be mailed; links to heatmaps are relative.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import html
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

import numpy as np

from . import STAGE_VERSIONS, __version__
from .provenance import atomic_path

FAILURES_FILE = "failures.tsv"
#: Longest side of the overview image embedded per slide (pixels).
IMAGE_MAX_PX = 512
#: Above this many bytes as PNG, an overview is embedded as JPEG instead.
PNG_MAX_BYTES = 60_000
JPEG_QUALITY = 80
HEATMAP_EXTENSIONS = (".png", ".jpg", ".jpeg", ".svg", ".webp")
_GRID_BGR = (255, 90, 0)  # patch rectangles: blue-ish (OpenCV BGR order)
_CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def esc(value: Any) -> str:
    """HTML-escaped text of any value (quotes included, so it is safe in attributes too)."""
    return html.escape("" if value is None else str(value), quote=True)


# -- reading the results folder -------------------------------------------------------------------
def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(object, None) or (None, reason); never raises."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"unreadable {path.name}: {exc}"
    if not isinstance(obj, dict):
        return None, f"unreadable {path.name}: not a JSON object"
    return obj, None


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


def read_failure_records(results: Path) -> list[dict[str, str]] | None:
    """The per-slide records under ``{results}/failures/`` (current: a later success removes them);
    None when the folder does not exist."""
    d = results / "failures"
    if not d.is_dir():
        return None
    recs = []
    for p in sorted(d.glob("*.json")):
        rec, _ = _read_json(p)
        if rec and rec.get("slide_id"):
            recs.append({k: str(rec.get(k) or "") for k in ("slide_id", "stage", "reason", "path")})
    return recs


def discover_slide_ids(results: Path, tag: str | None, failures: Iterable[dict[str, str]] = ()) -> list[str]:
    """Every slide id with any output (tissue, grid, bag) or a recorded failure, sorted."""
    ids: set[str] = set()
    tdir = results / "tissue"
    if tdir.is_dir():
        ids.update(p.name for p in tdir.iterdir() if p.is_dir() and not p.name.startswith("."))
    gdir = results / "grid"
    if gdir.is_dir():
        ids.update(p.stem for p in gdir.glob("*.json") if not p.name.startswith("."))
    for fdir in _feature_dirs(results, tag):
        ids.update(p.name[:-5] for p in fdir.glob("*.zarr") if p.is_dir() and not p.name.startswith("."))
    ids.update(f["slide_id"] for f in failures if _is_slide_failure(f))
    return sorted(ids)


def _is_slide_failure(f: dict[str, str]) -> bool:
    return bool(f.get("slide_id")) and f["slide_id"] not in ("-", "*", "NA")


def _feature_dirs(results: Path, tag: str | None) -> list[Path]:
    base = results / "features"
    if tag:
        return [base / tag] if (base / tag).is_dir() else []
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def bag_status(results: Path, slide_id: str, tag: str | None) -> dict[str, Any]:
    """Status of a slide's feature bag: present / partial / invalid / missing, with N and weights."""
    from .store import open_bag, partial_path

    for fdir in _feature_dirs(results, tag):
        path = fdir / f"{slide_id}.zarr"
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
                    "tag": fdir.name, "mtime": path.stat().st_mtime}
        part = partial_path(path)
        if part.is_dir():
            prog, _ = _read_json(part / "progress.json")
            done = f"{prog.get('rows_done')}/{prog.get('n_patches')}" if prog else "?"
            return {"status": "partial", "path": str(part), "progress": done}
    return {"status": "missing"}


def slide_record(results: Path, slide_id: str, tag: str | None) -> dict[str, Any]:
    """Everything the report shows about one slide (missing pieces are None, problems listed)."""
    rec: dict[str, Any] = {"slide_id": slide_id, "problems": []}
    tdir = results / "tissue" / slide_id
    tissue, err = _read_json(tdir / "tissue.json")
    if err:
        rec["problems"].append(err)
    rec["tissue"] = tissue
    grid_path = results / "grid" / f"{slide_id}.json"
    grid, err = _read_json(grid_path)
    if err:
        rec["problems"].append(err)
    rec["grid"] = grid
    rec["thumbnail"] = tdir / "thumbnail.png"
    rec["bag"] = bag_status(results, slide_id, tag)
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
    rec["stage_outputs"] = {"tissue": tdir / "tissue.json", "grid": grid_path,
                            "features": Path(bag["path"]) if bag.get("status") == "present" else None}
    return rec


# -- images -----------------------------------------------------------------------------------------
def overview_image(rec: dict[str, Any], max_px: int = IMAGE_MAX_PX) -> str | None:
    """Data URI of the tissue thumbnail with the patch grid drawn on it; None without a thumbnail."""
    import cv2

    path = rec.get("thumbnail")
    if path is None or not Path(path).is_file():
        return None
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        rec["problems"].append("unreadable thumbnail.png")
        return None
    th, tw = img.shape[:2]
    scale = min(1.0, max_px / max(th, tw))
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(tw * scale)), max(1, round(th * scale))), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    grid, dims = rec.get("grid"), rec.get("dimensions")
    try:
        coords = np.asarray((grid or {}).get("coords") or [], dtype=np.float64).reshape(-1, 2)
        size0 = float(((grid or {}).get("read_plan") or {}).get("patch_size_level0_px") or 0)
        if coords.size and size0 > 0 and dims and dims[0] > 0 and dims[1] > 0:
            sx, sy = w / float(dims[0]), h / float(dims[1])
            x0 = np.round(coords[:, 0] * sx).astype(np.int64)
            y0 = np.round(coords[:, 1] * sy).astype(np.int64)
            x1 = np.round((coords[:, 0] + size0) * sx).astype(np.int64) - 1
            y1 = np.round((coords[:, 1] + size0) * sy).astype(np.int64) - 1
            overlay = img.copy()
            if size0 * sx < 3:  # patches too small to outline: shade them
                for a, b, c, d in zip(x0, y0, np.maximum(x1, x0), np.maximum(y1, y0)):
                    cv2.rectangle(overlay, (int(a), int(b)), (int(c), int(d)), _GRID_BGR, thickness=-1)
                img = cv2.addWeighted(overlay, 0.35, img, 0.65, 0)
            else:
                for a, b, c, d in zip(x0, y0, x1, y1):
                    cv2.rectangle(overlay, (int(a), int(b)), (int(c), int(d)), _GRID_BGR, thickness=1)
                img = cv2.addWeighted(overlay, 0.6, img, 0.4, 0)
    except (TypeError, ValueError) as exc:
        rec["problems"].append(f"cannot draw the patch grid ({exc})")
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    mime = "image/png"
    if not ok or len(buf) > PNG_MAX_BYTES:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        mime = "image/jpeg"
    if not ok:
        return None
    return f"data:{mime};base64,{base64.b64encode(buf.tobytes()).decode('ascii')}"


# -- ROC ---------------------------------------------------------------------------------------------
def roc_curve(y_true: Iterable[Any], score: Iterable[float]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(fpr, tpr, auc) of binary labels (truthy = positive) and scores; None when a class is absent.

    Tied scores form one step (a diagonal segment), so the area equals the Mann-Whitney AUC."""
    y = np.asarray(list(y_true), dtype=bool)
    s = np.asarray(list(score), dtype=np.float64)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    return fpr, tpr, auc


def read_predictions(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def roc_curves(pred_csv: Path, metrics: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """ROC curves from out-of-fold predictions: binary (``prob``) or one-vs-rest (``prob_<class>``)."""
    try:
        cols, rows = read_predictions(pred_csv)
    except FileNotFoundError:
        return [], "no out-of-fold predictions.csv"
    except (OSError, ValueError, csv.Error) as exc:
        return [], f"unreadable predictions.csv ({exc})"
    if "label" not in cols:
        return [], "predictions.csv has no label column (not a classification task)"
    labels = [r.get("label", "") for r in rows]
    curves = []
    if "prob" in cols:
        classes = [str(c) for c in metrics.get("classes") or []]
        pos = str(metrics.get("positive_class", classes[1] if len(classes) == 2 else "1"))
        res = roc_curve([lab == pos or _same_number(lab, pos) for lab in labels], [_float(r["prob"]) for r in rows])
        if res is None:
            return [], "out-of-fold predictions hold a single class: ROC undefined"
        curves.append({"name": f"positive class {pos}", "fpr": res[0], "tpr": res[1], "auc": res[2]})
        return curves, None
    prob_cols = [c for c in cols if c.startswith("prob_")]
    if not prob_cols:
        return [], "predictions.csv has no prob / prob_<class> columns"
    for c in prob_cols:
        name = c[len("prob_"):]
        res = roc_curve([lab == name or _same_number(lab, name) for lab in labels], [_float(r[c]) for r in rows])
        if res is not None:
            curves.append({"name": f"{name} vs rest", "fpr": res[0], "tpr": res[1], "auc": res[2]})
    return curves, None if curves else "no class has both positives and negatives: ROC undefined"


def _same_number(a: str, b: str) -> bool:
    fa, fb = _float(a), _float(b)
    return math.isfinite(fa) and fa == fb


def roc_svg(curves: list[dict[str, Any]], size: int = 320) -> str:
    """An inline SVG plot of ROC curves with the chance diagonal and a legend (AUC per curve)."""
    m = 40  # margin for the axes labels
    p = size - m - 10  # plot side
    legend_h = 16 * len(curves) + 8
    H = size + legend_h

    def xy(fx: float, ty: float) -> str:
        return f"{m + fx * p:.1f},{10 + (1 - ty) * p:.1f}"

    out = [f'<svg class="roc" width="{size}" height="{H}" '
           f'viewBox="0 0 {size} {H}" role="img" aria-label="ROC curves">',
           f'<rect x="{m}" y="10" width="{p}" height="{p}" fill="#fff" stroke="#444"/>']
    for t in (0.25, 0.5, 0.75):
        out.append(f'<line x1="{m + t * p:.1f}" y1="10" x2="{m + t * p:.1f}" y2="{10 + p}" stroke="#eee"/>')
        out.append(f'<line x1="{m}" y1="{10 + t * p:.1f}" x2="{m + p}" y2="{10 + t * p:.1f}" stroke="#eee"/>')
    for t in (0.0, 0.5, 1.0):
        out.append(f'<text x="{m + t * p:.1f}" y="{p + 24}" font-size="10" text-anchor="middle">{t:g}</text>')
        out.append(f'<text x="{m - 4}" y="{10 + (1 - t) * p + 3:.1f}" font-size="10" text-anchor="end">{t:g}</text>')
    out.append(f'<text x="{m + p / 2:.1f}" y="{p + 36}" font-size="11" text-anchor="middle">false positive rate</text>')
    out.append(f'<text x="12" y="{10 + p / 2:.1f}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {10 + p / 2:.1f})">true positive rate</text>')
    out.append(f'<line x1="{m}" y1="{10 + p}" x2="{m + p}" y2="10" stroke="#999" stroke-dasharray="4 3"/>')
    for i, c in enumerate(curves):
        colour = _CURVE_COLOURS[i % len(_CURVE_COLOURS)]
        pts = " ".join(xy(f, t) for f, t in zip(c["fpr"], c["tpr"]))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        ly = size + 4 + 16 * i
        out.append(f'<line x1="{m}" y1="{ly}" x2="{m + 18}" y2="{ly}" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{m + 24}" y="{ly + 4}" font-size="11">{esc(c["name"])}: AUC {c["auc"]:.3f}</text>')
    out.append("</svg>")
    return "".join(out)


# -- MIL ---------------------------------------------------------------------------------------------
def find_mil_runs(results: Path, tag: str | None, mil_model: str | None) -> list[Path]:
    """Folders holding a MIL ``metrics.json`` (restricted to ``tag`` / ``mil_model`` when given)."""
    base = results / "mil"
    if not base.is_dir():
        return []
    tags = [base / tag] if tag else sorted(p for p in base.iterdir() if p.is_dir())
    runs = []
    for t in tags:
        models = [t / mil_model] if mil_model else (sorted(p for p in t.iterdir() if p.is_dir()) if t.is_dir() else [])
        runs += [m for m in models if (m / "metrics.json").is_file()]
    return runs


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def mil_section(run_dir: Path, results: Path) -> str:
    metrics, err = _read_json(run_dir / "metrics.json")
    title = esc(run_dir.relative_to(results / "mil").as_posix())
    if metrics is None:
        return f'<h3>{title}</h3><p class="bad">{esc(err or "metrics.json missing")}</p>'
    parts = [f"<h3>{title}</h3>"]
    info = [f"task {esc(metrics.get('task', 'classification'))}", f"model {esc(metrics.get('model', '?'))}",
            f"mode {esc(metrics.get('mode', '?'))}", f"{esc(metrics.get('n_bags', '?'))} bags"]
    if metrics.get("classes") is not None:
        info.append("classes " + esc(", ".join(str(c) for c in metrics["classes"])))
    parts.append(f"<p>{' · '.join(info)}</p>")
    if metrics.get("note"):
        parts.append(f'<p class="note">{esc(metrics["note"])}</p>')
    folds = [f for f in metrics.get("folds") or [] if isinstance(f, dict)]
    mean = metrics.get("mean") or {}
    if folds:
        keys: list[str] = []
        for f in folds:
            keys += [k for k in f if k not in keys and not k.endswith("_note") and not isinstance(f[k], (dict, list))]
        head = "".join(f"<th>{esc(k)}</th>" for k in keys)
        body = []
        for f in folds:
            body.append("<tr>" + "".join(f"<td>{esc(_fmt(f.get(k)))}</td>" for k in keys) + "</tr>")
        mean_cells = "".join(f"<td><b>{esc(_fmt(mean.get(k)))}</b></td>" if k in mean else
                             ("<td><b>mean</b></td>" if k == keys[0] else "<td></td>") for k in keys)
        body.append(f'<tr class="mean">{mean_cells}</tr>')
        parts.append(f'<table class="metrics"><tr>{head}</tr>{"".join(body)}</table>')
        notes = [f"fold {f.get('fold', i)}: {f[k]}" for i, f in enumerate(folds) for k in f if k.endswith("_note")]
        notes += [f"{k}: {v}" for k, v in mean.items() if k.endswith("_note")]
        if notes:
            parts.append("<ul class='note'>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    if mean:
        parts.append("<p>Mean over folds: " + ", ".join(
            f"{esc(k)} <b>{esc(_fmt(v))}</b>" for k, v in mean.items() if not k.endswith("_note")) + "</p>")
    curves, why = roc_curves(run_dir / "predictions.csv", metrics)
    if curves:
        parts.append('<div class="roc">' + roc_svg(curves) + "</div>")
        parts.append('<p class="note">ROC of the out-of-fold predictions pooled over all folds '
                     '(its AUC can differ from the mean of the per-fold AUCs).</p>')
    elif why:
        parts.append(f'<p class="note">ROC: {esc(why)}</p>')
    return "".join(parts)


# -- heatmaps ----------------------------------------------------------------------------------------
def find_heatmaps(results: Path, slide_ids: Iterable[str]) -> tuple[dict[str, list[Path]], list[Path]]:
    """Heatmap images under ``{results}/heatmaps``: per slide (file stem or a folder named after the slide,
    or a stem starting with ``{slide}_`` / ``{slide}.``; the longest matching id wins) and the rest."""
    base = results / "heatmaps"
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


def _rel_href(target: Path, html_dir: Path) -> str:
    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(html_dir))
    return quote(Path(rel).as_posix(), safe="/")


# -- page --------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;font-size:14px}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top;
text-align:left}th{background:#f2f2f2}tr.failed{background:#fdecea}tr.incomplete{background:#fff8e1}
tr.mean td{background:#f7f7f7}.banner{padding:.7em 1em;margin:.6em 0;border-radius:4px}
.warn{background:#fff3cd;border:1px solid #e0b000}.error{background:#fdecea;border:1px solid #d9534f}
.ok{color:#1a7f37}.bad{color:#b42318;font-weight:600}.note{color:#555;font-size:.92em}
img.ov{max-width:260px;max-height:200px;cursor:zoom-in;border:1px solid #ddd}
img.ov:focus{max-width:95vw;max-height:none;position:relative;z-index:2;cursor:zoom-out;outline:2px solid #1f77b4}
.summary td{border:none;padding:2px 12px 2px 0}code{font-size:.92em}.num{text-align:right}
"""


def _status(rec: dict[str, Any], failures: list[dict[str, str]]) -> str:
    if failures:
        return "failed"
    if rec["tissue"] and rec["grid"] and rec["bag"].get("status") == "present" and not rec["problems"]:
        return "ok"
    return "incomplete"


def _slide_failures(rec: dict[str, Any], records: list[dict[str, str]] | None, tsv: list[dict[str, str]],
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


def _cell(v: Any, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f"<td{c}>{esc(v)}</td>"


def _slide_row(i: int, rec: dict[str, Any], img: str | None, failures: list[dict[str, str]],
               resolved: list[dict[str, str]], heatmaps: list[Path], html_dir: Path, results: Path) -> str:
    status = _status(rec, failures)
    dims = rec["dimensions"]
    dims_s = f"{dims[0]} × {dims[1]}" if isinstance(dims, (list, tuple)) and len(dims) == 2 else "–"
    mpp = rec["level0_mpp"]
    mpp_s = f"{mpp:.4g}" if isinstance(mpp, (int, float)) else "–"
    src = rec["mpp_source"] or "–"
    src_cls = "bad" if src == "config.default_mpp" else ""
    req, eff = rec["requested_mpp"], rec["effective_mpp"]
    patch_s = "–" if req is None else f"{_fmt(req, 4)} / {_fmt(eff, 4)}"
    if rec.get("patch_size_px"):
        patch_s += f" ({rec['patch_size_px']} px)"
    area = rec["tissue_area_mm2"]
    area_s = f"{area:.2f}" if isinstance(area, (int, float)) else "–"
    n = rec["n_patches"]
    n_s = ("–" if failures else "no grid yet") if n is None else str(n)
    bag = rec["bag"]
    if bag["status"] == "present":
        bag_s = f"present, N={bag['n']}, weights {bag['weights']}"
        bag_cls = "bad" if bag.get("random") else "ok"
    elif bag["status"] == "partial":
        bag_s, bag_cls = f"partial (resumable, rows {bag['progress']})", ""
    elif bag["status"] == "failed":
        bag_s, bag_cls = f"failed output ({bag['stage']})", "bad"
    elif bag["status"] == "invalid":
        bag_s, bag_cls = f"invalid: {bag['error']}", "bad"
    else:
        bag_s, bag_cls = "missing", ""
    if img:
        img_html = (f'<img class="ov" tabindex="0" alt="thumbnail and patch grid of {esc(rec["slide_id"])}" '
                    f'src="{img}">')
    else:
        img_html = '<span class="note">no thumbnail</span>'
    notes = []
    for f in failures:
        where = f' <code>{esc(f["path"])}</code>' if f.get("path") else ""
        notes.append(f'<div class="bad">{esc(f.get("stage") or "?")}: {esc(f.get("reason") or "")}</div>{where}')
    for f in resolved:
        notes.append(f'<div class="note">earlier failure, since resolved: {esc(f.get("stage"))}: '
                     f'{esc(f.get("reason"))}</div>')
    for p in rec["problems"]:
        notes.append(f'<div class="note">{esc(p)}</div>')
    for h in heatmaps:
        notes.append(f'<div><a href="{esc(_rel_href(h, html_dir))}">heatmap: '
                     f'{esc(h.relative_to(results / "heatmaps").as_posix())}</a></div>')
    return (f'<tr id="s{i}" class="{status}"><td><b>{esc(rec["slide_id"])}</b><br>'
            f'<span class="{ "ok" if status == "ok" else "bad" }">{status}</span></td>'
            f"<td>{img_html}</td>{_cell(dims_s)}<td>{esc(mpp_s)}<br>"
            f'<span class="note {src_cls}">{esc(src)}</span></td>{_cell(patch_s)}{_cell(area_s, "num")}'
            f'{_cell(n_s, "num")}{_cell(bag_s, bag_cls)}<td>{"".join(notes)}</td></tr>')


def build_report(results_dir: str | os.PathLike, out_html: str | os.PathLike, slides: Iterable[str] | None = None,
                 tag: str | None = None, mil_model: str | None = None, image_max_px: int = IMAGE_MAX_PX
                 ) -> dict[str, Any]:
    """Write the cohort report to ``out_html`` (atomically); returns a summary dict.

    ``slides``: the slide ids to report (default: every slide with any output or recorded failure).
    ``tag``: the feature folder under ``features/`` and ``mil/`` (default: all). ``mil_model``: the MIL
    run under ``mil/{tag}/`` (default: every run with a metrics.json).
    """
    results = Path(results_dir)
    out_html = Path(out_html)
    html_dir = out_html.parent
    fail_path = results / FAILURES_FILE
    tsv = read_failures(fail_path)
    try:
        tsv_mtime = fail_path.stat().st_mtime if tsv else None
    except OSError:
        tsv_mtime = None
    records = read_failure_records(results)
    ids = (list(dict.fromkeys(slides)) if slides is not None
           else discover_slide_ids(results, tag, tsv + (records or [])))
    id_set = set(ids)
    tsv_per: dict[str, list[dict[str, str]]] = {}
    rec_per: dict[str, list[dict[str, str]]] = {}
    cohort_fail = []
    for f in tsv:  # rows of slides outside ``slides`` are left out; rows naming no slide are shown apart
        if not _is_slide_failure(f):
            cohort_fail.append(f)
        elif f["slide_id"] in id_set:
            tsv_per.setdefault(f["slide_id"], []).append(f)
    for f in records or []:
        if f["slide_id"] in id_set:
            rec_per.setdefault(f["slide_id"], []).append(f)
    heatmaps, other_heatmaps = find_heatmaps(results, ids)

    rows, counts = [], {"ok": 0, "failed": 0, "incomplete": 0}
    total_patches, total_area, n_random, n_bags, n_default_mpp = 0, 0.0, 0, 0, 0
    for i, sid in enumerate(ids):
        rec = slide_record(results, sid, tag)
        cur, resolved = _slide_failures(rec, None if records is None else rec_per.get(sid, []),
                                        tsv_per.get(sid, []), tsv_mtime)
        try:
            img = overview_image(rec, image_max_px)
        except Exception as exc:  # noqa: BLE001 - one bad image must not cost the whole report
            rec["problems"].append(f"overview image failed ({exc})")
            img = None
        counts[_status(rec, cur)] += 1
        total_patches += int(rec["n_patches"] or 0)
        total_area += float(rec["tissue_area_mm2"] or 0.0)
        if rec["bag"].get("status") == "present":
            n_bags += 1
            n_random += bool(rec["bag"].get("random"))
        n_default_mpp += rec["mpp_source"] == "config.default_mpp"
        rows.append(_slide_row(i, rec, img, cur, resolved, heatmaps.get(sid, []), html_dir, results))

    runs = find_mil_runs(results, tag, mil_model)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    title = f"wsipipe cohort report — {results.name or results}"
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f'<p class="note">Results folder <code>{esc(results)}</code>'
             f"{' · features ' + esc(tag) if tag else ''} · generated {esc(now)} · wsipipe {esc(__version__)} "
             f"(report v{STAGE_VERSIONS['report']})</p>"]
    # banners
    if n_random:
        parts.append(f'<div class="banner warn"><b>Random encoder weights:</b> {n_random} of {n_bags} feature bag(s) '
                     "were made with random (untrained) weights. Fine for a demo or a test; their features and "
                     "any MIL result built on them mean nothing for research.</div>")
    if counts["failed"] or cohort_fail:
        parts.append(f'<div class="banner error"><b>{counts["failed"]} slide(s) failed</b>'
                     f'{f" and {len(cohort_fail)} other failure(s)" if cohort_fail else ""}: '
                     "see the rows marked failed below.</div>")
    if n_default_mpp:
        parts.append(f'<div class="banner warn">{n_default_mpp} slide(s) use the configured default_mpp (no '
                     "µm/px in the file or the labels CSV): check that it is right for them.</div>")
    # summary
    summ = [("slides", len(ids)), ("ok", counts["ok"]), ("failed", counts["failed"]),
            ("incomplete", counts["incomplete"]), ("total patches", f"{total_patches:,}"),
            ("total tissue area", f"{total_area:.1f} mm²"), ("feature bags", n_bags),
            ("MIL runs", len(runs))]
    pre = _preflight_line(results)
    if pre:
        summ.append(("pre-flight estimate", pre))
    parts.append("<h2>Summary</h2><table class='summary'>" + "".join(
        f"<tr><td>{esc(k)}</td><td><b>{esc(v)}</b></td></tr>" for k, v in summ) + "</table>")
    if cohort_fail:
        parts.append("<h3>Other failures</h3><table><tr><th>slide / item</th><th>stage</th><th>reason</th>"
                     "<th>path</th></tr>" + "".join(
                         f"<tr>{_cell(f.get('slide_id'))}{_cell(f.get('stage'))}{_cell(f.get('reason'))}"
                         f"{_cell(f.get('path'))}</tr>" for f in cohort_fail) + "</table>")
    # slides
    parts.append("<h2>Slides</h2>")
    if rows:
        parts.append('<p class="note">Thumbnail with the tissue contour (green) and the patch grid (blue); click '
                     "an image to enlarge it. µm/px patches: requested / effective.</p>")
        parts.append("<table class='slides'><tr><th>slide</th><th>tissue &amp; patch grid</th><th>level-0 size "
                     "(px)</th><th>level-0 µm/px<br>(source)</th><th>patch µm/px</th><th>tissue mm²</th>"
                     "<th>patches</th><th>feature bag</th><th>failures, notes, heatmaps</th></tr>"
                     + "".join(rows) + "</table>")
    else:
        parts.append("<p>No slides found in this results folder.</p>")
    # MIL
    parts.append("<h2>Multiple-instance learning</h2>")
    if runs:
        for r in runs:
            parts.append(mil_section(r, results))
    else:
        parts.append("<p class='note'>No MIL results (no labels, or training has not run yet).</p>")
    if other_heatmaps:
        links = [f'<li><a href="{esc(_rel_href(h, html_dir))}">'
                 f'{esc(h.relative_to(results / "heatmaps").as_posix())}</a></li>' for h in other_heatmaps]
        parts.append("<h2>Other heatmaps</h2><ul>" + "".join(links) + "</ul>")
    parts.append("</body></html>\n")
    text = "\n".join(parts)
    with atomic_path(out_html) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return {"out": str(out_html), "slides": len(ids), **counts, "total_patches": total_patches,
            "random_weight_bags": n_random, "mil_runs": len(runs), "bytes": len(text.encode("utf-8"))}


def _preflight_line(results: Path) -> str | None:
    pre, _ = _read_json(results / "preflight.json")
    if not pre:
        return None
    try:
        created = str((pre.get("provenance") or {}).get("created") or "?")
        return (f"{int(pre['total_patches']):,} patches in {pre.get('n_slides', '?')} slide(s), about "
                f"{pre['total_human']} at {float(pre['throughput_patches_per_s']):.1f} patches/s "
                f"({pre.get('model')}, {pre.get('device')}; estimated {created})")
    except (KeyError, TypeError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="results folder")
    ap.add_argument("--out", required=True, help="HTML file to write")
    ap.add_argument("--tag", default=None, help="feature tag (folder under features/ and mil/); default: all")
    ap.add_argument("--mil-model", default=None, help="MIL run under mil/{tag}/; default: all")
    ap.add_argument("--slides", nargs="*", default=None,
                    help="slide ids to report (default: every slide with an output or a recorded failure)")
    ap.add_argument("--image-max-px", type=int, default=IMAGE_MAX_PX, help="longest side of embedded images")
    a = ap.parse_args(argv)
    if not Path(a.results).is_dir():
        print(f"error: {a.results}: no such results folder", file=sys.stderr)
        return 1
    res = build_report(a.results, a.out, slides=a.slides, tag=a.tag, mil_model=a.mil_model,
                       image_max_px=max(64, a.image_max_px))
    print(f"[report] {res['out']}: {res['slides']} slide(s) ({res['ok']} ok, {res['failed']} failed, "
          f"{res['incomplete']} incomplete), {res['total_patches']:,} patches, {res['mil_runs']} MIL run(s), "
          f"{res['bytes'] / 1e6:.2f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
