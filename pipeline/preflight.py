"""Pre-flight estimate of a feature-extraction run: patches per slide and the expected time.

    python -m pipeline.preflight --results DIR --model NAME [--batch-size B] [--device D] [--patch-size P]
                                 [--target-mpp M] [--throughput PATCHES_PER_S] [--slides ID ...] --out JSON

Patch counts come from each slide's grid (``{results}/grid/{slide}.json``). A slide that has only its
tissue mask (``{results}/tissue/{slide}/``) gets the count the grid stage would produce from that mask
with the given patch size and µm/px (same level-0 patch size, stride and tissue-fraction rule as
:func:`pipeline.grid.make_grid`). Model throughput is measured with :func:`pipeline.bench.bench_model`
for a few seconds (random weights, same architecture and input size) unless ``--throughput`` is given.

The estimate assumes that reading and decoding the patches keeps up with the model. On a CPU-only
machine, with slow (network) storage or few reader threads, reading can be the bottleneck: measure the
whole path with ``python -m pipeline.bench extract`` on one slide when in doubt.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from .config import STAGE_DEFAULTS, parse_with_settings
from .files import read_json_or_none, write_json_atomic
from .layout import TISSUE_FILES, Layout
from .provenance import provenance

GRID_DEFAULTS = STAGE_DEFAULTS["grid"]
FEATURE_DEFAULTS = STAGE_DEFAULTS["features"]
DEFAULTS = STAGE_DEFAULTS["preflight"]

NOTE = ("Model-only throughput: the estimate assumes reading and decoding patches keeps up with the model "
        "(check with `python -m pipeline.bench extract` on one slide; on CPU-only machines or slow storage "
        "reading can be the bottleneck). Slides already extracted are counted too.")


def human_seconds(seconds: float | None) -> str:
    """``45 s``, ``12 min 05 s``, ``3 h 20 min``, ``2 d 4 h``."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"


def _read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    return read_json_or_none(path)[0]


def discover(results: str | os.PathLike) -> list[str]:
    """Slides with a grid or a finished tissue stage."""
    layout = Layout(results)
    return [s for s in layout.slide_ids()
            if Path(layout.grid(s)).is_file() or Path(layout.tissue_json(s)).is_file()]


