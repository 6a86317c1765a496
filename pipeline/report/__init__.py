"""Cohort QC report: one self-contained HTML file built from the cached outputs of a results folder.

    wsipipe report --results DIR --out HTML [--tag T] [--mil-model M] [--slides ID ... | --slides-file F]

Per slide: the tissue thumbnail (with its contour) and the patch grid drawn on it, level-0 µm/px and
where it came from, requested/effective µm/px of the patches, tissue area, patch count, bag status
(present, N, weights) and the failed stage and reason when it failed. Then the MIL metrics (per fold and
mean) with ROC curves of the out-of-fold predictions, and links to heatmap images.

Three parts: :mod:`.collect` reads the results folder into plain data (defensively: a missing or corrupt
piece becomes a note, never an exception), :mod:`.images` draws the embedded images, and the page is
rendered from the Jinja2 template ``templates/report.html.j2`` (autoescaped) with the stylesheet
``templates/report.css`` inlined, so the file opens offline and can be mailed; links to heatmaps are
relative.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from .. import STAGE_VERSIONS, __version__
from ..config import STAGE_DEFAULTS, parse_with_settings
from ..files import write_text_atomic
from ..layout import Layout
from ..log import get_logger, setup
from . import collect
from ..curves import roc as roc_curve
from .collect import read_failures
from .images import IMAGE_MAX_PX, image_uri, km_plot, overview_image, roc_plot

__all__ = ["build_report", "slide_record", "overview_image", "roc_curve", "read_failures", "main"]

log = get_logger("report")


def slide_record(results_dir: str | os.PathLike, slide_id: str, tag: str | None = None) -> dict[str, Any]:
    """Everything the report shows about one slide (see :func:`pipeline.report.collect.slide_record`)."""
    return collect.slide_record(Layout(results_dir, tag), slide_id)


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


def _escape(value: Any) -> Any:
    """Every printed value escaped as the standard library does (``&quot;``/``&#x27;``, quotes included,
    so values are safe in attributes too); markup the template made itself (macros) passes through."""
    import html

    from markupsafe import Markup

    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.report", "templates"),
                             autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2"),
                                                                 default_for_string=True),
                             finalize=_escape, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["fmt"] = _fmt
    return env


def render(context: dict[str, Any]) -> str:
    """The report page for a context built by :func:`build_report`."""
    return _env().get_template("report.html.j2").render(**context)


def _rel_href(target: Path, html_dir: Path) -> str:
    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(html_dir))
    return quote(Path(rel).as_posix(), safe="/")


def _row(rec: dict[str, Any], img: str | None, failures: list[dict[str, str]], resolved: list[dict[str, str]],
         heatmaps: list[dict[str, str]], heat_img: dict[str, str] | None = None) -> dict[str, Any]:
    """One slide row of the template: display strings (escaped by the template)."""
    dims = rec["dimensions"]
    mpp = rec["level0_mpp"]
    src = rec["mpp_source"] or "–"
    req, eff = rec["requested_mpp"], rec["effective_mpp"]
    patch = "–" if req is None else f"{_fmt(req, 4)} / {_fmt(eff, 4)}"
    if rec.get("patch_size_px"):
        patch += f" ({rec['patch_size_px']} px)"
    area = rec["tissue_area_mm2"]
    n = rec["n_patches"]
    bag = rec["bag"]
    if bag["status"] == "present":
        bag_s, bag_cls = f"present, N={bag['n']}, weights {bag['weights']}", "bad" if bag.get("random") else "ok"
    elif bag["status"] == "partial":
        bag_s, bag_cls = f"partial (resumable, rows {bag['progress']})", ""
    elif bag["status"] == "failed":
        bag_s, bag_cls = f"failed output ({bag['stage']})", "bad"
    elif bag["status"] == "invalid":
        bag_s, bag_cls = f"invalid: {bag['error']}", "bad"
    else:
        bag_s, bag_cls = "missing", ""
    return {
        "slide_id": rec["slide_id"], "status": collect.slide_status(rec, failures), "img": img,
        "dims": f"{dims[0]} × {dims[1]}" if isinstance(dims, (list, tuple)) and len(dims) == 2 else "–",
        "mpp": f"{mpp:.4g}" if isinstance(mpp, (int, float)) else "–", "src": src,
        "src_cls": "bad" if src == "config.default_mpp" else "", "patch": patch,
        "area": f"{area:.2f}" if isinstance(area, (int, float)) else "–",
        "n": ("–" if failures else "no grid yet") if n is None else str(n), "bag": bag_s, "bag_cls": bag_cls,
        "failures": failures, "resolved": resolved, "problems": rec["problems"], "heatmaps": heatmaps,
        "heat_img": heat_img,
    }


def build_report(results_dir: str | os.PathLike, out_html: str | os.PathLike, slides: Iterable[str] | None = None,
                 tag: str | None = None, mil_model: str | Iterable[str] | None = None,
                 image_max_px: int = STAGE_DEFAULTS["report"]["image_max_px"]) -> dict[str, Any]:
    """Write the cohort report to ``out_html`` (atomically); returns a summary dict.

    ``slides``: the slide ids to report (default: every slide with any output or recorded failure).
    ``tag``: the feature folder under ``features/`` and ``mil/`` (default: all). ``mil_model``: the MIL
    run(s) under ``mil/{tag}/`` (default: every run with a metrics.json).
    """
    layout = Layout(results_dir, tag)
    results = Path(layout.root)
    out_html = Path(out_html)
    html_dir = out_html.parent
    fail_path = Path(layout.failures_tsv())
    tsv = read_failures(fail_path)
    try:
        tsv_mtime = fail_path.stat().st_mtime if tsv else None
    except OSError:
        tsv_mtime = None
    records = collect.read_failure_records(layout)
    ids = (list(dict.fromkeys(slides)) if slides is not None
           else collect.discover_slide_ids(layout, tsv + (records or [])))
    id_set = set(ids)
    tsv_per: dict[str, list[dict[str, str]]] = {}
    rec_per: dict[str, list[dict[str, str]]] = {}
    cohort_fail = []
    for f in tsv:  # rows of slides outside ``slides`` are left out; rows naming no slide are shown apart
        if not collect.is_slide_failure(f):
            cohort_fail.append(f)
        elif f["slide_id"] in id_set:
            tsv_per.setdefault(f["slide_id"], []).append(f)
    for f in records or []:
        if f["slide_id"] in id_set:
            rec_per.setdefault(f["slide_id"], []).append(f)
    heatmaps, other_heatmaps = collect.find_heatmaps(layout, ids)
    heat_base = Path(layout.heatmaps_dir())

    def link(h: Path) -> dict[str, str]:
        return {"href": _rel_href(h, html_dir), "name": h.relative_to(heat_base).as_posix()}

    rows, counts = [], {"ok": 0, "failed": 0, "incomplete": 0}
    failed_by_slide: dict[str, list[dict[str, str]]] = {}
    total_patches, total_area, n_random, n_bags, n_default_mpp = 0, 0.0, 0, 0, 0
    for sid in ids:
        rec = collect.slide_record(layout, sid)
        cur, resolved = collect.slide_failures(rec, None if records is None else rec_per.get(sid, []),
                                               tsv_per.get(sid, []), tsv_mtime)
        try:
            img = overview_image(rec, image_max_px)
        except Exception as exc:  # noqa: BLE001 - one bad image must not cost the whole report
            rec["problems"].append(f"overview image failed ({exc})")
            img = None
        heat_img = None
        for h in heatmaps.get(sid, []):  # the first readable heatmap image, next to the thumbnail
            uri = image_uri(h, image_max_px) if h.suffix.lower() in (".png", ".jpg", ".jpeg") else None
            if uri:
                heat_img = {"src": uri, "name": h.relative_to(heat_base).as_posix()}
                break
        row = _row(rec, img, cur, resolved, [link(h) for h in heatmaps.get(sid, [])], heat_img)
        if cur:
            failed_by_slide[sid] = cur
        counts[row["status"]] += 1
        total_patches += int(rec["n_patches"] or 0)
        total_area += float(rec["tissue_area_mm2"] or 0.0)
        if rec["bag"].get("status") == "present":
            n_bags += 1
            n_random += bool(rec["bag"].get("random"))
        n_default_mpp += rec["mpp_source"] == "config.default_mpp"
        rows.append(row)

    names = [mil_model] if isinstance(mil_model, str) else list(mil_model or [])
    run_dirs = [d for n in names for d in layout.mil_runs(n)] if names else layout.mil_runs()
    runs = []
    for run_dir in run_dirs:
        run = collect.mil_run(layout, run_dir)
        run["plot"] = roc_plot(run["curves"]) if run.get("curves") else None
        run["km_plot"] = km_plot(run["km"]) if run.get("km") else None
        runs.append(run)
    compared = collect.comparison(layout, run_dirs) if len(run_dirs) > 1 else None
    summary = [("slides", len(ids)), ("ok", counts["ok"]), ("failed", counts["failed"]),
               ("incomplete", counts["incomplete"]), ("total patches", f"{total_patches:,}"),
               ("total tissue area", f"{total_area:.1f} mm²"), ("feature bags", n_bags), ("MIL runs", len(runs))]
    pre = collect.preflight_line(layout)
    if pre:
        summary.append(("pre-flight estimate", pre))
    text = render({
        "title": f"wsipipe cohort report — {results.name or results}", "results": str(results), "tag": tag,
        "now": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "version": __version__,
        "report_version": STAGE_VERSIONS["report"], "n_random": n_random, "n_bags": n_bags, "counts": counts,
        "cohort_failures": cohort_fail, "n_default_mpp": n_default_mpp, "summary": summary, "rows": rows,
        "mil_runs": runs, "comparison": compared, "other_heatmaps": [link(h) for h in other_heatmaps],
        "failure_groups": collect.failure_summary(failed_by_slide), "cohort": collect.cohort_check(layout),
    })
    write_text_atomic(out_html, text)
    return {"out": str(out_html), "slides": len(ids), **counts, "total_patches": total_patches,
            "random_weight_bags": n_random, "mil_runs": len(runs), "bytes": len(text.encode("utf-8"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="wsipipe report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="results folder")
    ap.add_argument("--out", required=True, help="HTML file to write")
    ap.add_argument("--settings", default=None, help="the report settings as a JSON object (defaults of the "
                                                     "options below)")
    ap.add_argument("--tag", default=None, help="feature tag (folder under features/ and mil/); default: all")
    ap.add_argument("--mil-model", action="append", default=None,
                    help="MIL run under mil/{tag}/ (repeatable); default: all")
    ap.add_argument("--slides", nargs="*", default=None,
                    help="slide ids to report (default: every slide with an output or a recorded failure)")
    ap.add_argument("--slides-file", default=None, help="file with the slide ids to report, one per line")
    ap.add_argument("--image-max-px", type=int, default=IMAGE_MAX_PX, help="longest side of embedded images")
    a = parse_with_settings(ap, argv)
    setup()
    if not Path(a.results).is_dir():
        log.error("%s: no such results folder", a.results)
        return 1
    slides = a.slides
    if a.slides_file:
        try:
            slides = [s for s in Path(a.slides_file).read_text(encoding="utf-8").splitlines() if s]
        except OSError as exc:
            log.error("%s: cannot read the slide list (%s)", a.slides_file, exc.strerror or exc)
            return 1
    res = build_report(a.results, a.out, slides=slides, tag=a.tag, mil_model=a.mil_model,
                       image_max_px=max(64, a.image_max_px))
    log.info("%s: %d slide(s) (%d ok, %d failed, %d incomplete), %s patches, %d MIL run(s), %.2f MB", res["out"],
             res["slides"], res["ok"], res["failed"], res["incomplete"], f"{res['total_patches']:,}",
             res["mil_runs"], res["bytes"] / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
