"""The benchmark CLI runs and reports what it measured (no speed is asserted here: speed goals live in
docs/benchmarks.md, measured with `python -m pipeline.bench`)."""

from __future__ import annotations

import json

import pytest

from pipeline.bench import main
from pipeline.synthetic import make_slide


def _run(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_modes_report_json(tmp_path, capsys, one_torch_thread):
    slide = str(make_slide(tmp_path / "s.svs", width=2048, height=1536, mpp=0.25, seed=2, positive=True)["path"])
    r = _run(capsys, ["read", "--slide", slide, "--target-mpp", "0.5", "--size", "224", "--workers", "1,2"])
    assert r["mode"] == "read" and r["patches"] > 0 and r["patches_per_s"] > 0
    assert set(r["by_workers"]) == {"1", "2"} and r["scaling"]["2/1"] > 0
    assert all(v["patches_per_s"] > 0 and v["tiles_decoded_per_patch"] > 0 and 0 < v["reader_busy_fraction"] <= 1.5
               for v in r["by_workers"].values())
    assert r["baseline_patches_per_s"] > 0 and r["ratio_vs_baseline"] > 0
    assert r["read_plan"]["patch_size_level0_px"] == 448
    m = _run(capsys, ["model", "--model", "test_resnet", "--size", "64", "--batch-size", "8", "--device", "cpu",
                      "--seconds", "0.5"])
    assert m["mode"] == "model" and m["patches_per_s"] > 0 and m["device"] == "cpu" and not m["ceiling"]
    c = _run(capsys, ["model", "--model", "test_resnet", "--size", "64", "--batch-size", "8", "--device", "cpu",
                      "--seconds", "0.5", "--ceiling"])
    assert c["ceiling"] and c["weights_dtype"] == "fp32" and c["patches_per_s"] > 0
    e = _run(capsys, ["extract", "--slide", slide, slide, "--model", "test_resnet", "--target-mpp", "2.0",
                      "--size", "64", "--batch-size", "8", "--device", "cpu", "--workers", "1", "--model-seconds", "0.5"])
    assert e["mode"] == "extract" and e["patches"] > 0 and e["ratio_vs_model"] > 0 and e["ratio_vs_ceiling"] > 0
    assert e["decoder"] == ["tiled-jpeg-direct"] and e["resize"] == ["cpu-cv2-inter_area"]


def test_bench_slide_reports_time_and_memory(tmp_path, capsys):
    out = tmp_path / "b.svs"
    r = _run(capsys, ["slide", str(out), "--width", "768", "--height", "512", "--mpp", "0.25", "--seed", "3"])
    assert r["mode"] == "slide" and r["flavour"] == "svs" and r["width"] == 768 and r["mpp"] == 0.25
    assert out.exists() and r["file_mb"] > 0 and r["seconds"] >= 0
    assert r["peak_rss_mb"] >= r["rss_before_mb"] > 0



def test_gpu_suite_needs_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the suite is a benchmark, run by hand (docs/benchmarks.md)")
    with pytest.raises(SystemExit, match="CUDA"):
        main(["gpu-suite", "--workdir", str(tmp_path)])


def test_bench_workflow_and_plan(tmp_path, capsys):
    """The workflow benchmarks run the real Snakemake workflow (functional check, no timing asserted)."""
    from pipeline.synthetic import make_cohort

    from safetensors.torch import save_file

    from pipeline.features import create_encoder
    from pipeline.files import sha256_file
    from pipeline.store import read_bag

    make_cohort(tmp_path / "s", n=2, width=1024, height=768, mpp=0.5, seed=5)
    wfile = tmp_path / "w.safetensors"  # as the GPU suite runs it: the model's weights from a file
    save_file({k: v.contiguous() for k, v in create_encoder("test_resnet", seed=4).model.state_dict().items()},
              str(wfile))
    r = _run(capsys, ["workflow", "--slides", str(tmp_path / "s"), "--model", "test_resnet", "--size", "64",
                      "--target-mpp", "2.0", "--batch-size", "8", "--device", "cpu", "--workers", "0",
                      "--cores", "2", "--results", str(tmp_path / "w"), "--weights", str(wfile),
                      "--repeats", "2"])
    assert r["mode"] == "workflow" and r["slides"] == 2 and r["feature_jobs"] == 1 and r["patches"] > 0
    assert r["repeats"] == 2 and len(r["ratio_each"]) == len(r["feature_stage_seconds_each"]) == 2
    assert min(r["ratio_each"]) <= r["ratio_vs_in_process"] <= max(r["ratio_each"])
    bags = sorted((tmp_path / "w" / "results" / "features").glob("*/*.zarr"))
    assert r["weights"] == "file" and len(bags) == 2
    assert {read_bag(b).attrs["weights"]["sha256"] for b in bags} == {sha256_file(wfile)}
    assert r["feature_stage_seconds"] > 0 and r["ratio_vs_in_process"] > 0 and r["in_process_patches_per_s"] > 0
    p = _run(capsys, ["plan", "--n", "30", "--work", str(tmp_path / "p")])
    assert p["mode"] == "plan" and p["slides"] == 30 and p["seconds"] > 0 and p["peak_rss_mb"] > 0
    assert p["jobs"] >= 3 * 30 + 2  # snakemake's count: tissue, grid, heatmap per slide, batches, MIL, report
