"""Existing features in and out: CLAM / TRIDENT / STAMP ``.h5`` feature files <-> our Zarr bags.

What those tools write (from their documentation and file layouts; no code of theirs is used here):

* **CLAM** (``extract_features_fp.py``, ``h5_files/{slide}.h5``): datasets ``features`` (N, D) and
  ``coords`` (N, 2), level-0 (x, y) of each patch's top-left corner. The patch-coordinate files of its
  patching step carry ``patch_size`` and ``patch_level`` (and sometimes ``downsample``) as attributes of
  ``coords``; feature files often carry no attribute at all, so the encoder and resolution are unknown.
* **TRIDENT** (``{job_dir}/{mag}x_{size}px_{overlap}px_overlap/features_{encoder}/{slide}.h5``):
  ``features`` (N, D) and ``coords`` (N, 2) level-0 pixels, with attributes of ``coords`` such as
  ``patch_size`` (at the target magnification), ``patch_size_level0``, ``target_magnification`` and
  ``level0_magnification``. The encoder is named by the folder (``features_uni_v1``) and sometimes by an
  attribute.
* **STAMP** (``{output_dir}/{extractor id}/{slide}.h5``): ``feats`` (N, D) and ``coords`` (N, 2) in µm
  (``unit = "um"``), file attributes ``extractor``, ``tile_size_um``, ``tile_size_px`` (and
  ``stamp_version``, ``code_hash``, ``feat_type``). The patch µm/px is ``tile_size_um / tile_size_px``;
  level-0 pixels need the slide's µm/px.

Some writers store ``features`` as (1, N, D); both shapes are read. Imported bags follow the bag schema
(:mod:`pipeline.store`) with provenance stage ``import``; what the source file said is recorded under the
attribute ``imported`` (``format``, ``source_file``, ``said``, ``from``: where each value came from), and
what it did not say is ``None`` and listed in ``imported.unknown``. MIL refuses to mix bags whose encoder
is unknown with other bags unless told to (:func:`pipeline.mil.data.check_compatible`).

Export writes CLAM's layout (``features`` float32 (N, D), ``coords`` int64 (N, 2) level-0, ``coords``
attributes ``patch_size`` = the level-0 patch size and ``patch_level`` = 0) plus our attributes on the
file, so CLAM-style tools read it and nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .files import atomic_path
from .provenance import content_fingerprint, provenance
from .store import SCHEMA_VERSION, BagError, list_bags, read_bag, write_bag

FORMATS = ("auto", "clam", "trident", "stamp")
ENCODER_KEYS = ("encoder", "patch_encoder", "model", "model_name", "extractor", "feature_extractor", "backbone")
FLOAT16_MAX = 65504.0


class FeatureImportError(ValueError):
    """A feature file cannot be imported: the message names the file and the reason."""


def _h5py():
    import h5py

    return h5py


def _plain(v: Any) -> Any:
    """h5py attribute values -> JSON-able Python values."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.dtype.kind in "SOU" else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def read_feature_h5(path: str | os.PathLike) -> dict[str, Any]:
    """Arrays and attributes of a CLAM / TRIDENT / STAMP feature file (no interpretation yet)."""
    h5py = _h5py()
    p = Path(path)
    try:
        fh = h5py.File(p, "r")
    except OSError as exc:
        raise FeatureImportError(f"{p}: not a readable HDF5 file ({exc})") from exc
    with fh:
        fkey = "features" if "features" in fh else "feats" if "feats" in fh else None
        if fkey is None or "coords" not in fh:
            raise FeatureImportError(f"{p}: expected datasets 'features' (or 'feats') and 'coords', found {sorted(fh.keys())}")
        feats = np.asarray(fh[fkey][()])
        coords = np.asarray(fh["coords"][()])
        attrs = {
            "file": {k: _plain(v) for k, v in fh.attrs.items()},
            "features": {k: _plain(v) for k, v in fh[fkey].attrs.items()},
            "coords": {k: _plain(v) for k, v in fh["coords"].attrs.items()},
        }
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2:
        raise FeatureImportError(f"{p}: '{fkey}' has shape {feats.shape}, expected (N, D) or (1, N, D)")
    if coords.shape != (feats.shape[0], 2):
        raise FeatureImportError(f"{p}: 'coords' has shape {coords.shape}, expected ({feats.shape[0]}, 2) to match "
                           f"'{fkey}' {feats.shape}")
    return {"path": p, "features_key": fkey, "features": feats, "coords": coords, "attrs": attrs}


