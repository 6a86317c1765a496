"""Throughput benchmarks. Each mode prints one JSON line with ``patches_per_s`` and what it measured.

    python -m pipeline.bench read    --slide S --target-mpp M --size P --workers W [--max-patches N]
    python -m pipeline.bench model   --model NAME --size P --batch-size B [--device D]
    python -m pipeline.bench extract --slide S [S ...] --model NAME --target-mpp M --size P --batch-size B
                                     [--device D] [--workers W]
    python -m pipeline.bench slide   OUT.svs [--width W --height H --mpp M]   (a synthetic slide to bench on)

``read`` also runs the common baseline in the same run (one ``openslide.read_region`` per patch, PIL
resize, float normalisation in DataLoader worker processes, as many workers as our reader threads) and
reports the ratio. Both are timed from start (workers included) to the last patch.
``extract`` also runs ``model`` in the same run and reports extract/model. Ratios are what matter:
absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .features.catalog import IMAGENET_MEAN, IMAGENET_STD
from .features.extract import (Prefetcher, RunReader, embed_batch, extract_slides, plan_runs, resolve_settings,
                               resolve_device)
from .grid import make_grid
from .slide import open_slide
from .tissue import segment_tissue


def machine() -> dict[str, Any]:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def slide_grid(path: str, target_mpp: float, size: int, max_patches: int | None = None):
    """Open a slide, segment its tissue in memory and build the patch grid (first ``max_patches``)."""
    slide = open_slide(path)
    tissue = segment_tissue(slide, {})
    grid = make_grid(slide, tissue.mask, tissue.mask_downsample, {"patch_size": size, "target_mpp": target_mpp})
    if max_patches:
        grid["coords"] = grid["coords"][:max_patches]
        grid["n_patches"] = len(grid["coords"])
    return slide, grid


class _BaselineReader(torch.utils.data.Dataset):
    """The common per-patch path: read_region per patch, PIL resize, float normalisation in the worker."""

    def __init__(self, path: str, coords: np.ndarray, plan: dict[str, Any]):
        self.path, self.coords, self.plan = path, coords, plan
        self._slide = None
        self.mean = np.array(IMAGENET_MEAN, np.float32)
        self.std = np.array(IMAGENET_STD, np.float32)

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        import openslide

        if self._slide is None:
            self._slide = openslide.OpenSlide(self.path)
        x, y = self.coords[i]
        r, p = self.plan["read_size_px"], self.plan["patch_size_px"]
        img = self._slide.read_region((int(x), int(y)), self.plan["level"], (r, r)).convert("RGB").resize((p, p))
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def _time_loader(loader) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for item in loader:
        n += int(item.shape[0])
    return n, time.perf_counter() - t0


def bench_read(slide: str, target_mpp: float, size: int, workers: int, max_patches: int = 2000,
               batch_size: int = 64, baseline: bool = True, repeats: int = 1) -> dict[str, Any]:
    s, grid = slide_grid(slide, target_mpp, size, max_patches)
    coords = np.asarray(grid["coords"], dtype=np.int64).reshape(-1, 2)
    plan = grid["read_plan"]
    kw = dict(num_workers=workers, prefetch_factor=4 if workers else None)
    runs = plan_runs(coords, plan["patch_size_level0_px"])
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = Prefetcher(RunReader(str(s.path), s.reader, s.mpp, coords, plan, runs), len(runs), workers)
        n = sum(int(b.shape[0]) for b in ours)
        best = max(best or 0.0, n / (time.perf_counter() - t0))
    out = {"mode": "read", "slide": str(slide), "patches": int(len(coords)), "patches_per_s": round(best, 1),
           "workers": workers, "target_mpp": target_mpp, "size": size, "read_plan": plan,
           "runs": len(runs), "machine": machine()}
    if baseline:
        bbest = None
        for _ in range(repeats):
            base = torch.utils.data.DataLoader(_BaselineReader(str(s.path), coords, plan), batch_size=batch_size,
                                               **kw)
            n, dt = _time_loader(base)
            bbest = max(bbest or 0.0, n / dt)
        out["baseline_patches_per_s"] = round(bbest, 1)
        out["ratio_vs_baseline"] = round(best / bbest, 2)
    s.close()
    return out


def bench_model(model: str, size: int, batch_size: int, device: str = "auto", seconds: float = 10.0,
                encoder=None) -> dict[str, Any]:
    from .features import create_encoder

    dev = resolve_device(device)
    enc = encoder or create_encoder(model, input_size=size)
    enc.model.to(dev)
    x = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)
    if dev.type == "cuda":
        x = x.pin_memory()
    with torch.inference_mode():
        for _ in range(2):  # warm-up (cudnn autotune, allocator)
            embed_batch(enc, x, dev)
        n, t0 = 0, time.perf_counter()
        while True:
            embed_batch(enc, x, dev)  # includes the uint8 -> device copy and normalisation, as extraction does
            n += batch_size
            dt = time.perf_counter() - t0
            if dt >= seconds and n >= 3 * batch_size:
                break
    return {"mode": "model", "model": model, "size": size, "batch_size": batch_size, "device": str(dev),
            "precision": enc.precision if dev.type == "cuda" else "fp32", "patches_per_s": round(n / dt, 2),
            "patches": n, "seconds": round(dt, 2), "machine": machine()}


def bench_extract(slides: list[str], model: str, target_mpp: float, size: int, batch_size: int,
                  device: str = "auto", workers: int = 2, max_patches: int | None = None,
                  compare_model: bool = True, repeats: int = 1) -> dict[str, Any]:
    """End-to-end extraction throughput. With ``repeats`` > 1, extract and model rounds alternate and the
    best of each is kept, so intermittent background load does not bias the ratio."""
    from .features import create_encoder

    p = resolve_settings({"model": model, "batch_size": batch_size, "num_workers": workers, "device": device})
    dev = resolve_device(device)
    enc = create_encoder(model, input_size=size)
    enc.model.to(dev)
    jobs, tmp = [], Path(tempfile.mkdtemp(prefix="wsipipe-bench-"))
    for i, path in enumerate(slides):
        s, grid = slide_grid(path, target_mpp, size, max_patches)
        gpath = tmp / f"grid_{i}.json"
        gpath.write_text(json.dumps(grid))
        jobs.append((s, grid, gpath, tmp / f"bag_{i}.zarr"))
    n = sum(len(j[1]["coords"]) for j in jobs)
    with torch.inference_mode():  # warm-up so the timing does not include first-call overheads
        embed_batch(enc, torch.zeros((batch_size, size, size, 3), dtype=torch.uint8), dev)
    best_dt, best_model = float("inf"), 0.0
    for r in range(max(1, repeats)):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        extract_slides([(s, g, gp, tmp / f"r{r}_{Path(out).name}") for s, g, gp, out in jobs], p, encoder=enc,
                       log=open(os.devnull, "w"))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best_dt = min(best_dt, time.perf_counter() - t0)
        if compare_model:
            m = bench_model(model, size, batch_size, device, seconds=min(max(best_dt / 2, 5.0), 30.0), encoder=enc)
            best_model = max(best_model, m["patches_per_s"])
    dt = best_dt
    import resource

    out = {"mode": "extract", "slides": slides, "model": model, "size": size, "batch_size": batch_size,
           "device": str(dev), "workers": workers, "patches": n, "seconds": round(dt, 2),
           "patches_per_s": round(n / dt, 2),
           # peak resident memory of this process so far (Linux reports KiB)
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "machine": machine()}
    out["repeats"] = max(1, repeats)
    if compare_model:
        out["model_patches_per_s"] = best_model
        out["ratio_vs_model"] = round(out["patches_per_s"] / best_model, 3)
    for s, *_ in jobs:
        s.close()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("read")
    r.add_argument("--slide", required=True)
    r.add_argument("--target-mpp", type=float, default=0.5)
    r.add_argument("--size", type=int, default=224)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--max-patches", type=int, default=2000)
    r.add_argument("--repeats", type=int, default=1)
    r.add_argument("--no-baseline", action="store_true")
    m = sub.add_parser("model")
    m.add_argument("--model", required=True)
    m.add_argument("--size", type=int, default=224)
    m.add_argument("--batch-size", type=int, default=64)
    m.add_argument("--device", default="auto")
    m.add_argument("--seconds", type=float, default=10.0)
    e = sub.add_parser("extract")
    e.add_argument("--slide", required=True, nargs="+")
    e.add_argument("--model", required=True)
    e.add_argument("--target-mpp", type=float, default=0.5)
    e.add_argument("--size", type=int, default=224)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="auto")
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--max-patches", type=int, default=None)
    e.add_argument("--no-compare-model", action="store_true")
    e.add_argument("--repeats", type=int, default=1, help="alternate extract/model rounds, keep the best of each")
    sl = sub.add_parser("slide")
    sl.add_argument("out")
    sl.add_argument("--width", type=int, default=16384)
    sl.add_argument("--height", type=int, default=12288)
    sl.add_argument("--mpp", type=float, default=0.25)
    sl.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.mode == "read":
        res = bench_read(a.slide, a.target_mpp, a.size, a.workers, a.max_patches, baseline=not a.no_baseline,
                         repeats=a.repeats)
    elif a.mode == "model":
        res = bench_model(a.model, a.size, a.batch_size, a.device, a.seconds)
    elif a.mode == "extract":
        res = bench_extract(a.slide, a.model, a.target_mpp, a.size, a.batch_size, a.device, a.workers,
                            a.max_patches, compare_model=not a.no_compare_model, repeats=a.repeats)
    else:
        import resource

        from .synthetic import make_slide

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        res = make_slide(a.out, width=a.width, height=a.height, mpp=a.mpp, seed=a.seed, positive=True)
        dt = time.perf_counter() - t0
        res = {"mode": "slide", **{k: v for k, v in res.items() if isinstance(v, (str, int, float))},
               "seconds": round(dt, 1), "file_mb": round(os.path.getsize(a.out) / 2**20, 1),
               # peak resident memory of this process, and before generating (libraries, torch included)
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "rss_before_mb": round(rss0, 1), "cpus": os.cpu_count()}
    print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
