"""The Snakemake workflow: dry run, config validation, an end-to-end run on synthetic slides, rerun
behaviour read from Snakemake's own dry-run output, and broken inputs with --keep-going."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import list_bags, read_bag

FAST = {
    "features": {"model": "test_resnet", "batch_size": 16, "num_workers": 0, "device": "cpu", "slides_per_job": 2},
    "mil": {"model": "abmil", "folds": 2, "epochs": 8, "patience": 4, "seed": 0},
}


def snakemake(root, env, *args, check=True, timeout=600):
    cmd = ["snakemake", "--snakefile", str(root / "Snakefile"), "--directory", str(root), "--cores", "2", *args]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_config(path: Path, slides: Path, results: Path, labels: Path | None, extra: dict | None = None) -> Path:
    import yaml

    cfg = {"slides_dir": str(slides), "results_dir": str(results), "labels_csv": str(labels) if labels else None}
    for k, v in FAST.items():
        cfg[k] = dict(v)
    for k, v in (extra or {}).items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def planned_jobs(proc) -> dict[str, int]:
    """Job counts per rule from a dry run's 'Job stats' table (empty when nothing to do)."""
    out = proc.stdout + proc.stderr
    counts: dict[str, int] = {}
    m = re.search(r"Job stats:\n(.*?)\n\s*total\s+\d+", out, re.S)
    if not m:
        return counts
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def run(cohort, root, env_with_venv, tmp_path_factory):
    """One full run of the DAG on the synthetic cohort."""
    work = tmp_path_factory.mktemp("wf")
    results = work / "results"
    cfg = write_config(work / "config.yaml", cohort, results, cohort / "labels.csv")
    snakemake(root, env_with_venv, "--configfile", str(cfg))
    return {"cfg": cfg, "results": results, "work": work}


