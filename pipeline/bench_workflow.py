"""Benchmarks of the path users run: the Snakemake workflow itself (``python -m pipeline.bench workflow``)
and the planning of large cohorts (``python -m pipeline.bench plan``). Each prints one JSON line.

``workflow``: tissue and grids are made first (untimed); then the feature stage runs through
``snakemake`` (batched feature jobs, as users run it) and is timed from the first feature job's start to
the last one's end (the manifests' ``started``/``finished``), and as the whole ``snakemake`` invocation;
then the same grids are extracted in one process with a model built and warmed up beforehand (as
``bench extract`` does) and the ratio workflow / in-process is reported.

``plan``: N slide files (placeholders: planning never opens a slide) and a labels CSV, then ``snakemake
-n`` twice; the second invocation's wall time and peak memory are reported (the first also computes and
caches the slides' content fingerprints).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _snakemake(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 7200
               ) -> tuple[subprocess.CompletedProcess, float]:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, **(env or {}), "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    cmd = [os.path.join(bindir, "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(ROOT),
           *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, dt


def bench_workflow(slides_dir: str, model: str, target_mpp: float = 0.5, size: int = 224, batch_size: int = 64,
                   device: str = "auto", workers: int = 2, slides_per_job: int = 16, cores: int | None = None,
                   results: str | None = None, compare: bool = True, weights: str | None = None,
                   repeats: int = 1) -> dict[str, Any]:
    """``weights``: a local weights file for the model (``features.weights``), as users of pretrained
    encoders run it (the job hashes and assigns it instead of initialising the model at random); the
    in-process reference loads the same file. ``repeats``: the feature stage (its bags removed in between)
    and the in-process reference alternate that many times; the reported figures are medians, the ratio
    the median of the paired ratios (each run's own varies by several per cent on a busy machine)."""
    import shutil
    import statistics

    import yaml

    from .bench import machine

    tmp = Path(results or tempfile.mkdtemp(prefix="wsipipe-benchwf-"))
    tmp.mkdir(parents=True, exist_ok=True)
    res = tmp / "results"
    cfg = {"slides_dir": str(Path(slides_dir).resolve()), "results_dir": str(res), "labels_csv": None,
           "grid": {"patch_size": int(size), "target_mpp": float(target_mpp)},
           "features": {"model": model, "batch_size": int(batch_size), "num_workers": int(workers),
                        "device": device, "slides_per_job": int(slides_per_job),
                        **({"weights": str(Path(weights).resolve())} if weights else {})}}
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cores = int(cores or os.cpu_count() or 2)
    from .config import load_workflow_config
    from .layout import Layout
    from .slide import discover_slides

    wc = load_workflow_config(dict(cfg))
    layout = Layout(wc.results_dir, wc.tag)
    slides = sorted(discover_slides(cfg["slides_dir"]))
    grids = [layout.grid(s) for s in slides]
    _snakemake([*grids, "--cores", str(cores), "--configfile", str(cfg_path)], tmp)
    n = sum(json.loads(Path(g).read_text())["n_patches"] for g in grids)
    stages, walls, ips, ratios, jobs = [], [], [], [], 0
    for r in range(max(1, int(repeats))):
        if r:
            shutil.rmtree(layout.features_dir())  # every bag and batch manifest: the stage runs again
        proc, wall = _snakemake(["--cores", str(cores), "--configfile", str(cfg_path)], tmp)
        mans = [json.loads(p.read_text())
                for p in sorted(Path(layout.features_dir()).joinpath(".batches").glob("*.json"))]
        stages.append(max(m["finished"] for m in mans) - min(m["started"] for m in mans))
        walls.append(wall)
        jobs = len(mans)
        if compare:
            ips.append(_in_process(slides, cfg, layout, device))
            ratios.append(n / stages[-1] / ips[-1])
    stage = statistics.median(stages)
    out: dict[str, Any] = {
        "mode": "workflow", "slides": len(slides), "patches": n, "model": model, "size": size,
        "target_mpp": target_mpp, "batch_size": batch_size, "device": device, "workers": workers,
        "slides_per_job": slides_per_job, "weights": "file" if weights else "random",
        "feature_jobs": jobs, "cores": cores, "repeats": len(stages),
        "feature_stage_seconds": round(stage, 2), "snakemake_seconds": round(statistics.median(walls), 2),
        "patches_per_s": round(n / stage, 2), "slides_per_hour": round(len(slides) / stage * 3600, 1),
        "machine": machine()}
    if len(stages) > 1:
        out["feature_stage_seconds_each"] = [round(x, 2) for x in stages]
    if compare:
        out["in_process_patches_per_s"] = round(statistics.median(ips), 2)
        out["ratio_vs_in_process"] = round(statistics.median(ratios), 3)
        if len(ratios) > 1:
            out["in_process_patches_per_s_each"] = [round(x, 2) for x in ips]
            out["ratio_each"] = [round(x, 3) for x in ratios]
    return out


def _in_process(slides: list[str], cfg: dict[str, Any], layout, device: str) -> float:
    """Patches/s of extracting the workflow's own grids in this process (model built and warmed first)."""
    import torch

    from .features import create_encoder
    from .features.extract import embed_batch, extract_slides, resolve_device, resolve_settings
    from .grid import load_grid
    from .slide import discover_slides, open_slide

    p = resolve_settings(cfg["features"])
    dev = resolve_device(p["device"])
    paths = discover_slides(cfg["slides_dir"])
    jobs, out = [], Path(tempfile.mkdtemp(prefix="wsipipe-inproc-"))
    for s in slides:
        g = load_grid(layout.grid(s))
        jobs.append((open_slide(paths[s]), g, layout.grid(s), out / f"{s}.zarr"))
    size = int(cfg["grid"]["patch_size"])
    enc = create_encoder(p["model"], weights=p["weights"], input_size=size)
    enc.model.to(dev)
    with torch.inference_mode():
        embed_batch(enc, torch.zeros((p["batch_size"], size, size, 3), dtype=torch.uint8), dev)
    n = sum(len(j[1]["coords"]) for j in jobs)
    t0 = time.perf_counter()
    extract_slides(jobs, p, encoder=enc, log=open(os.devnull, "w"))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for j in jobs:
        j[0].close()
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return round(n / dt, 2)


def bench_plan(n: int, work: str | None = None, slides_per_job: int = 16) -> dict[str, Any]:
    """Plan a cohort of ``n`` slides with labels (``snakemake -n``, twice); time and memory of the second."""
    import yaml

    from .bench import machine

    tmp = Path(work or tempfile.mkdtemp(prefix="wsipipe-plan-"))
    slides = tmp / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,label,patient_id"]
    for i in range(n):
        p = slides / f"S{i:06d}.svs"
        if not p.exists():
            p.write_bytes(f"placeholder slide {i}\n".encode())  # planning never opens a slide
        rows.append(f"S{i:06d},{i % 2},P{i // 2:06d}")
    (tmp / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = {"slides_dir": str(slides), "labels_csv": str(tmp / "labels.csv"), "results_dir": str(tmp / "results"),
           "features": {"slides_per_job": int(slides_per_job)}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = ["-n", "--cores", "2", "--configfile", str(tmp / "config.yaml"), "--quiet", "rules"]
    proc, first = _snakemake(args, tmp)
    totals = re.findall(r"^total\s+(\d+)\s*$", proc.stdout + proc.stderr, flags=re.M)
    code = ("import resource, subprocess, sys, time, json; t=time.perf_counter(); "
            "r=subprocess.run(sys.argv[1:], capture_output=True); dt=time.perf_counter()-t; "
            "print(json.dumps({'rc': r.returncode, 'seconds': dt, "
            "'maxrss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    bindir = str(Path(sys.executable).parent)
    cmd = [sys.executable, "-c", code, os.path.join(bindir, "snakemake"), "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(ROOT), *args]
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    second = json.loads(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                       timeout=3600).stdout.strip().splitlines()[-1])
    if second["rc"] != 0:
        raise RuntimeError("the second planning run failed")
    jobs = int(totals[-1]) if totals else None  # snakemake's own job count ("total" of its job stats)
    return {"mode": "plan", "slides": n, "jobs": jobs, "first_seconds": round(first, 1),
            "seconds": round(second["seconds"], 1), "peak_rss_mb": round(second["maxrss_mb"], 1),
            "machine": machine()}
