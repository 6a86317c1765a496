"""Stage entry points called by the Snakemake rules (and usable by hand).

    python -m pipeline tissue   --slide PATH --out-dir DIR  [--settings JSON] [slide options]
    python -m pipeline grid     --slide PATH --tissue-dir DIR --out FILE [--settings JSON] [slide options]
    python -m pipeline features --slide PATH --grid FILE --out BAG [--settings JSON] [slide options]

Slide options: --reader auto|openslide|tiffslide, --labels CSV (per-slide ``mpp`` column),
--default-mpp M. A slide that cannot be used is reported with one line naming the file and the reason,
and recorded in ``{results}/failures/`` when --results-dir is given. With ``--on-error fail`` (default
when used by hand) the command exits 1 and writes nothing; with ``--on-error skip`` it writes explicit
*failed* outputs (``"status": "failed"``) so downstream stages and MIL go on without that slide.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from .slide import Slide, SlideError, manifest_mpp, open_slide, read_manifest, slide_id_from_path


def _settings(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        val = json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"error: --settings is not valid JSON ({exc})") from exc
    if not isinstance(val, dict):
        raise SystemExit("error: --settings must be a JSON object")
    return val


def _open(args: argparse.Namespace) -> Slide:
    mpp = args.mpp
    if mpp is None and args.labels:
        mpp = manifest_mpp(read_manifest(args.labels), slide_id_from_path(args.slide))
    return open_slide(args.slide, reader=args.reader, mpp=mpp, default_mpp=args.default_mpp)


def _failed_tissue(args: argparse.Namespace, reason: str) -> None:
    """Explicit failed tissue outputs: empty mask, blank thumbnail, empty GeoJSON, status in tissue.json."""
    from .provenance import provenance, write_json_atomic
    from .tissue import write_png

    out = Path(args.out_dir)
    write_png(out / "mask.png", np.zeros((1, 1), np.uint8))
    write_png(out / "thumbnail.png", np.full((64, 64, 3), 128, np.uint8))
    write_json_atomic(out / "tissue.geojson", {"type": "FeatureCollection", "features": []})
    write_json_atomic(out / "tissue.json", {"slide_id": slide_id_from_path(args.slide), "status": "failed",
                                            "stage": "tissue", "error": reason,
                                            "provenance": provenance("tissue", _settings(args.settings))})


def cmd_tissue(args: argparse.Namespace) -> None:
    from .tissue import run_tissue

    with _open(args) as slide:
        res = run_tissue(slide, Path(args.out_dir), _settings(args.settings))
    st = res.get("stats", {})
    print(f"[tissue] {res['slide_id']}: tissue {st.get('tissue_area_mm2', 0):.2f} mm², "
          f"mpp {res['slide']['level0_mpp']:.4g} ({res['slide']['mpp_source']})", file=sys.stderr)


def _failed_grid(args: argparse.Namespace, reason: str, stage: str = "grid") -> None:
    from .provenance import provenance, write_json_atomic

    write_json_atomic(args.out, {"slide_id": slide_id_from_path(args.slide), "status": "failed", "stage": stage,
                                 "error": reason, "n_patches": 0, "coords": [], "tissue_fraction": [],
                                 "read_plan": None, "provenance": provenance("grid", _settings(args.settings))})


def _upstream_failure(path: Path) -> dict[str, Any] | None:
    """The failure recorded in an upstream stage's JSON output, if it failed."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("status") == "failed" else None


def cmd_grid(args: argparse.Namespace) -> None:
    from .grid import run_grid

    up = _upstream_failure(Path(args.tissue_dir) / "tissue.json")
    if up:
        _failed_grid(args, up.get("error", "failed upstream"), stage=up.get("stage", "tissue"))
        print(f"[grid] {slide_id_from_path(args.slide)}: skipped, {up.get('stage')} failed", file=sys.stderr)
        return
    with _open(args) as slide:
        g = run_grid(slide, Path(args.tissue_dir), Path(args.out), _settings(args.settings))
    plan = g["read_plan"]
    print(f"[grid] {g['slide_id']}: {g['n_patches']}/{g['n_candidates']} patches of {plan['patch_size_px']} px "
          f"at {plan['effective_mpp']:.4g} µm/px (requested {plan['requested_mpp']}); level {plan['level']} "
          f"read {plan['read_size_px']} px", file=sys.stderr)


