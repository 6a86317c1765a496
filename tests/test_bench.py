"""The benchmark CLI runs and reports what it measured (no speed is asserted here: speed goals live in
docs/benchmarks.md, measured with `python -m pipeline.bench`)."""

from __future__ import annotations

import json

from pipeline.bench import main
from pipeline.synthetic import make_slide


def _run(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_modes_report_json(tmp_path, capsys):
    slide = str(make_slide(tmp_path / "s.svs", width=2048, height=1536, mpp=0.25, seed=2, positive=True)["path"])
    r = _run(capsys, ["read", "--slide", slide, "--target-mpp", "0.5", "--size", "224", "--workers", "2"])
    assert r["mode"] == "read" and r["patches"] > 0 and r["patches_per_s"] > 0
    assert r["baseline_patches_per_s"] > 0 and r["ratio_vs_baseline"] > 0
    assert r["read_plan"]["patch_size_level0_px"] == 448
    m = _run(capsys, ["model", "--model", "test_resnet", "--size", "64", "--batch-size", "8", "--device", "cpu",
                      "--seconds", "0.5"])
    assert m["mode"] == "model" and m["patches_per_s"] > 0 and m["device"] == "cpu"
    e = _run(capsys, ["extract", "--slide", slide, slide, "--model", "test_resnet", "--target-mpp", "2.0",
                      "--size", "64", "--batch-size", "8", "--device", "cpu", "--workers", "1"])
    assert e["mode"] == "extract" and e["patches"] > 0 and e["ratio_vs_model"] > 0


def test_bench_slide_reports_time_and_memory(tmp_path, capsys):
    out = tmp_path / "b.svs"
    r = _run(capsys, ["slide", str(out), "--width", "768", "--height", "512", "--mpp", "0.25", "--seed", "3"])
    assert r["mode"] == "slide" and r["flavour"] == "svs" and r["width"] == 768 and r["mpp"] == 0.25
    assert out.exists() and r["file_mb"] > 0 and r["seconds"] >= 0
    assert r["peak_rss_mb"] >= r["rss_before_mb"] > 0
