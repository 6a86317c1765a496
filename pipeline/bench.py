"""Throughput benchmarks. Each mode prints one JSON line with what it measured.

    python -m pipeline.bench read    --slide S --target-mpp M --size P --workers 1,2 [--repeats R] [--max-patches N]
    python -m pipeline.bench model   --model NAME --size P --batch-size B [--device D] [--ceiling]
    python -m pipeline.bench extract --slide S [S ...] --model NAME --target-mpp M --size P --batch-size B
                                     [--device D] [--workers W] [--repeats R]
    python -m pipeline.bench gpu-suite --workdir DIR [--slide S ...]   (everything GPU-side in one call)
    python -m pipeline.bench slide   OUT.svs [--width W --height H --mpp M]   (a synthetic slide to bench on)
    python -m pipeline.bench workflow --slides DIR --model NAME [...]   (the Snakemake workflow's feature stage)
    python -m pipeline.bench plan    --n 10000                           (snakemake -n on a large cohort)

``read`` times the reader pool (processes started beforehand, as in extraction, where the pool outlives
slides) for every worker count given, alternating counts across ``--repeats`` rounds and keeping the best
of each, and reports the scaling between the first and the others, plus the readers' CPU time per patch,
the JPEG tiles they decoded per patch and the fraction of the time they were reading rather than waiting
for work (near 1: the readers are the bottleneck, so throughput follows the CPU they get). It also runs the
common baseline in the same run (one ``openslide.read_region`` per patch, PIL resize, float normalisation
in DataLoader worker processes, as many workers as the largest count) and reports the ratio.
``model`` runs the encoder on random uint8 patches in host memory, as extraction does (copy to the device,
normalisation, model, copy back); ``--ceiling`` runs the model alone on input already normalised on the
device, with the weights in the encoder's precision (bf16 on CUDA; fp32 on CPU): the ceiling.
``extract`` runs the real path end to end and, in the same run, ``model`` and the ceiling, and reports
extract/model and extract/ceiling (and the GPU busy fraction, sampled with nvidia-smi, on CUDA).
Ratios are what matter: absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .features.catalog import IMAGENET_MEAN, IMAGENET_STD
from .features.extract import (compute_dtype, embed_batch, extract_slides, forward, prepare_encoder, preprocess,
                               resolve_device, resolve_settings, slot_bytes)
from .grid import make_grid
from .readers import ReaderPool, ReadSpec, level_origins
from .slide import open_slide
from .tissue import segment_tissue


def machine() -> dict[str, Any]:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


_GRIDS: dict[tuple, dict[str, Any]] = {}


def slide_grid(path: str, target_mpp: float, size: int, max_patches: int | None = None):
    """Open a slide, segment its tissue in memory and build the patch grid (first ``max_patches``);
    grids are remembered for the process (benchmarks reuse slides)."""
    slide = open_slide(path)
    key = (str(path), float(target_mpp), int(size), max_patches)
    grid = _GRIDS.get(key)
    if grid is None:
        tissue = segment_tissue(slide, {})
        grid = make_grid(slide, tissue.mask, tissue.mask_downsample, {"patch_size": size, "target_mpp": target_mpp})
        if max_patches:
            grid["coords"] = grid["coords"][:max_patches]
            grid["n_patches"] = len(grid["coords"])
        _GRIDS[key] = grid
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


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the processes ``pids`` (Linux /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            return math.nan
    return total


def _stripe(slide, level: int, read_px: int, workers: int, origins: np.ndarray) -> int:
    from .readers import grid_step, stripe_width

    tiles = slide.tiled_jpeg()
    tw = tiles.levels[level].tw if tiles and tiles.supports(level) else None
    return stripe_width(slide.level_dimensions[level][0], read_px, workers, tw, grid_step(origins))


def bench_read(slide: str, target_mpp: float, size: int, workers: list[int] | int, max_patches: int = 2000,
               batch_size: int = 64, baseline: bool = True, repeats: int = 1, resize: str = "cpu") -> dict[str, Any]:
    """Reader-pool throughput for each worker count (best of ``repeats`` alternating rounds)."""
    from .features.extract import _tile_cache_bytes

    counts = [int(w) for w in ([workers] if isinstance(workers, int) else workers)]
    s, grid = slide_grid(slide, target_mpp, size, max_patches)
    coords = np.asarray(grid["coords"], dtype=np.int64).reshape(-1, 2)
    plan = grid["read_plan"]
    level, r, p = int(plan["level"]), int(plan["read_size_px"]), int(plan["patch_size_px"])
    origins = level_origins(coords, plan["level_downsample"])
    batches = [(a, min(a + batch_size, len(origins))) for a in range(0, len(origins), batch_size)]
    tiles = s.tiled_jpeg()
    pools, specs, start_s, best, cpu, decoded, busy, main_cpu = {}, {}, {}, {}, {}, {}, {}, {}
    try:
        for w in counts:
            t0 = time.perf_counter()
            pools[w] = ReaderPool(w)
            specs[w] = ReadSpec(str(s.path), s.reader, float(s.mpp), level, r, p, resize=resize == "cpu",
                                cache_bytes=_tile_cache_bytes(tiles, level, w, origins, batches, r))
            pools[w].reserve(batch_size * specs[w].patch_bytes)
            if w:
                pools[w].wait_ready()
            start_s[w] = round(time.perf_counter() - t0, 3)
        for _ in range(max(1, repeats)):
            for w in counts:
                pool = pools[w]
                pids = pool.pids() or [os.getpid()]
                c0, d0, b0, t0 = _cpu_seconds(pids), pool.tiles_decoded, pool.busy_s, time.perf_counter()
                m0 = time.process_time()
                stream = pool.submit(specs[w], origins, batches, stripe_px=_stripe(s, level, r, w, origins))
                n = 0
                for i in range(len(stream)):
                    n += int(stream.get(i).shape[0])
                    stream.release(i)
                stream.close()
                dt, dc = time.perf_counter() - t0, _cpu_seconds(pids) - c0
                dm = time.process_time() - m0
                if n / dt > best.get(w, 0.0):
                    best[w] = n / dt
                    cpu[w] = dc / max(n, 1) * 1000
                    decoded[w] = (pool.tiles_decoded - d0) / max(n, 1)
                    busy[w] = (pool.busy_s - b0) / (dt * w) if w else math.nan
                    main_cpu[w] = dm / max(n, 1) * 1000
    finally:
        for pool in pools.values():
            pool.close()
    top = counts[-1]
    out = {"mode": "read", "slide": str(slide), "patches": int(len(coords)), "patches_per_s": round(best[top], 1),
           "workers": top, "by_workers": {str(w): {"patches_per_s": round(best[w], 1),
                                                   "reader_cpu_ms_per_patch": round(cpu[w], 3),
                                                   "tiles_decoded_per_patch": round(decoded[w], 2),
                                                   "reader_busy_fraction": round(busy[w], 3),
                                                   "main_cpu_ms_per_patch": round(main_cpu[w], 3),
                                                   "pool_start_s": start_s[w]} for w in counts},
           "repeats": max(1, repeats), "resize": "cpu-cv2" if resize == "cpu" else "none (device)",
           "target_mpp": target_mpp, "size": size, "read_plan": plan, "batches": len(batches),
           "machine": machine()}
    if len(counts) > 1:
        out["scaling"] = {f"{w}/{counts[0]}": round(best[w] / best[counts[0]], 3) for w in counts[1:]}
    if baseline:
        kw = dict(num_workers=top, prefetch_factor=4 if top else None)
        bbest = 0.0
        for _ in range(max(1, repeats)):
            base = torch.utils.data.DataLoader(_BaselineReader(str(s.path), coords, plan), batch_size=batch_size,
                                               **kw)
            n, dt = _time_loader(base)
            bbest = max(bbest, n / dt)
        out["baseline_patches_per_s"] = round(bbest, 1)
        out["ratio_vs_baseline"] = round(best[top] / bbest, 2)
    s.close()
    return out


def _timed(step, dev: torch.device, seconds: float, per_call: int) -> tuple[int, float]:
    """Run ``step`` for about ``seconds`` (calibrated, one synchronisation at the end on CUDA)."""
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(2):  # warm-up (cudnn autotune, allocator)
        step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    iters = max(3, int(seconds / one))
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return iters * per_call, time.perf_counter() - t0


def bench_model(model: str, size: int, batch_size: int, device: str = "auto", seconds: float = 10.0,
                encoder=None, ceiling: bool = False) -> dict[str, Any]:
    """The encoder's throughput. Default: uint8 patches in host memory through the extraction's device
    work (copy in, normalise, model, copy out). ``ceiling``: the model alone on normalised input already
    on the device, weights in the encoder's precision there (bf16 on CUDA, fp32 on CPU)."""
    from .features import create_encoder

    dev = resolve_device(device)
    enc = encoder or create_encoder(model, input_size=size)
    wdtype = prepare_encoder(enc, dev)
    u8 = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)
    with torch.inference_mode():
        if ceiling:
            x = preprocess(enc, u8, dev)
            dt = compute_dtype(enc, dev)
            x = x.to(dt) if dt is not None else x

            def step():
                return forward(enc, x, dev)
        else:
            cuda = dev.type == "cuda"
            if cuda:
                u8 = u8.pin_memory()
            out = torch.empty((batch_size, enc.embed_dim), pin_memory=cuda)

            def step():
                f = embed_batch(enc, u8, dev, sync=not cuda)
                if cuda:
                    out.copy_(f, non_blocking=True)
                return f

        n, secs = _timed(step, dev, seconds, batch_size)
    return {"mode": "model", "model": model, "size": size, "batch_size": batch_size, "device": str(dev),
            "ceiling": bool(ceiling), "precision": enc.precision if compute_dtype(enc, dev) else "fp32",
            "weights_dtype": wdtype, "patches_per_s": round(n / secs, 2), "patches": n,
            "seconds": round(secs, 2), "machine": machine()}