def test_dry_run_lists_every_stage(cohort, root, env_with_venv, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", cohort, tmp_path / "r", cohort / "labels.csv")
    jobs = planned_jobs(snakemake(root, env_with_venv, "-n", "--configfile", str(cfg)))
    n = len(list(cohort.glob("slide_*")))
    batches = -(-n // FAST["features"]["slides_per_job"])  # one feature job per batch of slides
    assert jobs == {"tissue": n, "grid": n, "features": batches, "mil_train": 1, "mil_predict": 1,
                    "mil_compare": 1, "heatmap": n, "report": 1, "all": 1}
    # without labels: features only, no training
    cfg = write_config(tmp_path / "c2.yaml", cohort, tmp_path / "r", None)
    jobs = planned_jobs(snakemake(root, env_with_venv, "-n", "--configfile", str(cfg)))
    assert "mil_train" not in jobs and jobs["features"] == batches


def test_invalid_config_names_the_key(cohort, root, env_with_venv, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", cohort, tmp_path / "r", None, {"grid": {"patchsize": 256}})
    proc = snakemake(root, env_with_venv, "-n", "--configfile", str(cfg), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config key grid" in out and "'patchsize' was unexpected" in out
    cfg = write_config(tmp_path / "c.yaml", cohort, tmp_path / "r", None, {"grid": {"target_mpp": -1}})
    proc = snakemake(root, env_with_venv, "-n", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0 and "config key grid.target_mpp" in proc.stdout + proc.stderr


def test_end_to_end_outputs(run, cohort):
    results = run["results"]
    slides = sorted(p.stem for p in cohort.glob("slide_*"))
    for s in slides:
        tdir = results / "tissue" / s
        for f in ("mask.png", "thumbnail.png", "tissue.geojson", "tissue.json"):
            assert (tdir / f).is_file(), f
        assert json.loads((tdir / "tissue.geojson").read_text())["type"] == "FeatureCollection"
        grid = json.loads((results / "grid" / f"{s}.json").read_text())
        assert grid["read_plan"]["requested_mpp"] == 0.5 and grid["n_patches"] > 0
    bags = list_bags(results / "features" / "test_resnet")
    assert [b.stem for b in bags] == slides
    for b in bags:
        bag = read_bag(b)
        assert bag.n == json.loads((results / "grid" / f"{b.stem}.json").read_text())["n_patches"]
        assert bag.attrs["weights"] == "random" and bag.attrs["target_mpp"] == 0.5
    mil = results / "mil" / "test_resnet" / "abmil"
    metrics = json.loads((mil / "metrics.json").read_text())
    assert len(metrics["folds"]) == 2 and set(metrics["mean"]) >= {"auc", "balanced_accuracy", "accuracy"}
    with open(mil / "predictions.csv") as fh:
        oof = list(csv.DictReader(fh))
    assert sorted(r["slide_id"] for r in oof) == slides
    with open(mil / "predictions_all.csv") as fh:
        preds = list(csv.DictReader(fh))
    assert sorted(r["slide_id"] for r in preds) == slides
    assert all(0.0 <= float(r["prob"]) <= 1.0 for r in preds)
    for s in slides:
        with open(mil / "attention" / f"{s}.csv") as fh:
            att = list(csv.DictReader(fh))
        bag = read_bag(results / "features" / "test_resnet" / f"{s}.zarr")
        assert np.array_equal(np.array([[int(r["x"]), int(r["y"])] for r in att]).reshape(-1, 2), bag.coords)
    for stage in ("tissue", "grid"):
        assert len(list((results / "logs" / stage).glob("*.log"))) == len(slides)
    for s in slides:
        assert (results / "heatmaps" / "test_resnet" / "abmil" / f"{s}.png").is_file()
        gj = json.loads((results / "heatmaps" / "test_resnet" / "abmil" / f"{s}.geojson").read_text())
        assert len(gj["features"]) == read_bag(results / "features" / "test_resnet" / f"{s}.zarr").n
    html = (results / "report" / "index.html").read_text()
    assert all(s in html for s in slides) and "<svg" in html


def test_feature_jobs_run_in_batches_one_gpu_at_a_time(run, cohort):
    """One feature job per batch of slides_per_job slides, one encoder each; the default profile declares one
    GPU, so with --cores 2 the feature jobs still run one after the other."""
    manifests = sorted((run["results"] / "features" / "test_resnet" / ".batches").glob("*.json"))
    slides = sorted(p.stem for p in cohort.glob("slide_*"))
    assert len(manifests) == -(-len(slides) // FAST["features"]["slides_per_job"])
    recs = [json.loads(m.read_text()) for m in manifests]
    assert sorted(s for r in recs for s in r["slides"]) == slides
    assert all(v["status"] == "encoded" for r in recs for v in r["slides"].values())
    spans = sorted((r["started"], r["finished"]) for r in recs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_nothing_to_do_on_rerun(run, root, env_with_venv):
    jobs = planned_jobs(snakemake(root, env_with_venv, "-n", "--configfile", str(run["cfg"])))
    assert jobs == {}


@pytest.mark.parametrize("change, expected", [
    ({"tissue": {"seg_mpp": 16.0}}, {"tissue", "grid", "features", "mil_train", "mil_predict", "mil_compare",
                                     "heatmap", "report"}),
    ({"grid": {"min_tissue_fraction": 0.5}}, {"grid", "features", "mil_train", "mil_predict", "mil_compare",
                                              "heatmap", "report"}),
    ({"features": {"seed": 3}}, {"features", "mil_train", "mil_predict", "mil_compare", "heatmap", "report"}),
    ({"mil": {"epochs": 9}}, {"mil_train", "mil_predict", "mil_compare", "heatmap", "report"}),
])
def test_rerun_scope_follows_the_changed_section(run, root, env_with_venv, change, expected):
    import yaml

    cfg = yaml.safe_load(run["cfg"].read_text())
    for k, v in change.items():
        cfg.setdefault(k, {}).update(v)
    changed = run["work"] / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(root, env_with_venv, "-n", "--configfile", str(changed)))
    assert set(jobs) - {"all"} == expected, jobs


@pytest.fixture(scope="module")
def broken_folder(cohort, tmp_path_factory):
    from pipeline.synthetic import make_blank_slide, make_slide

    slides = tmp_path_factory.mktemp("broken") / "slides"
    slides.mkdir()
    shutil.copy(cohort / "slide_000.tif", slides / "good one é.tif")
    (slides / "empty.svs").write_bytes(b"")
    (slides / "text.tif").write_text("not a slide\n")
    make_slide(slides / "nompp.tif", width=1024, height=768, seed=2, flavour="tiff", write_mpp=False)
    make_blank_slide(slides / "blank.tif", width=1024, height=768, mpp=0.5)
    return slides


BROKEN = (("empty", "empty"), ("text", "cannot open"), ("nompp", "mpp"))


def _failures_tsv(results: Path) -> dict[str, list[str]]:
    lines = (results / "failures.tsv").read_text().splitlines()
    assert lines[0] == "slide_id\tstage\treason\tpath"
    return {row.split("\t")[0]: row.split("\t") for row in lines[1:]}


def test_broken_slides_skipped_and_reported(broken_folder, root, env_with_venv, tmp_path):
    results = tmp_path / "results"
    cfg = write_config(tmp_path / "c.yaml", broken_folder, results, None)  # on_slide_error: skip (default)
    proc = snakemake(root, env_with_venv, "--configfile", str(cfg))
    bags = results / "features" / "test_resnet"
    assert read_bag(bags / "good one é.zarr").n > 0
    blank = read_bag(bags / "blank.zarr")
    assert blank.n == 0 and blank.attrs.get("status") != "failed"  # no tissue: a valid empty bag, not an error
    fails = _failures_tsv(results)
    assert set(fails) == {name for name, _ in BROKEN}
    for name, reason in BROKEN:
        sid, stage, why, path = fails[name]
        assert stage == "tissue" and reason in why and path.endswith(Path(path).name) and name in path
        failed = read_bag(bags / f"{name}.zarr")  # explicit failed outputs so the DAG goes on
        assert failed.n == 0 and failed.attrs["status"] == "failed" and reason in failed.attrs["error"]
        assert json.loads((results / "grid" / f"{name}.json").read_text())["status"] == "failed"
        log = (results / "logs" / "tissue" / f"{name}.log").read_text()
        err = [line for line in log.splitlines() if line.startswith("ERROR")]
        assert len(err) == 1 and str(broken_folder / name) in err[0] and reason in err[0], log
    out = proc.stdout + proc.stderr
    assert "3 slide(s) failed" in out and "nompp [tissue]" in out


def test_broken_slides_fail_mode_keeps_going(broken_folder, root, env_with_venv, tmp_path):
    results = tmp_path / "results"
    cfg = write_config(tmp_path / "c.yaml", broken_folder, results, None, {"on_slide_error": "fail"})
    proc = snakemake(root, env_with_venv, "--configfile", str(cfg), "--keep-going", check=False)
    assert proc.returncode != 0
    bags = results / "features" / "test_resnet"
    good = bags / "good one é.zarr"
    assert read_bag(good).n > 0 and read_bag(bags / "blank.zarr").n == 0
    for name, reason in BROKEN:
        assert not (bags / f"{name}.zarr").exists() and not (results / "grid" / f"{name}.json").exists()
    assert set(_failures_tsv(results)) == {name for name, _ in BROKEN}
    # a second run redoes nothing that was finished
    stamp = (good / "zarr.json").stat().st_mtime_ns
    snakemake(root, env_with_venv, "--configfile", str(cfg), "--keep-going", check=False)
    assert (good / "zarr.json").stat().st_mtime_ns == stamp


def test_lint_is_clean(cohort, root, env_with_venv, tmp_path):
    proc = snakemake(root, env_with_venv, "--lint", "--config", f"slides_dir={cohort}", f"results_dir={tmp_path}")
    assert "good condition" in proc.stdout + proc.stderr


def test_hub_weights_are_prefetched_once_before_feature_jobs(cohort, root, env_with_venv, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", cohort, tmp_path / "r", None,
                       {"features": {"model": "uni", "pretrained": True}})
    proc = snakemake(root, env_with_venv, "-n", "--configfile", str(cfg))
    jobs = planned_jobs(proc)
    assert jobs["prefetch_weights"] == 1 and jobs["features"] == -(-len(list(cohort.glob("slide_*"))) // 2)
    assert "--weights-lock" in proc.stdout


def test_features_cli_uses_the_pinned_weights(cohort, tmp_path):
    from safetensors.torch import save_file

    from pipeline.__main__ import main
    from pipeline.features import create_encoder
    from pipeline.files import sha256_file

    slide = cohort / "slide_000.tif"
    assert main(["tissue", "--slide", str(slide), "--out-dir", str(tmp_path / "t")]) == 0
    assert main(["grid", "--slide", str(slide), "--tissue-dir", str(tmp_path / "t"), "--out", str(tmp_path / "g.json"),
                 "--settings", json.dumps({"patch_size": 128, "target_mpp": 2.0})]) == 0
    enc = create_encoder("test_resnet", seed=11)
    wfile = tmp_path / "hub" / "model.safetensors"
    wfile.parent.mkdir()
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(wfile))
    lock = tmp_path / "test_resnet.lock.json"
    lock.write_text(json.dumps({"name": "test_resnet", "path": str(wfile), "sha256": sha256_file(wfile)}))
    settings = json.dumps({"model": "test_resnet", "pretrained": True, "num_workers": 0, "device": "cpu"})
    assert main(["features", "--slide", str(slide), "--grid", str(tmp_path / "g.json"), "--out",
                 str(tmp_path / "b.zarr"), "--weights-lock", str(lock), "--settings", settings]) == 0
    bag = read_bag(tmp_path / "b.zarr")
    assert bag.attrs["weights"]["sha256"] == sha256_file(wfile) and bag.n > 0


def test_second_run_on_same_results_is_refused(cohort, root, env_with_venv, tmp_path):
    import sys

    results = tmp_path / "results"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.runlock import acquire; "
                               f"acquire({str(results)!r}); print('held', flush=True); time.sleep(120)"],
                              cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = write_config(tmp_path / "c.yaml", cohort, results, None)
        proc = snakemake(root, env_with_venv, "--configfile", str(cfg), check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "another run is already using this results folder" in out
        assert f"pid {holder.pid}" in out
        assert not (results / "tissue").exists()  # nothing ran
        assert planned_jobs(snakemake(root, env_with_venv, "-n", "--configfile", str(cfg)))  # dry runs still work
    finally:
        holder.kill()
        holder.wait()


def rows_of(cohort: Path) -> list[str]:
    return (cohort / "labels.csv").read_text().splitlines()[1:]


def _changed_labels(run, cohort, edit) -> Path:
    import yaml

    rows = (cohort / "labels.csv").read_text().splitlines()
    new = run["work"] / "labels_changed.csv"
    new.write_text("\n".join(edit(rows)) + "\n")
    cfg = yaml.safe_load(run["cfg"].read_text())
    cfg["labels_csv"] = str(new)
    out = run["work"] / "labels_changed.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_editing_labels_reruns_only_mil(run, cohort, root, env_with_venv):
    def flip_first(rows):
        sid, label, patient = rows[1].split(",")
        return [rows[0], f"{sid},{1 - int(label)},{patient}", *rows[2:]]

    cfg = _changed_labels(run, cohort, flip_first)
    jobs = planned_jobs(snakemake(root, env_with_venv, "-n", "--configfile", str(cfg)))
    assert set(jobs) - {"all"} == {"mil_train", "mil_predict", "mil_compare", "heatmap", "report"}, jobs


def test_manifest_mpp_of_one_slide_reruns_that_slide(run, cohort, root, env_with_venv):
    def add_mpp(rows):
        out = [rows[0] + ",mpp"]
        for i, row in enumerate(rows[1:]):
            out.append(row + (",0.52" if i == 0 else ","))
        return out

    cfg = _changed_labels(run, cohort, add_mpp)
    jobs = planned_jobs(snakemake(root, env_with_venv, "-n", "--configfile", str(cfg)))
    assert {k: v for k, v in jobs.items() if k != "all"} == {
        "tissue": 1, "grid": 1, "features": 1, "mil_train": 1, "mil_predict": 1, "mil_compare": 1,
        "heatmap": len(rows_of(cohort)), "report": 1}, jobs


def test_reruns_follow_slide_content_not_mtime(cohort, root, env_with_venv, tmp_path):
    import os

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("slide_000.tif", "slide_002.tif"):
        shutil.copy(cohort / name, slides / name)
    cfg = write_config(tmp_path / "c.yaml", slides, tmp_path / "results", None)
    snakemake(root, env_with_venv, "--configfile", str(cfg))
    # touching (or an rsync that rewrites modification times) reruns nothing
    for p in slides.iterdir():
        os.utime(p)
    assert planned_jobs(snakemake(root, env_with_venv, "-n", "--configfile", str(cfg))) == {}
    # a different slide under the same name, even with an older modification time, reruns that slide only
    old = (slides / "slide_002.tif").stat()
    shutil.copy(cohort / "slide_004.tif", slides / "slide_002.tif")
    os.utime(slides / "slide_002.tif", ns=(old.st_atime_ns, old.st_mtime_ns - 10**12))
    proc = snakemake(root, env_with_venv, "-n", "--configfile", str(cfg))
    assert {k: v for k, v in planned_jobs(proc).items() if k != "all"} == {"tissue": 1, "grid": 1, "features": 1,
                                                                           "report": 1}
    assert "slide=slide_002" in proc.stdout and "slide=slide_000" not in proc.stdout
    summary = snakemake(root, env_with_venv, "--summary", "--configfile", str(cfg)).stdout
    tissue_rows = [line for line in summary.splitlines() if "/tissue/slide_002/tissue.json" in line]
    assert tissue_rows and "params" in tissue_rows[0], summary[-2000:]
    # the rerun re-encodes the replaced slide only: the other bag of its feature batch is not touched
    bags = tmp_path / "results" / "features" / "test_resnet"
    kept = (bags / "slide_000.zarr" / "zarr.json").stat()
    snakemake(root, env_with_venv, "--configfile", str(cfg))
    after = (bags / "slide_000.zarr" / "zarr.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    manifest = json.loads(next((bags / ".batches").glob("*.json")).read_text())
    assert {s: v["status"] for s, v in manifest["slides"].items()} == {"slide_000": "cached",
                                                                        "slide_002": "encoded"}
    assert read_bag(bags / "slide_002.zarr").attrs["cache_key"] == manifest["slides"]["slide_002"]["cache_key"]