def detect_format(raw: dict[str, Any]) -> str:
    a = raw["attrs"]
    if raw["features_key"] == "feats" or "tile_size_um" in a["file"] or a["file"].get("unit") == "um":
        return "stamp"
    merged = {**a["file"], **a["features"], **a["coords"]}
    if any(k in merged for k in ("patch_size_level0", "target_magnification", "level0_magnification")) \
            or raw["path"].parent.name.startswith("features_"):
        return "trident"
    return "clam"


def _num(v: Any) -> float | None:
    try:
        f = float(v[0] if isinstance(v, (list, tuple)) else v)
    except (TypeError, ValueError, IndexError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def import_h5(path: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str = "auto",
              encoder: str | None = None, level0_mpp: float | None = None, mpp_source: str | None = None,
              target_mpp: float | None = None, slide_id: str | None = None, batch: str | None = None,
              overwrite: bool = False, tag: str | None = None) -> Path:
    """Import one feature file into ``{out_dir}/{slide_id}.zarr``.

    ``encoder``, ``level0_mpp`` (with ``mpp_source``), ``target_mpp``: what the user knows and the file
    may not say (a value the file states wins only when they agree; a contradiction is an error).
    ``batch``: the id shared by the bags of one import (default: derived from the source folder).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    raw = read_feature_h5(path)
    p: Path = raw["path"]
    fmt = detect_format(raw) if fmt == "auto" else fmt
    a = raw["attrs"]
    merged = {**a["file"], **a["features"], **a["coords"]}
    said: dict[str, Any] = {}
    source: dict[str, str] = {}
    if level0_mpp is None and _num(merged.get("level0_mpp")):
        level0_mpp, mpp_source = _num(merged.get("level0_mpp")), "file"

    # encoder
    file_enc = next((str(merged[k]) for k in ENCODER_KEYS if merged.get(k) not in (None, "")), None)
    if file_enc is None and fmt == "trident" and p.parent.name.startswith("features_"):
        file_enc, source["model"] = p.parent.name[len("features_"):], "folder name"
    elif file_enc is not None:
        source["model"] = "file"
    if file_enc is not None and encoder is not None and file_enc != encoder:
        raise FeatureImportError(f"{p}: the file says encoder {file_enc!r} ({source['model']}) but {encoder!r} was given")
    model = file_enc or encoder
    if model is not None and "model" not in source:
        source["model"] = "user"

    # resolution and patch size
    feats = raw["features"]
    coords = np.asarray(raw["coords"], dtype=np.float64)
    size_px = size0 = t_mpp = None
    if fmt == "stamp":
        tile_um, tile_px = _num(merged.get("tile_size_um")), _num(merged.get("tile_size_px"))
        unit = str(merged.get("unit") or "um")
        if unit not in ("um", "µm", "micron", "microns"):
            raise FeatureImportError(f"{p}: STAMP coords unit {unit!r} (expected um)")
        if tile_um and tile_px:
            size_px, t_mpp = int(round(tile_px)), tile_um / tile_px
            source.update(patch_size_px="file", target_mpp="file (tile_size_um / tile_size_px)")
        if level0_mpp is None:
            raise FeatureImportError(f"{p}: STAMP coordinates are in µm and the file does not say the slide's µm/px: "
                               "give level0_mpp (--level0-mpp, or --slides to read it from the slides)")
        coords = coords / level0_mpp
        if tile_um:
            size0 = int(round(tile_um / level0_mpp))
            source["patch_size_level0_px"] = "file + level0_mpp"
    else:
        cps = _num(merged.get("patch_size_px")) or _num(merged.get("patch_size"))  # ours (export) or CLAM/TRIDENT
        ps0 = _num(merged.get("patch_size_level0_px")) or _num(merged.get("patch_size_level0"))
        lvl = merged.get("patch_level")
        if _num(merged.get("patch_size_px")) and lvl == 0:
            lvl = None  # our own export: patch_size/patch_level describe the level-0 footprint
        ds = _num(merged.get("downsample"))
        if cps:
            size_px = int(round(cps))
            source["patch_size_px"] = "file"
        if ps0:
            size0 = int(round(ps0))
            source["patch_size_level0_px"] = "file"
        elif cps and lvl is not None and (int(lvl) == 0 or ds):
            size0 = int(round(cps * (ds if int(lvl) != 0 else 1.0)))
            source["patch_size_level0_px"] = "file (patch_size x downsample of patch_level)"
        for key in ("target_mpp", "mpp"):
            if _num(merged.get(key)):
                t_mpp = _num(merged.get(key))
                source["target_mpp"] = "file"
                break
        if t_mpp is None and level0_mpp is not None and size_px and size0:
            t_mpp = level0_mpp * size0 / size_px
            source["target_mpp"] = "level0_mpp x patch_size_level0 / patch_size"
    if target_mpp is not None:
        if t_mpp is not None and abs(t_mpp - target_mpp) > 0.01 * target_mpp:
            raise FeatureImportError(f"{p}: the file gives {t_mpp:.4g} µm/px per patch but target_mpp={target_mpp} was given")
        if t_mpp is None:
            t_mpp, source["target_mpp"] = float(target_mpp), "user"
    if level0_mpp is not None:
        source["level0_mpp"] = mpp_source or "user"
    for k in ("patch_size", "patch_size_level0", "patch_level", "downsample", "target_magnification",
              "level0_magnification", "overlap", "tile_size_um", "tile_size_px", "unit", "extractor",
              "stamp_version", "code_hash", "feat_type", "encoder", "model", "model_name", "mpp", "target_mpp",
              "level0_mpp", "name"):
        if k in merged:
            said[k] = merged[k]

    if not np.isfinite(feats).all():
        raise FeatureImportError(f"{p}: features contain NaN or infinite values")
    if np.abs(feats).max(initial=0.0) > FLOAT16_MAX:
        raise FeatureImportError(f"{p}: features exceed the float16 range of the bag schema (|x| max "
                           f"{float(np.abs(feats).max()):.4g} > {FLOAT16_MAX})")
    if np.any(coords < 0):
        raise FeatureImportError(f"{p}: negative coordinates")
    sid = unicodedata.normalize("NFC", slide_id or p.stem)
    out = Path(out_dir) / f"{sid}.zarr"
    if out.exists() and not overwrite:
        raise FeatureImportError(f"{out}: a bag for slide {sid!r} already exists (overwrite to replace it)")
    batch = batch or hashlib.sha256(f"{p.parent.resolve()}|{fmt}".encode()).hexdigest()[:16]
    values = {"model": model, "weights": None, "target_mpp": t_mpp, "patch_size_px": size_px,
              "patch_size_level0_px": size0, "level0_mpp": level0_mpp}
    unknown = [k for k, v in values.items() if v is None]
    imported = {"format": fmt, "source_file": str(p.resolve()), "source_fingerprint": content_fingerprint(p),
                "said": said, "from": source, "unknown": unknown, "batch": batch}
    attrs = {
        "slide_id": sid, "model": model, "model_tag": tag or model or "imported", "weights": None,
        "target_mpp": t_mpp, "effective_mpp": t_mpp, "patch_size_px": size_px,
        "patch_size_level0_px": size0, "level0_mpp": level0_mpp,
        "mpp_source": source.get("level0_mpp"), "schema_version": SCHEMA_VERSION, "pipeline_version": __version__,
        "status": "imported", "imported": imported,
        "provenance": provenance("import", {"format": fmt, "encoder": encoder, "level0_mpp": level0_mpp,
                                            "target_mpp": target_mpp}, source=imported),
    }
    return write_bag(out, feats.astype(np.float32), np.rint(coords).astype(np.int32), attrs)


def import_folder(src: str | os.PathLike, out_dir: str | os.PathLike, *, slides: dict[str, Path] | None = None,
                  reader: str = "auto", log=sys.stderr, **kw: Any) -> dict[str, Any]:
    """Import every ``*.h5`` of ``src`` (a folder, or one file). ``slides``: id -> slide path, to read each
    slide's level-0 µm/px (needed for STAMP files, used to derive the patch µm/px of CLAM/TRIDENT files).
    Returns ``{"imported": [paths], "failed": {file: reason}}``; one file's failure does not stop the others."""
    src = Path(src)
    files = [src] if src.is_file() else sorted(f for f in src.glob("*.h5") if not f.name.startswith("."))
    if not files:
        raise FeatureImportError(f"{src}: no .h5 feature files")
    batch = hashlib.sha256(f"{(src if src.is_dir() else src.parent).resolve()}".encode()).hexdigest()[:16]
    done, failed = [], {}
    for f in files:
        args = dict(kw)
        sid = unicodedata.normalize("NFC", f.stem)
        if slides and args.get("level0_mpp") is None:
            if sid in slides:
                from .slide import open_slide

                try:
                    with open_slide(slides[sid], reader=reader) as s:
                        args["level0_mpp"], args["mpp_source"] = s.mpp, f"slide ({s.mpp_source})"
                except Exception as exc:  # noqa: BLE001 - reported per file
                    failed[str(f)] = f"cannot read the slide's µm/px from {slides[sid]}: {exc}"
                    print(f"ERROR [import] {f}: {failed[str(f)]}", file=log)
                    continue
        try:
            done.append(import_h5(f, out_dir, batch=batch, **args))
        except (FeatureImportError, BagError, OSError, ValueError) as exc:
            failed[str(f)] = str(exc)
            print(f"ERROR [import] {exc}", file=log)
            continue
        print(f"[import] {f.name} -> {done[-1]}", file=log)
    return {"imported": done, "failed": failed}


def export_bag_h5(bag_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write one bag in CLAM's ``.h5`` layout (atomically)."""
    h5py = _h5py()
    bag = read_bag(bag_path)
    if bag.attrs.get("status") == "failed":
        raise BagError(f"{bag_path}: a failed slide's bag ({bag.attrs.get('error')}); not exported")
    out = Path(out_path)
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("features", data=np.asarray(bag.features, dtype=np.float32))
            c = fh.create_dataset("coords", data=np.asarray(bag.coords, dtype=np.int64))
            size0 = bag.attrs.get("patch_size_level0_px")
            if size0 is not None:
                c.attrs["patch_size"] = int(size0)
                c.attrs["patch_level"] = 0
            for k, v in bag.attrs.items():
                if k == "provenance":
                    continue
                fh.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) or v is None else v
            fh.attrs["encoder"] = str(bag.attrs.get("model"))
            fh.attrs["exported_by"] = f"wsipipe {__version__}"
    return out


def export_folder(bags: str | os.PathLike, out_dir: str | os.PathLike, log=sys.stderr) -> list[Path]:
    """Export every finished bag of a folder (or one bag) to ``{out_dir}/{slide_id}.h5``."""
    src = Path(bags)
    paths = [src] if src.suffix == ".zarr" else list_bags(src)
    out = []
    for b in paths:
        try:
            out.append(export_bag_h5(b, Path(out_dir) / f"{b.stem}.h5"))
        except BagError as exc:
            print(f"skipped: {exc}", file=log)
            continue
        print(f"[export] {b} -> {out[-1]}", file=log)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.store", description=(
        "Import CLAM / TRIDENT / STAMP .h5 feature files as Zarr bags, or export bags to CLAM's .h5 layout."))
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("import", help="a folder (or file) of .h5 feature files -> Zarr bags")
    i.add_argument("src", help="folder of .h5 files (e.g. CLAM h5_files/, TRIDENT features_uni_v1/) or one file")
    i.add_argument("--out", required=True, help="bag folder, e.g. results/features/uni_v1")
    i.add_argument("--format", default="auto", choices=FORMATS)
    i.add_argument("--encoder", default=None, help="the encoder that made the features, if the files do not say")
    i.add_argument("--level0-mpp", type=float, default=None, help="level-0 µm/px of every slide")
    i.add_argument("--target-mpp", type=float, default=None, help="µm/px of the patches, if the files do not say")
    i.add_argument("--slides", default=None, help="slides folder: read each slide's level-0 µm/px")
    i.add_argument("--slides-csv", default=None, help="slide list CSV (slide_id,path): as --slides")
    i.add_argument("--recursive", action="store_true", help="search --slides recursively")
    i.add_argument("--tag", default=None, help="model_tag recorded in the bags (default: the encoder)")
    i.add_argument("--overwrite", action="store_true", help="replace existing bags")
    e = sub.add_parser("export", help="Zarr bags -> CLAM-layout .h5 files")
    e.add_argument("bags", help="bag folder or one .zarr bag")
    e.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "import":
            slides = None
            if args.slides or args.slides_csv:
                from .slide import discover_cohort

                slides = discover_cohort(slides_dir=args.slides, slides_csv=args.slides_csv,
                                         recursive=args.recursive)
            res = import_folder(args.src, args.out, slides=slides, fmt=args.format, encoder=args.encoder,
                                level0_mpp=args.level0_mpp, target_mpp=args.target_mpp, tag=args.tag,
                                overwrite=args.overwrite)
            print(f"imported {len(res['imported'])} file(s), {len(res['failed'])} failed", file=sys.stderr)
            return 1 if res["failed"] else 0
        out = export_folder(args.bags, args.out)
        print(f"exported {len(out)} bag(s) to {args.out}", file=sys.stderr)
        return 0
    except (FeatureImportError, BagError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