def _pinned(settings: dict[str, Any], lock_file: str) -> dict[str, Any]:
    """Use the weights file pinned by ``prefetch_weights`` instead of contacting the hub."""
    try:
        rec = json.loads(Path(lock_file).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable weights lock {lock_file} ({exc})") from exc
    if rec.get("path"):
        return {**settings, "weights": rec["path"], "pretrained": False}
    return settings  # no hub file (timm-hosted or random): the encoder resolves it as configured


def _failed_bag(args: argparse.Namespace, reason: str, stage: str = "features") -> None:
    """A schema-valid empty bag marked ``status: failed`` (MIL leaves such bags out and says so)."""
    import torch

    from . import __version__
    from .features import create_encoder
    from .features.extract import merge_params
    from .store import model_tag
    from .provenance import provenance
    from .store import write_bag

    p = merge_params(_settings(args.settings))
    with torch.device("meta"):  # only the embedding size is needed: no memory, no weights
        dim = create_encoder(p["model"]).embed_dim
    write_bag(args.out, np.zeros((0, dim), np.float32), np.zeros((0, 2), np.int32), {
        "slide_id": slide_id_from_path(args.slide), "status": "failed", "stage": stage, "error": reason,
        "model": p["model"], "model_tag": model_tag(p), "weights": None, "target_mpp": None,
        "patch_size_px": None, "level0_mpp": None, "mpp_source": None, "pipeline_version": __version__,
        "provenance": provenance("features", p)})


def cmd_features(args: argparse.Namespace) -> None:
    from .features.extract import extract_slide
    from .grid import load_grid

    up = _upstream_failure(Path(args.grid))
    if up:
        _failed_bag(args, up.get("error", "failed upstream"), stage=up.get("stage", "grid"))
        print(f"[features] {slide_id_from_path(args.slide)}: skipped, {up.get('stage')} failed", file=sys.stderr)
        return
    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    grid = load_grid(args.grid)
    with _open(args) as slide:
        grid_mpp = grid["read_plan"]["level0_mpp"]
        if abs(grid_mpp - slide.mpp) > 1e-9 * max(1.0, grid_mpp):
            raise SlideError(slide.path, f"level-0 mpp {slide.mpp} differs from the grid's {grid_mpp} "
                                         f"({args.grid} is stale: rerun the grid stage)")
        settings = _settings(args.settings)
        if args.weights_lock:
            settings = _pinned(settings, args.weights_lock)
        attrs = extract_slide(slide, grid, args.grid, Path(args.out), settings)
    print(f"[features] {attrs['slide_id']}: bag with {len(grid['coords'])} patches written to {args.out}",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def slide_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--slide", required=True, help="slide file")
        p.add_argument("--reader", default="auto", choices=["auto", "openslide", "tiffslide"])
        p.add_argument("--labels", default=None, help="labels/manifest CSV (slide_id[,mpp])")
        p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px of this slide (overrides metadata)")
        p.add_argument("--default-mpp", type=float, default=None,
                       help="fallback level-0 µm/px for slides without metadata")
        p.add_argument("--settings", default=None, help="the stage's settings as a JSON object")
        p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                       help="fail: exit 1; skip: write explicit failed outputs and exit 0")
        p.add_argument("--results-dir", default=None, help="record failures under RESULTS/failures/")

    p = sub.add_parser("tissue", help="tissue segmentation of one slide")
    slide_opts(p)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(fn=cmd_tissue)
    p = sub.add_parser("grid", help="patch grid of one slide")
    slide_opts(p)
    p.add_argument("--tissue-dir", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_grid)
    p = sub.add_parser("features", help="feature extraction of one slide into a Zarr bag")
    slide_opts(p)
    p.add_argument("--grid", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: torch's)")
    p.add_argument("--weights-lock", default=None, help="lock file written by prefetch_weights")
    p.set_defaults(fn=cmd_features)

    args = ap.parse_args(argv)
    from . import failures

    sid = slide_id_from_path(args.slide)
    try:
        args.fn(args)
    except Exception as exc:  # noqa: BLE001 - every failure is reported per slide, in one line
        if isinstance(exc, SlideError):
            reason = exc.reason if exc.path == str(args.slide) else str(exc)
        elif isinstance(exc, (ValueError, OSError)):
            reason = str(exc)
        else:  # unexpected: keep the traceback in the job log
            traceback.print_exc(file=sys.stderr)
            reason = f"{type(exc).__name__}: {exc}"
        reason = failures.one_line(reason)
        print(f"ERROR [{args.cmd}] {args.slide}: {reason}", file=sys.stderr)
        if args.results_dir:
            failures.record_failure(args.results_dir, sid, args.cmd, reason, args.slide)
        if args.on_error == "fail":
            return 1
        {"tissue": _failed_tissue, "grid": _failed_grid, "features": _failed_bag}[args.cmd](args, reason)
        print(f"[{args.cmd}] {sid}: failed outputs written (on_slide_error=skip)", file=sys.stderr)
        return 0
    if args.results_dir:
        failures.clear_failure(args.results_dir, sid, args.cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
