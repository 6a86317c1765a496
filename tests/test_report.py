"""Cohort QC report and pre-flight estimate, on a tiny results folder made by the real stages."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline import preflight, report
from pipeline.features.extract import extract_slide
from pipeline.grid import load_grid, make_grid, run_grid
from pipeline.slide import open_slide
from pipeline.synthetic import make_slide
from pipeline.tissue import load_mask, run_tissue

TAG = "test_resnet"
GRID = {"patch_size": 64, "target_mpp": 2.0}  # 256 level-0 px on a 0.5 µm/px scan: a few dozen patches
FEATURES = {"model": TAG, "batch_size": 16, "chunk_rows": 16, "num_workers": 0, "device": "cpu"}
HOSTILE = "a <b> & ü"
HOSTILE_REASON = "cannot open <file> & \"quotes\""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """slide_a, slide_b: tissue + grid + bag; slide_c: tissue only (no grid yet); a failures.tsv naming a
    slide with a hostile name; a binary and a three-class MIL run; one heatmap image."""
    d = tmp_path_factory.mktemp("report")
    res = d / "results"
    for i, sid in enumerate(("slide_a", "slide_b", "slide_c")):
        path = make_slide(d / "slides" / f"{sid}.tif", width=1536, height=1024, mpp=0.5, seed=i,
                          positive=bool(i % 2))["path"]
        with open_slide(path) as s:
            run_tissue(s, res / "tissue" / sid)
            if sid == "slide_c":
                continue
            gpath = res / "grid" / f"{sid}.json"
            run_grid(s, res / "tissue" / sid, gpath, GRID)
            extract_slide(s, load_grid(gpath), gpath, res / "features" / TAG / f"{sid}.zarr", FEATURES)
    (res / "failures.tsv").write_text("slide_id\tstage\treason\tpath\n"
                                      f"{HOSTILE}\ttissue\t{HOSTILE_REASON}\t/data/{HOSTILE}.svs\n",
                                      encoding="utf-8")
    mil = res / "mil" / TAG / "abmil"
    mil.mkdir(parents=True)
    (mil / "metrics.json").write_text(json.dumps({
        "folds": [{"fold": 0, "n_test": 3, "auc": 0.5, "balanced_accuracy": 0.5, "accuracy": 0.67},
                  {"fold": 1, "n_test": 3, "auc": 1.0, "balanced_accuracy": 1.0, "accuracy": 1.0}],
        "mean": {"auc": 0.75, "balanced_accuracy": 0.75, "accuracy": 0.83},
        "classes": [0, 1], "positive_class": 1, "task": "classification", "model": "abmil", "mode": "cv",
        "n_bags": 6}))
    (mil / "predictions.csv").write_text("slide_id,label,prob\ns1,0,0.1\ns2,0,0.6\ns3,1,0.4\ns4,1,0.8\n"
                                         "s5,1,0.9\ns6,0,0.2\n")
    multi = res / "mil" / TAG / "multi"
    multi.mkdir(parents=True)
    (multi / "metrics.json").write_text(json.dumps({
        "folds": [{"fold": 0, "auc": 0.9}], "mean": {"auc": 0.9}, "classes": ["x", "y", "z"],
        "task": "classification", "model": "abmil", "mode": "cv", "n_bags": 6}))
    (multi / "predictions.csv").write_text(
        "slide_id,label,pred,prob_x,prob_y,prob_z\n"
        "s1,x,x,0.7,0.2,0.1\ns2,y,y,0.1,0.8,0.1\ns3,z,z,0.2,0.2,0.6\n"
        "s4,x,y,0.4,0.5,0.1\ns5,y,y,0.3,0.6,0.1\ns6,z,x,0.5,0.1,0.4\n")
    (res / "heatmaps" / "slide_a").mkdir(parents=True)
    (res / "heatmaps" / "slide_a" / "attention.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return res


@pytest.fixture(scope="module")
def page(results) -> str:
    out = results / "report" / "index.html"
    summary = report.build_report(results, out, tag=TAG)
    assert summary["slides"] == 4 and summary["failed"] == 1 and summary["random_weight_bags"] == 2
    return out.read_text(encoding="utf-8")


def test_report_contents(page, results):
    for sid in ("slide_a", "slide_b", "slide_c"):
        assert f"<b>{sid}</b>" in page
    # the hostile name and reason appear escaped, never raw
    assert "a &lt;b&gt; &amp; ü" in page and HOSTILE not in page
    assert "cannot open &lt;file&gt; &amp; &quot;quotes&quot;" in page and HOSTILE_REASON not in page
    assert "Random encoder weights" in page
    # mpp and its source, requested/effective µm/px, patch counts from the grids
    assert "openslide.mpp-x" in page and "2.0000 / 2.0000 (64 px)" in page
    for sid in ("slide_a", "slide_b"):
        n = json.loads((results / "grid" / f"{sid}.json").read_text())["n_patches"]
        assert f"present, N={n}, weights random" in page
    assert "no grid yet" in page  # slide_c
    # embedded images decode, one per slide with a thumbnail
    imgs = re.findall(r'src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == 3
    for kind, b64 in imgs:
        raw = base64.b64decode(b64)
        assert raw[:4] == b"\x89PNG" if kind == "png" else raw[:2] == b"\xff\xd8"
    # MIL: tables, ROC curves (binary + three one-vs-rest), the pooled AUC of the binary run
    assert page.count("<svg") == 2 and page.count("<polyline") == 4
    assert "x vs rest" in page and "positive class 1: AUC 0.889" in page
    assert "test_resnet/abmil" in page and "test_resnet/multi" in page
    # relative link to the heatmap, no external URL anywhere
    assert 'href="../heatmaps/slide_a/attention.png"' in page
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)
    assert "http://" not in page and "https://" not in page
    # written atomically: no temporary siblings left
    assert sorted(p.name for p in (results / "report").iterdir()) == ["index.html"]


def test_overview_draws_the_patch_grid(results):
    import cv2

    rec = report.slide_record(results, "slide_a", TAG)
    plain = cv2.imread(str(rec["thumbnail"]))
    uri = report.overview_image(rec, max_px=10_000)
    img = cv2.imdecode(np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == plain.shape  # not resized: same geometry as the thumbnail
    changed = np.abs(img.astype(int) - plain.astype(int)).sum(axis=2) > 60
    # the grid is drawn where the patches are (scaled from level-0 coords)
    g = json.loads((results / "grid" / "slide_a.json").read_text())
    x, y = g["coords"][0]
    s = img.shape[1] / g["slide"]["dimensions"][0]
    assert changed[int(y * s):int(y * s) + 3, int(x * s):int((x + 256) * s)].any()
    assert changed.mean() < 0.5


def test_report_tolerates_missing_pieces(tmp_path, results):
    # an empty folder, unknown slides, a corrupt grid: a report, not an exception
    assert report.build_report(tmp_path / "empty", tmp_path / "r0.html")["slides"] == 0
    bad = tmp_path / "res"
    (bad / "grid").mkdir(parents=True)
    (bad / "grid" / "x.json").write_text("{not json")
    s = report.build_report(bad, tmp_path / "r1.html", slides=["x", "nothing here"], tag=TAG)
    html = (tmp_path / "r1.html").read_text(encoding="utf-8")
    assert s["incomplete"] == 2 and "unreadable x.json" in html and "No MIL results" in html
    # the CLI, restricted to one slide and one MIL run
    out = tmp_path / "r2.html"
    assert report.main(["--results", str(results), "--out", str(out), "--tag", TAG, "--mil-model", "abmil",
                        "--slides", "slide_b"]) == 0
    html = out.read_text(encoding="utf-8")
    assert "slide_b" in html and "slide_a</b>" not in html and "test_resnet/multi" not in html


def test_failed_outputs_and_stale_failures(tmp_path, results):
    import shutil

    res = tmp_path / "res"
    shutil.copytree(results, res)
    # on_slide_error=skip writes explicit failed outputs; the per-slide record is the current failure
    (res / "grid" / "slide_b.json").write_text(json.dumps({"slide_id": "slide_b", "status": "failed",
                                                           "stage": "grid", "error": "too <small>",
                                                           "n_patches": 0, "coords": [], "read_plan": None}))
    (res / "failures").mkdir()
    (res / "failures" / "slide_b.json").write_text(json.dumps({"slide_id": "slide_b", "stage": "grid",
                                                               "reason": "too <small>", "path": "x"}))
    s = report.build_report(res, res / "r.html", tag=TAG)
    html = (res / "r.html").read_text(encoding="utf-8")
    assert s["failed"] == 1 and "grid: too &lt;small&gt;" in html
    # the tsv row of the hostile slide has no current record: shown as resolved, not failed
    assert "earlier failure, since resolved" in html


def test_roc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.random(200) + 0.5 * y, 1)  # many ties
    fpr, tpr, auc = report.roc_curve(y, score)
    assert auc == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert report.roc_curve([1, 1], [0.2, 0.3]) is None


def test_preflight_with_given_throughput(results, tmp_path, capsys):
    out = tmp_path / "pre.json"
    assert preflight.main(["--results", str(results), "--model", TAG, "--throughput", "100",
                           "--out", str(out)]) == 0
    est = json.loads(out.read_text())
    rows = {r["slide_id"]: r for r in est["slides"]}
    n = {sid: json.loads((results / "grid" / f"{sid}.json").read_text())["n_patches"] for sid in ("slide_a", "slide_b")}
    assert rows["slide_a"]["source"] == rows["slide_b"]["source"] == "grid"
    assert rows["slide_a"]["patches"] == n["slide_a"] and rows["slide_b"]["patches"] == n["slide_b"]
    assert rows["slide_c"]["source"] == "mask"
    assert est["total_patches"] == sum(r["patches"] for r in est["slides"])
    assert est["total_seconds"] == pytest.approx(est["total_patches"] / 100)
    assert est["patch_size"] == 64 and est["target_mpp"] == 2.0  # taken from the grids
    printed = capsys.readouterr().out
    assert "total" in printed and "keeps up with the model" in printed

    grid_only = preflight.estimate(results, ["slide_a", "slide_b"], TAG, throughput=100)
    assert grid_only["total_seconds"] == pytest.approx(sum(n.values()) / 100)


def test_preflight_mask_fallback_is_plausible(results, tmp_path):
    est = preflight.estimate(results, ["slide_c"], TAG, throughput=50, patch_size=64, target_mpp=2.0)
    row = est["slides"][0]
    # what the grid stage would produce from the same mask
    mask, ds = load_mask(results / "tissue" / "slide_c")
    with open_slide(results.parent / "slides" / "slide_c.tif") as s:
        expected = make_grid(s, mask, ds, GRID)["n_patches"]
    assert row["patches"] == expected > 0
    assert 0.5 < row["patches"] / row["area_estimate"] < 2.0  # and close to tissue area / patch area
    assert preflight.human_seconds(3725) == "1 h 02 min" and preflight.human_seconds(59) == "59 s"


def test_preflight_measures_throughput(results):
    est = preflight.estimate(results, ["slide_a"], TAG, batch_size=4, device="cpu", patch_size=64,
                             bench_seconds=0.2)
    assert est["throughput_source"] == "measured" and est["throughput_patches_per_s"] > 0
    assert est["total_seconds"] == pytest.approx(est["total_patches"] / est["throughput_patches_per_s"])


def test_heatmap_beside_thumbnail_and_cohort_summary(tmp_path, results):
    """Issue 13: each slide's heatmap is embedded next to its thumbnail; failures are summarised by stage and
    kind of reason (paths and numbers taken out); the cohort check written at start is shown."""
    import shutil

    import cv2

    res = tmp_path / "res"
    shutil.copytree(results, res)
    heat = res / "heatmaps" / TAG / "abmil"
    heat.mkdir(parents=True)
    cv2.imwrite(str(heat / "slide_b.png"), np.full((40, 60, 3), (0, 0, 255), np.uint8))
    (res / "failures").mkdir()
    for sid, path in (("x1", "/data/x1.svs"), ("x2", "/other/x2.svs")):
        (res / "failures" / f"{sid}.json").write_text(json.dumps(
            {"slide_id": sid, "stage": "tissue", "reason": f"{path}: file is empty (0 bytes)", "path": path}))
    (res / "failures" / "x3.json").write_text(json.dumps(
        {"slide_id": "x3", "stage": "features", "reason": "disk full", "path": "/d/x3.svs"}))
    (res / "cohort.json").write_text(json.dumps({
        "n_slides": 3, "n_rows": 3, "rows_without_slide": ["ghost"], "slides_without_label": ["slide_c"],
        "missing_files": {}, "counts": {"rows_without_slide": 1, "slides_without_label": 1, "missing_files": 0},
        "labels": "labels.csv", "notes": ["label image a.dcm is not a slide"]}))
    report.build_report(res, res / "r.html", tag=TAG)
    page = (res / "r.html").read_text(encoding="utf-8")
    row_b = page[page.index("<b>slide_b</b>"):page.index("</tr>", page.index("<b>slide_b</b>"))]
    assert row_b.count('src="data:image/') == 2 and 'alt="heatmap abmil/slide_b.png"' not in row_b
    assert "heatmap test_resnet/abmil/slide_b.png" in row_b
    assert "Failures by stage and reason" in page
    summary = page[page.index("Failures by stage and reason"):page.index("</table>", page.index("Failures by"))]
    assert "…: file is empty (N bytes)" in summary and "2: x1, x2" in summary and "disk full" in summary
    assert "1 row(s) of labels.csv have no slide: ghost" in page and "have no label" in page
    assert "1 file(s) left out of the slides" in page
