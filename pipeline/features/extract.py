"""Feature extraction: the patches of one slide's grid through an encoder into a Zarr bag.

Patches are read and resized in DataLoader worker processes (each opens its own slide handle) and
handed over as uint8 arrays; conversion to float, normalisation and the model run on the device
(CUDA with bf16 autocast when available, CPU otherwise) under ``torch.inference_mode``. Features are
written chunk by chunk into a partial bag (:class:`pipeline.store.BagWriter`), so memory does not
grow with slide size and a killed job resumes from its last finished chunk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..provenance import provenance, sha256_file
from ..slide import Slide, SlideError, open_slide
from ..store import SCHEMA_VERSION, BagWriter
from .encoders import Encoder, create_encoder

DEFAULTS: dict[str, Any] = {
    "model": "resnet50_trunc",
    "tag": None,  # folder name under features/; default: the model name
    "pretrained": False,  # timm / hub weights (needs network)
    "weights": None,  # local weights file (safetensors or torch checkpoint)
    "seed": 0,  # seed of the random init when neither weights nor pretrained is set
    "batch_size": 64,
    "num_workers": 2,
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "chunk_rows": 1024,  # rows per Zarr chunk; rounded up to a multiple of batch_size
}


def merge_params(params: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(DEFAULTS)
    for k, v in (params or {}).items():
        if k not in DEFAULTS:
            raise ValueError(f"unknown features parameter {k!r} (known: {sorted(DEFAULTS)})")
        out[k] = v
    if int(out["batch_size"]) < 1:
        raise ValueError("features.batch_size must be >= 1")
    return out


def model_tag(params: dict[str, Any]) -> str:
    tag = params.get("tag") or params.get("model") or DEFAULTS["model"]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(tag))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"features.device={name!r} but CUDA is not available on this machine")
    return dev


class PatchReader(torch.utils.data.Dataset):
    """Reads patch ``i`` of a grid as a (patch_size, patch_size, 3) uint8 array (one slide handle per
    worker process, opened lazily)."""

    def __init__(self, slide_path: str, reader: str, mpp: float, coords: np.ndarray, plan: dict[str, Any]):
        self.slide_path, self.reader, self.mpp = slide_path, reader, mpp
        self.coords = np.asarray(coords, dtype=np.int64)
        self.plan = plan
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        import cv2

        if self._slide is None:
            self._slide = open_slide(self.slide_path, reader=self.reader, mpp=self.mpp)
        x, y = self.coords[i]
        p, r = self.plan["patch_size_px"], self.plan["read_size_px"]
        img = self._slide.read_region(int(x), int(y), self.plan["level"], r, r)
        if r != p:
            img = cv2.resize(img, (p, p), interpolation=cv2.INTER_AREA if r > p else cv2.INTER_LINEAR)
        return img


def _collate(items: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(items))


def fingerprint(slide_path: str | os.PathLike, grid_path: str | os.PathLike, params: dict[str, Any],
                weights: Any) -> str:
    st = Path(slide_path).stat()
    rec = {"slide": [Path(slide_path).name, st.st_size, st.st_mtime_ns], "grid": sha256_file(grid_path),
           "params": params, "weights": weights, "pipeline": __version__}
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()


class Progress:
    """Progress lines that read well in a terminal and in a log file (one line per update)."""

    def __init__(self, slide_id: str, total: int, start: int = 0, every_s: float = 10.0, stream=sys.stderr):
        self.slide_id, self.total, self.every_s, self.stream = slide_id, total, every_s, stream
        self.t0 = self.last = time.monotonic()
        self.done0 = start  # rows done before this run (resume): not counted in the rate

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = (done - self.done0) / max(now - self.t0, 1e-9)
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        print(f"[features] {self.slide_id}: {done}/{self.total} patches ({pct:.0f}%) "
              f"{rate:.1f} patches/s eta {eta:.0f}s", file=self.stream, flush=True)


def embed_batch(encoder: Encoder, batch_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, D) on the CPU. Normalisation happens on the device."""
    x = batch_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(encoder.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if device.type == "cuda" and encoder.precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if encoder.precision == "bf16" else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            out = encoder.embed(x)
    else:
        out = encoder.embed(x)
    return out.float().cpu()


def extract_slide(slide: Slide, grid: dict[str, Any], grid_path: str | os.PathLike, out_path: str | os.PathLike,
                  params: dict[str, Any] | None = None, encoder: Encoder | None = None,
                  log=sys.stderr) -> dict[str, Any]:
    """Extract features for every patch of ``grid`` and write the bag at ``out_path``.

    Resumes a partial bag left by an interrupted run when the inputs and settings are unchanged.
    """
    p = merge_params(params)
    plan = grid["read_plan"]
    coords = np.asarray(grid["coords"], dtype=np.int64).reshape(-1, 2)
    n = int(coords.shape[0])
    device = resolve_device(str(p["device"]))
    if encoder is None:
        encoder = create_encoder(p["model"], weights=p["weights"], pretrained=p["pretrained"], seed=p["seed"],
                                 input_size=int(plan["patch_size_px"]))
    encoder.model.to(device)
    bs = int(p["batch_size"])
    chunk_rows = bs * max(1, math.ceil(int(p["chunk_rows"]) / bs))
    fp = fingerprint(slide.path, grid_path, p, encoder.weights)
    writer = BagWriter(out_path, n, encoder.embed_dim, fingerprint=fp, chunk_rows=chunk_rows)
    start = writer.rows_done
    if start:
        print(f"[features] {slide.slide_id}: resuming at patch {start}/{n} from {writer.tmp}", file=log, flush=True)
    t0 = time.monotonic()
    if start < n:
        ds = PatchReader(str(slide.path), slide.reader, slide.mpp, coords[start:], plan)
        workers = int(p["num_workers"])
        loader = torch.utils.data.DataLoader(
            ds, batch_size=bs, shuffle=False, num_workers=workers, collate_fn=_collate,
            pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False)
        progress = Progress(slide.slide_id, n, start=start, stream=log)
        row = start
        with torch.inference_mode():
            for batch in loader:
                if tuple(batch.shape[1:3]) != (plan["patch_size_px"],) * 2:
                    raise SlideError(slide.path, f"patch shape {tuple(batch.shape)} does not match the read plan")
                feats = embed_batch(encoder, batch, device)
                if not torch.isfinite(feats).all():
                    raise RuntimeError(f"{slide.path}: encoder produced non-finite features at rows {row}..")
                writer.write(row, feats.numpy(), coords[row:row + feats.shape[0]])
                row += feats.shape[0]
                progress.update(row)
        progress.update(row, force=True)
    elapsed = time.monotonic() - t0
    attrs = {
        "slide_id": slide.slide_id,
        "n_patches": n,
        "feature_dim": int(encoder.embed_dim),
        "model": encoder.name,
        "model_tag": model_tag(p),
        "weights": encoder.weights,
        "target_mpp": float(plan["requested_mpp"]),
        "effective_mpp": float(plan["effective_mpp"]),
        "patch_size_px": int(plan["patch_size_px"]),
        "patch_size_level0_px": int(plan["patch_size_level0_px"]),
        "level0_mpp": float(slide.mpp),
        "mpp_source": slide.mpp_source,
        "schema_version": SCHEMA_VERSION,
        "pipeline_version": __version__,
        "provenance": provenance("features", p, slide=slide.info(), read_plan=plan, device=str(device),
                                 resumed_from=start, seconds=round(elapsed, 3), fingerprint=fp),
    }
    writer.finalize(attrs)
    return attrs