def count_from_mask(tissue_dir: str | os.PathLike, patch_size: int, target_mpp: float,
                    stride: int | None = None, min_tissue_fraction: float | None = None) -> dict[str, Any]:
    """Patches the grid stage would keep for this tissue mask (and the area-based count for reference)."""
    import numpy as np

    from .grid import level0_patch_size, tissue_fractions
    from .tissue import load_mask

    meta = _read_json(Path(tissue_dir) / TISSUE_FILES["stats"]) or {}
    slide = meta.get("slide") or {}
    mask, ds = load_mask(tissue_dir)
    mpp = float(slide["level0_mpp"])
    W, H = (int(v) for v in slide["dimensions"])
    stride = int(stride or patch_size)
    frac_min = float(GRID_DEFAULTS["min_tissue_fraction"] if min_tissue_fraction is None else min_tissue_fraction)
    size0 = level0_patch_size(int(patch_size), float(target_mpp), mpp)
    stride0 = max(1, round(stride * float(target_mpp) / mpp))
    xs = np.arange(0, W - size0 + 1, stride0, dtype=np.int64)
    ys = np.arange(0, H - size0 + 1, stride0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()
    frac = tissue_fractions(mask, ds, gx, gy, size0) if gx.size else np.zeros(0)
    keep = frac >= frac_min - 1e-9
    if frac_min > 0:
        keep &= frac > 0
    area_mm2 = float((meta.get("stats") or {}).get("tissue_area_mm2") or 0.0)
    patch_mm2 = (patch_size * target_mpp / 1000.0) ** 2
    return {"patches": int(keep.sum()), "area_estimate": int(round(area_mm2 / patch_mm2)) if patch_mm2 else 0,
            "tissue_area_mm2": area_mm2}


def estimate(results_dir: str | os.PathLike, slides: Iterable[str] | None, model: str,
             batch_size: int = FEATURE_DEFAULTS["batch_size"], device: str = FEATURE_DEFAULTS["device"],
             patch_size: int | None = None, throughput: float | None = None, *, target_mpp: float | None = None,
             stride: int | None = None, min_tissue_fraction: float | None = None,
             bench_seconds: float = DEFAULTS["seconds"]) -> dict[str, Any]:
    """Patches per slide and the expected extraction time (see the module docstring)."""
    layout = Layout(results_dir)
    ids = list(dict.fromkeys(slides)) if slides is not None else discover(results_dir)
    grids = {}
    for sid in ids:
        g = _read_json(layout.grid(sid))
        if g is not None and "n_patches" in g:
            grids[sid] = g
    # Patch size and µm/px: given, else those of the existing grids, else the grid defaults.
    ok = [g for g in grids.values() if g.get("status") != "failed" and g.get("read_plan")]
    plan = ok[0]["read_plan"] if ok else {}
    gparams = (ok[0].get("params") or {}) if ok else {}
    patch_size = int(patch_size or plan.get("patch_size_px") or GRID_DEFAULTS["patch_size"])
    target_mpp = float(target_mpp or plan.get("requested_mpp") or GRID_DEFAULTS["target_mpp"])
    if stride is None:
        stride = gparams.get("stride")
    if min_tissue_fraction is None:
        min_tissue_fraction = gparams.get("min_tissue_fraction")

    rows = []
    for sid in ids:
        if sid in grids and grids[sid].get("status") == "failed":
            rows.append({"slide_id": sid, "patches": 0, "source": "failed",
                         "error": f"{grids[sid].get('stage', 'grid')} failed: {grids[sid].get('error', '')}"})
            continue
        if sid in grids:
            rows.append({"slide_id": sid, "patches": int(grids[sid]["n_patches"]), "source": "grid"})
            continue
        tdir = Path(layout.tissue_dir(sid))
        meta = _read_json(layout.tissue_json(sid))
        if meta is not None and meta.get("status") == "failed":
            rows.append({"slide_id": sid, "patches": 0, "source": "failed",
                         "error": f"tissue failed: {meta.get('error', '')}"})
            continue
        if meta is not None:
            try:
                c = count_from_mask(tdir, patch_size, target_mpp, stride, min_tissue_fraction)
                rows.append({"slide_id": sid, "patches": c["patches"], "source": "mask",
                             "area_estimate": c["area_estimate"]})
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                rows.append({"slide_id": sid, "patches": None, "source": "error", "error": str(exc)})
                continue
        rows.append({"slide_id": sid, "patches": None, "source": "missing"})

    bench = None
    if throughput is None:
        from .bench import bench_model

        bench = bench_model(model, patch_size, int(batch_size), device, seconds=bench_seconds)
        throughput = float(bench["patches_per_s"])
        dev = bench["device"]
        source = "measured"
    else:
        throughput = float(throughput)
        dev = device
        source = "given"
    if not throughput > 0:
        raise ValueError(f"throughput must be > 0 patches/s, not {throughput}")
    for r in rows:
        r["seconds"] = None if r["patches"] is None else r["patches"] / throughput
    total = sum(r["patches"] or 0 for r in rows)
    total_s = total / throughput
    params = {"model": model, "batch_size": int(batch_size), "device": device, "patch_size": patch_size,
              "target_mpp": target_mpp}
    return {
        "model": model, "device": dev, "batch_size": int(batch_size), "patch_size": patch_size,
        "target_mpp": target_mpp, "throughput_patches_per_s": throughput, "throughput_source": source,
        "bench": bench, "slides": rows, "n_slides": len(rows),
        "n_missing": sum(r["patches"] is None for r in rows), "total_patches": int(total),
        "total_seconds": total_s, "total_human": human_seconds(total_s), "note": NOTE,
        "provenance": provenance("preflight", params),
    }


def format_table(est: dict[str, Any]) -> str:
    rows = est["slides"]
    w = max([len("slide")] + [len(r["slide_id"]) for r in rows])
    lines = [f"{'slide':<{w}}  {'patches':>9}  {'est. time':>14}  source"]
    for r in rows:
        p = "?" if r["patches"] is None else f"{r['patches']:,}"
        t = "?" if r["seconds"] is None else human_seconds(r["seconds"])
        src = r["source"] + (f" ({r['error']})" if r.get("error") else "")
        lines.append(f"{r['slide_id']:<{w}}  {p:>9}  {t:>14}  {src}")
    lines.append(f"{'total':<{w}}  {est['total_patches']:>9,}  {est['total_human']:>14}")
    lines.append(f"throughput {est['throughput_patches_per_s']:.1f} patches/s ({est['throughput_source']}; "
                 f"{est['model']}, {est['patch_size']} px, batch {est['batch_size']}, {est['device']})")
    if est["n_missing"]:
        lines.append(f"{est['n_missing']} slide(s) have neither grid nor tissue mask: not counted")
    lines.append(f"note: {est['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="wsipipe preflight", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="results folder (grid/ and/or tissue/ inside)")
    ap.add_argument("--settings", default=None, help="the preflight settings as a JSON object (defaults of the "
                                                     "options below; the workflow passes features + grid + preflight)")
    ap.add_argument("--model", required=True, help="encoder preset or timm architecture")
    ap.add_argument("--batch-size", type=int, default=FEATURE_DEFAULTS["batch_size"])
    ap.add_argument("--device", default=FEATURE_DEFAULTS["device"])
    ap.add_argument("--patch-size", type=int, default=None, help="default: from the grids, else 224")
    ap.add_argument("--target-mpp", type=float, default=None, help="for mask-only slides; default: grids, else 0.5")
    ap.add_argument("--stride", type=int, default=None, help="for mask-only slides (pixels at target µm/px)")
    ap.add_argument("--min-tissue-fraction", type=float, default=None, help="for mask-only slides")
    ap.add_argument("--throughput", type=float, default=DEFAULTS["throughput"],
                    help="patches/s; default: measure the model")
    ap.add_argument("--seconds", type=float, default=DEFAULTS["seconds"], help="how long to measure the model")
    ap.add_argument("--slides", nargs="*", default=None, help="slide ids (default: all found)")
    ap.add_argument("--slides-file", default=None, help="file with the slide ids, one per line")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    a = parse_with_settings(ap, argv)
    if a.threads:
        import torch

        torch.set_num_threads(max(1, a.threads))
    if a.throughput is not None and not a.throughput > 0:
        ap.error("--throughput must be > 0")
    slides = a.slides
    if a.slides_file:
        slides = [s for s in Path(a.slides_file).read_text(encoding="utf-8").splitlines() if s]
    est = estimate(a.results, slides, a.model, a.batch_size, a.device, a.patch_size, a.throughput,
                   target_mpp=a.target_mpp, stride=a.stride, min_tissue_fraction=a.min_tissue_fraction,
                   bench_seconds=a.seconds)
    print(format_table(est))
    write_json_atomic(a.out, est)
    return 0


if __name__ == "__main__":
    sys.exit(main())
