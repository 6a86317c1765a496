"""Heatmaps of per-patch MIL scores over the slide thumbnail, and the scored patches as QuPath GeoJSON.

Inputs are what the pipeline has already cached, so nothing is re-extracted: the per-slide score CSV that
``python -m pipeline.mil predict --attention-dir`` writes (``x,y`` = level-0 top-left corner of each patch,
the bag's coords, plus ``attention`` and/or instance ``score`` columns), the tissue stage's
``thumbnail.png`` and ``tissue.json`` (slide dimensions) and the grid JSON (level-0 patch size).

The PNG is the thumbnail with every scored patch coloured by its score (colour map "jet": blue = low,
red = high) and alpha-blended; scores are mapped to [0, 1] by their rank within the slide (``rank``,
default: attention weights are relative within a bag, so ranks compare slides of different sizes) or
linearly between the slide's minimum and maximum (``minmax``). Overlapping patches are averaged.

The GeoJSON is a FeatureCollection with one Feature per patch: a Polygon (the patch square in level-0
pixels, closed ring) with ``properties`` ``{"objectType": "tile", "name": ..., "measurements":
{<column>: raw score, "heatmap": the [0, 1] value}}``, which QuPath opens as tiles with measurements
(File > Import objects, or drag and drop).

Command line::

    python -m pipeline.heatmap --scores att/slide.csv --tissue-dir results/tissue/slide \
        --grid results/grid/slide.json --out-png slide.png --out-geojson slide.geojson
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import STAGE_DEFAULTS, parse_with_settings
from .files import feature_collection, polygon_feature, square_ring, write_json_atomic, write_png
from .layout import TISSUE_FILES
from .log import get_logger, setup

log = get_logger("heatmap")

__all__ = ["HeatmapError", "render_heatmap", "normalise_scores", "patches_geojson", "main"]

NORMALISE = ("rank", "minmax")
DEFAULTS = STAGE_DEFAULTS["heatmap"]


class HeatmapError(ValueError):
    """An expected user error (missing or inconsistent inputs)."""


def normalise_scores(scores: np.ndarray, how: str = "rank") -> np.ndarray:
    """Scores -> [0, 1]: by rank (ties share their mean rank) or min-max. Constant scores map to 0.5."""
    s = np.asarray(scores, dtype=np.float64)
    if how not in NORMALISE:
        raise HeatmapError(f"normalisation must be one of {NORMALISE}, not {how!r}")
    if s.size == 0:
        return s
    if not np.all(np.isfinite(s)):
        raise HeatmapError("scores contain NaN or infinite values")
    lo, hi = float(s.min()), float(s.max())
    if hi == lo:
        return np.full(s.shape, 0.5)
    if how == "minmax":
        return (s - lo) / (hi - lo)
    from scipy.stats import rankdata

    return (rankdata(s, method="average") - 1.0) / (len(s) - 1.0)


def patches_geojson(coords: np.ndarray, size0: int, values: dict[str, np.ndarray],
                    object_type: str = "tile") -> dict[str, Any]:
    """One Feature per patch: level-0 square polygon, ``measurements`` from ``values`` (name -> (N,))."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    s = int(size0)
    names = list(values)
    cols = [np.asarray(values[n], dtype=np.float64) for n in names]
    feats = [polygon_feature([square_ring(x, y, s)], {
        "objectType": object_type, "name": f"patch {i} ({x}, {y})",
        "measurements": {n: float(c[i]) for n, c in zip(names, cols)}}) for i, (x, y) in enumerate(coords.tolist())]
    return feature_collection(feats)


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise HeatmapError(f"{path}: missing or unreadable thumbnail")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def render_heatmap(thumbnail_png: str | os.PathLike | np.ndarray, slide_dims: Sequence[int] | str | os.PathLike,
                   coords: np.ndarray, scores: np.ndarray, patch_size_level0: int,
                   out_png: str | os.PathLike | None = None, out_geojson: str | os.PathLike | None = None, *,
                   score_name: str = "attention", normalise: str = "rank", alpha: float = 0.5,
                   object_type: str = "tile") -> np.ndarray:
    """Colour the patches ``coords`` (level-0 top-left, ``(N, 2)``) by ``scores`` ``(N,)`` over the thumbnail.

    ``slide_dims``: level-0 ``(width, height)``, or the tissue stage's ``tissue.json`` (its
    ``slide.dimensions``). Writes ``out_png`` / ``out_geojson`` when given; returns the RGB heatmap.
    """
    import cv2

    if isinstance(slide_dims, (str, os.PathLike)):
        try:
            meta = json.loads(Path(slide_dims).read_text())
            slide_dims = meta["slide"]["dimensions"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HeatmapError(f"{slide_dims}: cannot read the slide dimensions ({exc})") from None
    W, H = (int(v) for v in slide_dims)
    thumb = _read_rgb(Path(thumbnail_png)) if not isinstance(thumbnail_png, np.ndarray) else thumbnail_png
    th, tw = thumb.shape[:2]
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(scores):
        raise HeatmapError(f"{len(coords)} patch coordinates but {len(scores)} scores")
    size0 = int(patch_size_level0)
    if size0 < 1:
        raise HeatmapError(f"patch size must be >= 1 level-0 pixel (got {patch_size_level0})")
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= W) | (coords[:, 1] >= H)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise HeatmapError(f"{int(outside.sum())} patch(es) lie outside the {W}x{H} slide, e.g. "
                           f"({coords[i, 0]}, {coords[i, 1]}); scores and slide do not match")
    if not 0.0 <= alpha <= 1.0:
        raise HeatmapError(f"alpha must be within [0, 1] (got {alpha})")
    v = normalise_scores(scores, normalise)
    sx, sy = tw / W, th / H
    acc = np.zeros((th, tw), dtype=np.float64)
    cnt = np.zeros((th, tw), dtype=np.float64)
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(np.int64), 0, tw - 1)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(np.int64), 0, th - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + size0) * sx).astype(np.int64), x0 + 1, tw)
    y1 = np.clip(np.ceil((coords[:, 1] + size0) * sy).astype(np.int64), y0 + 1, th)
    for a, b, c, d, val in zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(), v.tolist()):
        acc[b:d, a:c] += val
        cnt[b:d, a:c] += 1.0
    covered = cnt > 0
    out = thumb.copy()
    if covered.any():
        level = np.zeros((th, tw), dtype=np.uint8)
        level[covered] = np.round(255.0 * acc[covered] / cnt[covered]).astype(np.uint8)
        colour = cv2.cvtColor(cv2.applyColorMap(level, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        blend = (1.0 - alpha) * thumb[covered].astype(np.float64) + alpha * colour[covered].astype(np.float64)
        out[covered] = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    if out_png is not None:
        write_png(out_png, out)
    if out_geojson is not None:
        gj = patches_geojson(coords, size0, {score_name: scores, "heatmap": v}, object_type=object_type)
        write_json_atomic(out_geojson, gj)
    return out


def read_scores(path: str | os.PathLike, column: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """``(coords (N, 2), scores (N,), column name)`` from a predict ``--attention-dir`` CSV.

    ``column="auto"``: ``attention`` if present, else ``score``, else the first ``score_*`` column.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise HeatmapError(f"{path}: score CSV not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise HeatmapError(f"{path}: cannot read score CSV ({exc})") from None
    if not {"x", "y"} <= set(df.columns):
        raise HeatmapError(f"{path}: needs columns x,y (has {list(df.columns)})")
    if column == "auto":
        cands = [c for c in df.columns if c in ("attention", "score")] or \
                [c for c in df.columns if str(c).startswith("score_")]
        if not cands:
            raise HeatmapError(f"{path}: no attention or score column (has {list(df.columns)})")
        column = cands[0]
    elif column not in df.columns:
        raise HeatmapError(f"{path}: no column {column!r} (has {list(df.columns)})")
    coords = df[["x", "y"]].to_numpy(dtype=np.int64)
    scores = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise HeatmapError(f"{path}: column {column!r} has missing or non-numeric values")
    return coords, scores, column


def heatmap_from_files(scores_csv: str | os.PathLike, tissue_dir: str | os.PathLike, grid_json: str | os.PathLike,
                       out_png: str | os.PathLike, out_geojson: str | os.PathLike, *, column: str = DEFAULTS["column"],
                       normalise: str = DEFAULTS["normalise"], alpha: float = DEFAULTS["alpha"],
                       object_type: str = DEFAULTS["object_type"]) -> dict[str, Any]:
    """The heatmap stage for one slide, from the cached stage outputs (see the module docstring)."""
    tissue_dir = Path(tissue_dir)
    coords, scores, column = read_scores(scores_csv, column)
    try:
        grid = json.loads(Path(grid_json).read_text())
        size0 = int(grid["read_plan"]["patch_size_level0_px"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HeatmapError(f"{grid_json}: not a readable grid file ({exc})") from None
    grid_coords = {tuple(c) for c in np.asarray(grid.get("coords", []), dtype=np.int64).reshape(-1, 2).tolist()}
    unknown = [tuple(c) for c in coords.tolist() if tuple(c) not in grid_coords]
    if unknown:
        raise HeatmapError(f"{scores_csv}: {len(unknown)} patch(es) are not in the grid {grid_json}, e.g. "
                           f"{unknown[0]}; the scores come from another grid")
    render_heatmap(tissue_dir / TISSUE_FILES["thumbnail"], tissue_dir / TISSUE_FILES["stats"], coords, scores, size0, out_png,
                   out_geojson, score_name=column, normalise=normalise, alpha=alpha, object_type=object_type)
    return {"n_patches": int(len(scores)), "column": column, "patch_size_level0_px": size0}


def write_failed(out_png: str | os.PathLike, out_geojson: str | os.PathLike) -> None:
    """Placeholder outputs of a slide that failed upstream (``on_slide_error: skip``): a grey image and
    an empty GeoJSON marked ``status: failed``."""
    write_png(out_png, np.full((64, 64, 3), 128, np.uint8))
    write_json_atomic(out_geojson, feature_collection(status="failed"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="wsipipe heatmap",
                                 description="MIL attention / instance-score heatmap PNG and QuPath GeoJSON")
    ap.add_argument("--scores", required=True, metavar="CSV", help="x,y,attention[,score...] CSV of one slide")
    ap.add_argument("--tissue-dir", required=True, metavar="DIR", help="the slide's tissue stage folder")
    ap.add_argument("--grid", required=True, metavar="GRID_JSON", help="the slide's grid JSON")
    ap.add_argument("--out-png", required=True)
    ap.add_argument("--out-geojson", required=True)
    ap.add_argument("--settings", default=None, help="the heatmap settings as a JSON object (defaults of the "
                                                     "options below)")
    ap.add_argument("--column", default=DEFAULTS["column"], help="score column (default: attention, else score)")
    ap.add_argument("--normalise", "--normalize", default=DEFAULTS["normalise"], choices=NORMALISE)
    ap.add_argument("--alpha", type=float, default=DEFAULTS["alpha"], help="opacity of the colours (default 0.5)")
    ap.add_argument("--object-type", default=DEFAULTS["object_type"], choices=["tile", "detection"])
    args = parse_with_settings(ap, argv, "heatmap")
    setup()
    from .failures import upstream_failure

    if upstream_failure(Path(args.tissue_dir) / TISSUE_FILES["stats"]) and not Path(args.scores).exists():
        write_failed(args.out_png, args.out_geojson)
        log.info("%s: slide failed upstream, placeholder written", args.tissue_dir)
        return 0
    try:
        info = heatmap_from_files(args.scores, args.tissue_dir, args.grid, args.out_png, args.out_geojson,
                                  column=args.column, normalise=args.normalise, alpha=args.alpha,
                                  object_type=args.object_type)
    except (HeatmapError, OSError) as exc:
        log.error("%s", exc)
        return 2
    log.info("%d patches (%s) -> %s, %s", info["n_patches"], info["column"], args.out_png, args.out_geojson)
    return 0


if __name__ == "__main__":
    sys.exit(main())