class GpuBusy:
    """Samples the GPU's busy fraction (nvidia-smi ``utilization.gpu``: share of time a kernel was
    running) every ``every_ms`` while in the ``with`` block; ``result()`` -> mean/min % or None."""

    def __init__(self, index: int = 0, every_ms: int = 200):
        self.index, self.every_ms = index, every_ms
        self.samples: list[float] = []
        self._proc = None
        self._thread = None

    def __enter__(self) -> "GpuBusy":
        exe = shutil.which("nvidia-smi")
        if exe and torch.cuda.is_available():
            self._proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                           f"--id={self.index}", f"--loop-ms={self.every_ms}"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join(timeout=5)

    def result(self) -> dict[str, Any] | None:
        s = self.samples[1:] if len(self.samples) > 2 else self.samples  # the first covers the start-up
        if not s:
            return None
        return {"mean_pct": round(float(np.mean(s)), 1), "median_pct": round(float(np.median(s)), 1),
                "samples": len(s)}


def bench_extract(slides: list[str], model: str, target_mpp: float, size: int, batch_size: int,
                  device: str = "auto", workers: int = 2, max_patches: int | None = None,
                  compare_model: bool = True, repeats: int = 1, slide_repeats: int = 1,
                  settings: dict[str, Any] | None = None, model_seconds: float | None = None,
                  encoder=None) -> dict[str, Any]:
    """End-to-end extraction throughput, with the reader pool started beforehand (it outlives slides).
    With ``repeats`` > 1, extract and model rounds alternate and the best of each is kept, so intermittent
    background load does not bias the ratios. ``slide_repeats`` lists every slide that many times."""
    from .features import create_encoder

    p = resolve_settings({"model": model, "batch_size": batch_size, "num_workers": workers, "device": device,
                          **(settings or {})})
    dev = resolve_device(device)
    enc = encoder or create_encoder(model, input_size=size)
    prepare_encoder(enc, dev)
    jobs, tmp = [], Path(tempfile.mkdtemp(prefix="wsipipe-bench-"))
    for i, path in enumerate(slides):
        s, grid = slide_grid(path, target_mpp, size, max_patches)
        gpath = tmp / f"grid_{i}.json"
        gpath.write_text(json.dumps(grid))
        jobs.append((s, grid, gpath, tmp / f"bag_{i}.zarr"))
    jobs = jobs * max(1, slide_repeats)
    n = sum(len(j[1]["coords"]) for j in jobs)
    pool = ReaderPool(workers)
    t0 = time.perf_counter()
    pool.reserve(slot_bytes(jobs, p, dev))
    if dev.type == "cuda":
        from .features.device import register_host_memory

        pool.pin(register_host_memory)
    if workers:
        pool.wait_ready()
    pool_start = time.perf_counter() - t0
    with torch.inference_mode():  # warm-up so the timing does not include first-call overheads
        embed_batch(enc, torch.zeros((batch_size, size, size, 3), dtype=torch.uint8), dev)
    best_dt, best_model, best_ceiling, busy = float("inf"), 0.0, 0.0, None
    decoders, resizes = set(), set()
    try:
        for r in range(max(1, repeats)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            with GpuBusy(dev.index or 0) as meter:
                t0 = time.perf_counter()
                res = extract_slides([(s, g, gp, tmp / f"r{r}_{k}_{Path(out).name}")
                                      for k, (s, g, gp, out) in enumerate(jobs)], p, encoder=enc,
                                     log=open(os.devnull, "w"), pool=pool)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            for a in res:
                decoders.add(a["provenance"]["decoder"])
                resizes.add(a["provenance"]["resize"])
            if dt < best_dt:
                best_dt, busy = dt, meter.result()
            for k in range(len(jobs)):  # keep the disk from filling over repeats
                shutil.rmtree(tmp / f"r{r}_{k}_{Path(jobs[k][3]).name}", ignore_errors=True)
            if compare_model:
                secs = model_seconds or min(max(best_dt / 2, 5.0), 30.0)
                m = bench_model(model, size, batch_size, device, seconds=secs, encoder=enc)
                best_model = max(best_model, m["patches_per_s"])
                c = bench_model(model, size, batch_size, device, seconds=secs, encoder=enc, ceiling=True)
                best_ceiling = max(best_ceiling, c["patches_per_s"])
    finally:
        pool.close()
    import resource

    out = {"mode": "extract", "slides": slides, "slide_repeats": max(1, slide_repeats), "model": model,
           "size": size, "batch_size": batch_size, "device": str(dev), "workers": workers, "patches": n,
           "seconds": round(best_dt, 2), "patches_per_s": round(n / best_dt, 2), "pool_start_s": round(pool_start, 2),
           "decoder": sorted(decoders), "resize": sorted(resizes),
           "settings": {k: p[k] for k in ("resize", "gpu_decode")},
           # peak resident memory of this process so far (Linux reports KiB)
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "machine": machine(), "repeats": max(1, repeats)}
    if busy is not None:
        out["gpu_busy"] = busy
    if compare_model:
        out["model_patches_per_s"] = best_model
        out["ratio_vs_model"] = round(out["patches_per_s"] / best_model, 3)
        out["ceiling_patches_per_s"] = best_ceiling
        out["ratio_vs_ceiling"] = round(out["patches_per_s"] / best_ceiling, 3)
    for s, *_ in jobs:
        s.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------
# GPU suite: everything GPU-side in one call
# ------------------------------------------------------------------------------------------------
def abbreviated_jpeg_tiff(path: str | os.PathLike, img: np.ndarray, rgb: bool, tile: int = 256,
                          quality: int = 80, component_ids: tuple[int, int, int] | None = (1, 2, 3)) -> Path:
    """A one-level tiled JPEG TIFF laid out like Aperio's: abbreviated tiles (no tables, no APP markers)
    with the shared JPEGTables tag; ``rgb``: RGB-coded (photometric RGB, no colour transform) with
    ``component_ids`` as in YCbCr files (1, 2, 3), so nothing in the tile stream says it is RGB."""
    import imagecodecs
    import tifffile

    from .tiles import jpeg_segments

    H, W = img.shape[:2]
    tiles, tables = [], None
    for ty in range(0, H, tile):
        for tx in range(0, W, tile):
            t = np.full((tile, tile, 3), 255, np.uint8)
            part = img[ty:ty + tile, tx:tx + tile]
            t[:part.shape[0], :part.shape[1]] = part
            full = imagecodecs.jpeg8_encode(t, level=quality, colorspace="RGB",
                                            outcolorspace="RGB" if rgb else "YCBCR")
            head, scan = jpeg_segments(full)
            if tables is None:
                tables = b"\xff\xd8" + b"".join(s for m, s in head if m in (0xDB, 0xC4)) + b"\xff\xd9"
            keep = [bytearray(s) for m, s in head if m not in (0xDB, 0xC4, 0xE0, 0xEE)]
            scan = bytearray(scan)
            if rgb and component_ids:
                for seg in keep:
                    if seg[1] in (0xC0, 0xC1, 0xC2):  # SOF: ids at 10, 13, 16
                        for k, cid in enumerate(component_ids):
                            seg[10 + 3 * k] = cid
                ns = scan[4]  # SOS: length(2) ns(1) then (id, tables) pairs
                for k in range(min(ns, 3)):
                    scan[5 + 2 * k] = component_ids[k]
            tiles.append(b"\xff\xd8" + b"".join(bytes(s) for s in keep) + bytes(scan))
    tifffile.imwrite(path, iter(tiles), shape=(H, W, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                     photometric="ycbcr", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER",
                     extratags=[(347, 7, len(tables), tables, True)])
    if rgb:
        with tifffile.TiffFile(path, mode="r+") as tf:
            tf.pages[0].tags["PhotometricInterpretation"].overwrite(2)
    return Path(path)


def _gen_slide(args: tuple) -> str:
    from .synthetic import make_slide

    out, w, h, seed = args
    if not Path(out).exists():
        make_slide(out, width=w, height=h, mpp=0.25, seed=seed, positive=True)
    return str(out)


def decode_comparison(slide: str, device: str, target_mpp: float = 0.5, size: int = 224,
                      max_patches: int = 512) -> dict[str, Any]:
    """nvJPEG (``torchvision.io.decode_jpeg`` on ``device``) against the CPU decoder: on tiles
    (:func:`check_tile_decoder`) and on patches at read size (the GPU source against the CPU readers)."""
    from .features.device import JpegTileSource, check_tile_decoder
    from .readers import cut_patches

    dev = torch.device(device)
    s, grid = slide_grid(slide, target_mpp, size, max_patches)
    plan = grid["read_plan"]
    level, r = int(plan["level"]), int(plan["read_size_px"])
    tiles = s.tiled_jpeg()
    out: dict[str, Any] = {"slide": slide, "tiles": check_tile_decoder(tiles, level, dev, n=8)}
    origins = level_origins(np.asarray(grid["coords"]).reshape(-1, 2), plan["level_downsample"])
    batches = [(a, min(a + 128, len(origins))) for a in range(0, len(origins), 128)]
    src = JpegTileSource(tiles, level, origins, batches, r, dev)
    spec = ReadSpec(str(s.path), s.reader, float(s.mpp), level, r, int(plan["patch_size_px"]), resize=False)
    diffs = []
    try:
        for i, (a, b) in enumerate(batches):
            got = src.get(i).cpu().numpy()
            ref = np.empty_like(got)
            cut_patches(s, spec, origins[a:b], ref)
            diffs.append(np.abs(got.astype(np.int16) - ref.astype(np.int16)))
    finally:
        src.close()
        s.close()
    d = np.concatenate(diffs) if diffs else np.zeros(1)
    out["patches"] = {"n": int(len(origins)), "max_abs_diff": int(d.max()), "mean_abs_diff": round(float(d.mean()), 4),
                      "identical_fraction": round(float((d == 0).mean()), 4)}
    return out


def feature_agreement(slide: str, model: str, device: str, target_mpp: float = 0.5, size: int = 224,
                      max_patches: int = 128, workers: int = 2) -> dict[str, Any]:
    """Bags of the same patches made on the CPU (fp32, CPU resize) and on ``device`` (its default path:
    device resize, bf16 weights): row-wise cosine similarity."""
    from .store import read_bag

    tmp = Path(tempfile.mkdtemp(prefix="wsipipe-cos-"))
    try:
        s, grid = slide_grid(slide, target_mpp, size, max_patches)
        gpath = tmp / "grid.json"
        gpath.write_text(json.dumps(grid))
        feats, prov = {}, {}
        for dev in ("cpu", device):
            res = extract_slides([(s, grid, gpath, tmp / f"{dev.replace(':', '_')}.zarr")],
                                 {"model": model, "device": dev, "batch_size": 64, "num_workers": workers},
                                 log=open(os.devnull, "w"))[0]
            feats[dev] = torch.from_numpy(read_bag(tmp / f"{dev.replace(':', '_')}.zarr").features.astype(np.float32))
            prov[dev] = {k: res["provenance"][k] for k in ("decoder", "resize", "weights_dtype")}
        a, b = feats["cpu"].double(), feats[device].double()
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
        s.close()
        return {"model": model, "patches": int(a.shape[0]), "cosine_min": round(float(cos.min()), 6),
                "cosine_mean": round(float(cos.mean()), 6), "paths": prov}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gpu_suite(workdir: str, slides: list[str] | None = None, gen_width: int = 40000, gen_height: int = 30000,
              gen_count: int = 4, workers: int | None = None, batch_size: int = 256, extract_seconds: float = 8.0,
              models: tuple[str, ...] = ("vit_base_patch16_224", "vit_large_patch16_224"),
              out_json: str | None = None, workflow_slides: int = 32) -> dict[str, Any]:
    """Every GPU-side measurement in one call (sized for a 10-minute run on an H100/H200 with 16 cores):
    per model, the ceiling, ``model`` and ``extract`` (GPU busy %) with the CPU readers and with nvJPEG;
    nvJPEG against the CPU decoder (synthetic slide and an Aperio-style RGB-coded file); CPU vs CUDA
    feature cosine; the workflow's feature stage over ``workflow_slides`` slides (0: skip) vs in-process
    extract. Results are printed as they come (stderr) and returned / written as one JSON."""
    import concurrent.futures as cf

    if not torch.cuda.is_available():
        raise SystemExit("gpu-suite needs a CUDA device")
    t_start = time.perf_counter()
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(16, (os.cpu_count() or 2) - 2))
    res: dict[str, Any] = {"mode": "gpu-suite", "machine": machine(), "workers": workers, "batch_size": batch_size}

    def log(key: str, value: Any) -> None:
        res[key] = value
        print(f"[gpu-suite {time.perf_counter() - t_start:6.1f}s] {key}: {json.dumps(value, default=str)}",
              file=sys.stderr, flush=True)
        if out_json:
            Path(out_json).write_text(json.dumps(res, default=str, indent=1))

    if not slides:
        todo = [(str(wd / f"bench_{i}.svs"), gen_width, gen_height, i) for i in range(gen_count)]
        t0 = time.perf_counter()
        import multiprocessing

        with cf.ProcessPoolExecutor(len(todo), mp_context=multiprocessing.get_context("spawn")) as ex:
            slides = list(ex.map(_gen_slide, todo))
        log("slides", {"paths": slides, "generate_s": round(time.perf_counter() - t0, 1)})
    per_pass = 0
    for path in slides:
        s, grid = slide_grid(path, 0.5, 224)
        per_pass += len(grid["coords"])
        s.close()
    log("patches_per_pass", per_pass)

    # nvJPEG vs CPU decoder (synthetic YCbCr slide, then Aperio-style abbreviated RGB- and YCbCr-coded files)
    try:
        log("nvjpeg_vs_cpu", decode_comparison(slides[0], "cuda"))
    except Exception as exc:  # noqa: BLE001 - recorded, the suite goes on
        log("nvjpeg_vs_cpu", {"error": f"{type(exc).__name__}: {exc}"})
    try:
        from .features.device import check_tile_decoder

        import cv2

        img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8),
                               (0, 0), 2)
        rec = {}
        for rgb in (True, False):
            p = abbreviated_jpeg_tiff(wd / f"abbrev_{'rgb' if rgb else 'ycbcr'}.tif", img, rgb=rgb)
            with open_slide(p) as s:
                rec["rgb" if rgb else "ycbcr"] = check_tile_decoder(s.tiled_jpeg(), 0, torch.device("cuda"), n=5)
        log("nvjpeg_aperio_style", rec)
    except Exception as exc:  # noqa: BLE001
        log("nvjpeg_aperio_style", {"error": f"{type(exc).__name__}: {exc}"})

    from .features import create_encoder

    for model in models:
        try:
            enc = create_encoder(model, input_size=224)
            c = bench_model(model, 224, batch_size, "cuda", seconds=5, ceiling=True, encoder=enc)
            rate = c["patches_per_s"]
            reps = max(1, math.ceil(extract_seconds * rate / max(per_pass, 1)))
            for label, settings in (("cpu_decode", {}), ("nvjpeg", {"gpu_decode": True})):
                e = bench_extract(slides, model, 0.5, 224, batch_size, "cuda", workers, slide_repeats=reps,
                                  settings=settings, model_seconds=5, encoder=enc)
                log(f"extract_{model}_{label}", {k: e.get(k) for k in (
                    "patches", "seconds", "patches_per_s", "ceiling_patches_per_s", "ratio_vs_ceiling",
                    "model_patches_per_s", "ratio_vs_model", "gpu_busy", "decoder", "resize", "pool_start_s",
                    "peak_rss_mb")})
        except Exception as exc:  # noqa: BLE001
            log(f"extract_{model}", {"error": f"{type(exc).__name__}: {exc}"})
    for model in ("resnet50_trunc", models[0]):
        try:
            log(f"cosine_cpu_vs_cuda_{model}", feature_agreement(slides[0], model, "cuda", workers=workers))
        except Exception as exc:  # noqa: BLE001
            log(f"cosine_cpu_vs_cuda_{model}", {"error": f"{type(exc).__name__}: {exc}"})
    try:
        r = bench_read(slides[0], 0.5, 224, [1, workers], max_patches=4000, baseline=False, repeats=2)
        log("read_scaling", {k: r[k] for k in ("patches", "by_workers", "scaling")})
    except Exception as exc:  # noqa: BLE001
        log("read_scaling", {"error": f"{type(exc).__name__}: {exc}"})
    if workflow_slides:
        # issue 9's GPU goal: the Snakemake workflow's feature stage (batched jobs, one GPU) over
        # ``workflow_slides`` slides vs in-process extract on the same grids, ViT-L/16. The slides are links to
        # the generated ones under distinct names (the workflow treats them as distinct slides).
        try:
            from .bench_workflow import bench_workflow

            wdir = wd / "workflow_slides"
            wdir.mkdir(exist_ok=True)
            for i in range(int(workflow_slides)):
                link = wdir / f"wf_{i:03d}{Path(slides[i % len(slides)]).suffix}"
                if not link.exists():
                    link.symlink_to(Path(slides[i % len(slides)]).resolve())
            # the model's (random) weights as a file, loaded as users load pretrained encoders: jobs
            # hash and assign it rather than initialise a ViT-L at random on the CPU
            wfile = wd / f"{models[-1]}.safetensors"
            if not wfile.exists():
                from safetensors.torch import save_file

                from .features import create_encoder

                enc = create_encoder(models[-1], input_size=224)
                save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(wfile))
                del enc
            r = bench_workflow(str(wdir), models[-1], 0.5, 224, batch_size, "cuda", workers,
                               cores=os.cpu_count(), results=str(wd / "workflow_run"), weights=str(wfile))
            log("workflow", {k: r.get(k) for k in (
                "slides", "patches", "model", "weights", "feature_jobs", "slides_per_job", "feature_stage_seconds",
                "patches_per_s", "slides_per_hour", "in_process_patches_per_s", "ratio_vs_in_process")})
        except Exception as exc:  # noqa: BLE001
            log("workflow", {"error": f"{type(exc).__name__}: {exc}"[:2000]})
    log("total_s", round(time.perf_counter() - t_start, 1))
    return res


def _workers_list(text: str) -> list[int]:
    try:
        out = [int(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--workers: comma-separated integers, not {text!r}") from exc
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError("--workers: one or more counts >= 0")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("read")
    r.add_argument("--slide", required=True)
    r.add_argument("--target-mpp", type=float, default=0.5)
    r.add_argument("--size", type=int, default=224)
    r.add_argument("--workers", type=_workers_list, default=[1, 2],
                   help="reader process counts to compare, e.g. 1,2 (scaling is reported against the first)")
    r.add_argument("--max-patches", type=int, default=2000, help="first N patches of the grid (0: all)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--repeats", type=int, default=1)
    r.add_argument("--resize", choices=["cpu", "device"], default="cpu",
                   help="cpu: readers resize (the CPU path); device: readers hand over read-size crops")
    r.add_argument("--no-baseline", action="store_true")
    m = sub.add_parser("model")
    m.add_argument("--model", required=True)
    m.add_argument("--size", type=int, default=224)
    m.add_argument("--batch-size", type=int, default=64)
    m.add_argument("--device", default="auto")
    m.add_argument("--seconds", type=float, default=10.0)
    m.add_argument("--ceiling", action="store_true",
                   help="model alone, input already normalised on the device, weights in the encoder's precision")
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
    e.add_argument("--slide-repeats", type=int, default=1, help="list every slide this many times")
    e.add_argument("--resize", choices=["auto", "cpu", "device"], default="auto")
    e.add_argument("--gpu-decode", action="store_true")
    e.add_argument("--model-seconds", type=float, default=None,
                   help="length of each model/ceiling round (default: half the extraction, 5-30 s)")
    g = sub.add_parser("gpu-suite")
    g.add_argument("--workdir", required=True, help="where synthetic slides are made (and reused)")
    g.add_argument("--slide", nargs="*", default=None, help="use these slides instead of generating")
    g.add_argument("--gen-width", type=int, default=40000)
    g.add_argument("--gen-height", type=int, default=30000)
    g.add_argument("--gen-count", type=int, default=4, help="slides generated in parallel (streaming generator)")
    g.add_argument("--workers", type=int, default=None, help="reader processes (default: cores - 2, at most 16)")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--extract-seconds", type=float, default=8.0)
    g.add_argument("--out", default=None, help="also write the JSON here (updated after each step)")
    g.add_argument("--workflow-slides", type=int, default=32,
                   help="slides for the workflow step (links to the generated ones; 0: skip it)")
    w = sub.add_parser("workflow", help="the Snakemake workflow's feature stage vs in-process extract")
    w.add_argument("--slides", required=True, help="folder of slides (tissue and grids are made first, untimed)")
    w.add_argument("--model", required=True)
    w.add_argument("--target-mpp", type=float, default=0.5)
    w.add_argument("--size", type=int, default=224)
    w.add_argument("--batch-size", type=int, default=64)
    w.add_argument("--device", default="auto")
    w.add_argument("--workers", type=int, default=2, help="reader processes per feature job")
    w.add_argument("--slides-per-job", type=int, default=16)
    w.add_argument("--cores", type=int, default=None, help="snakemake --cores (default: all)")
    w.add_argument("--results", default=None, help="work folder (default: a temporary one)")
    w.add_argument("--no-compare", action="store_true", help="skip the in-process extraction")
    w.add_argument("--weights", default=None, help="a local weights file for the model (features.weights)")
    w.add_argument("--repeats", type=int, default=1,
                   help="alternate the feature stage and the in-process reference this many times (medians)")
    pl = sub.add_parser("plan", help="snakemake -n on a cohort of N placeholder slides with labels")
    pl.add_argument("--n", type=int, default=10000)
    pl.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    pl.add_argument("--slides-per-job", type=int, default=16)
    sl = sub.add_parser("slide")
    sl.add_argument("out")
    sl.add_argument("--width", type=int, default=16384)
    sl.add_argument("--height", type=int, default=12288)
    sl.add_argument("--mpp", type=float, default=0.25)
    sl.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.mode in ("workflow", "plan"):
        from .bench_workflow import bench_plan, bench_workflow

        if a.mode == "workflow":
            res = bench_workflow(a.slides, a.model, a.target_mpp, a.size, a.batch_size, a.device, a.workers,
                                 a.slides_per_job, a.cores, a.results, compare=not a.no_compare,
                                 weights=a.weights, repeats=a.repeats)
        else:
            res = bench_plan(a.n, a.work, a.slides_per_job)
        print(json.dumps(res, default=str))
        return 0
    if a.mode == "read":
        res = bench_read(a.slide, a.target_mpp, a.size, a.workers, a.max_patches, batch_size=a.batch_size,
                         baseline=not a.no_baseline, repeats=a.repeats, resize=a.resize)
    elif a.mode == "model":
        res = bench_model(a.model, a.size, a.batch_size, a.device, a.seconds, ceiling=a.ceiling)
    elif a.mode == "extract":
        res = bench_extract(a.slide, a.model, a.target_mpp, a.size, a.batch_size, a.device, a.workers,
                            a.max_patches, compare_model=not a.no_compare_model, repeats=a.repeats,
                            slide_repeats=a.slide_repeats, settings={"resize": a.resize, "gpu_decode": a.gpu_decode},
                            model_seconds=a.model_seconds)
    elif a.mode == "gpu-suite":
        res = gpu_suite(a.workdir, a.slide, a.gen_width, a.gen_height, a.gen_count, a.workers, a.batch_size,
                        a.extract_seconds, out_json=a.out, workflow_slides=a.workflow_slides)
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
