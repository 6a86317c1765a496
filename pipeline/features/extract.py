"""Feature extraction: the patches of one slide's grid through an encoder into a Zarr bag.

Patches are read in runs of adjacent patches (one region read per run, via the direct tiled-JPEG
decoder where the file allows it) and resized by reader threads that share one slide handle and one
decoded-tile cache; JPEG decoding and resizing release the GIL, so threads scale without any pickling or
inter-process copies. uint8 arrays are handed to the device (pinned memory, asynchronous copy on CUDA);
conversion to float, normalisation and the model run on the device (CUDA with bf16 autocast when
available, CPU otherwise) under ``torch.inference_mode``. The next slide's readers start while the
current slide is being encoded (:func:`extract_slides`). Features are
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
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..files import sha256_file
from ..provenance import provenance
from ..slide import Slide, SlideChangedError, SlideError, open_slide, slide_stamp
from ..config import model_tag, resolve
from ..store import SCHEMA_VERSION, BagWriter, write_bag
from . import create_encoder
from .encoders import Encoder

def resolve_settings(params: dict[str, Any] | None) -> dict[str, Any]:
    """The stage's settings (``features`` section, defaults from :mod:`pipeline.config`); unknown keys or
    invalid values raise ValueError naming the key."""
    return resolve("features", params)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"features.device={name!r} but CUDA is not available on this machine")
    return dev


def plan_runs(coords: np.ndarray, size0: int, max_run: int = 16, boundaries: int = 0) -> list[tuple[int, int]]:
    """Split grid rows into runs of horizontally adjacent patches (same y, x increasing by at most the
    patch size) that are read with one ``read_region`` call. Runs never cross a multiple of
    ``boundaries`` (the chunk size), so a resumed extraction reads exactly the same runs."""
    runs: list[tuple[int, int]] = []
    n = int(coords.shape[0])
    i = 0
    while i < n:
        j = i + 1
        while (j < n and j - i < max_run and coords[j, 1] == coords[i, 1]
               and 0 < coords[j, 0] - coords[j - 1, 0] <= size0 and not (boundaries and j % boundaries == 0)):
            j += 1
        runs.append((i, j))
        i = j
    return runs


class RunReader:
    """Item ``k`` = run ``k`` of patches as one uint8 tensor (n, P, P, 3), read with a single region read
    per run. Thread-safe: reader threads (:class:`Prefetcher`) share one instance, hence one slide handle
    and one decoded-tile cache; JPEG decoding and resizing release the GIL, and arrays are handed over in
    memory (no pickling, no IPC).

    Each patch's pixels are ``level[round(y/ds):+r, round(x/ds):+r]`` resized to P x P, whatever run it
    falls in: regions start on the level's own pixel grid, so grouping never shifts a patch.
    """

    def __init__(self, slide_path: str, reader: str, mpp: float, coords: np.ndarray, plan: dict[str, Any],
                 runs: list[tuple[int, int]]):
        self.slide_path, self.reader, self.mpp = slide_path, reader, mpp
        self.coords = np.asarray(coords, dtype=np.int64)
        self.plan, self.runs = plan, runs
        self._slide = open_slide(self.slide_path, reader=self.reader, mpp=self.mpp)

    def __len__(self) -> int:
        return len(self.runs)

    def close(self) -> None:
        self._slide.close()

    def __getitem__(self, k: int) -> torch.Tensor:
        import cv2

        a, b = self.runs[k]
        level, ds = int(self.plan["level"]), float(self.plan["level_downsample"])
        p, r = int(self.plan["patch_size_px"]), int(self.plan["read_size_px"])
        lx = np.rint(self.coords[a:b, 0] / ds).astype(np.int64)  # patch origins in level pixels
        ly = int(np.rint(self.coords[a, 1] / ds))
        x0 = int(lx[0])
        width = int(lx[-1] - x0 + r)
        region = self._slide.read_level_region(level, x0, ly, width, r)
        out = np.empty((b - a, p, p, 3), dtype=np.uint8)
        interp = cv2.INTER_AREA if r > p else cv2.INTER_LINEAR
        for i, x in enumerate(lx - x0):
            crop = region[:, x:x + r]
            out[i] = crop if r == p else cv2.resize(crop, (p, p), interpolation=interp)
        return torch.from_numpy(out)


class Prefetcher:
    """Reads runs ``0..n-1`` with ``workers`` threads, at most ``depth`` runs ahead, and yields them in
    order. Reading starts on construction, so a slide's prefetcher created early (the next slide) fills
    while the current slide is being encoded. ``workers=0`` reads in the consuming thread."""

    def __init__(self, reader, n_items: int, workers: int, depth: int | None = None, pin: bool = False):
        import collections
        from concurrent.futures import ThreadPoolExecutor

        self.n, self.next_submit, self.workers, self.pin = n_items, 0, workers, pin
        self.reader = reader  # thread-safe: reader[k] -> tensor
        self._pending: collections.deque = collections.deque()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="patch-reader") if workers > 0 else None
        self.depth = depth or max(2, 4 * workers)
        self._fill()

    def _read(self, k: int) -> torch.Tensor:
        block = self.reader[k]
        return block.pin_memory() if self.pin else block

    def _fill(self) -> None:
        while self._pool is not None and self.next_submit < self.n and len(self._pending) < self.depth:
            self._pending.append(self._pool.submit(self._read, self.next_submit))
            self.next_submit += 1

    def __iter__(self):
        try:
            if self._pool is None:
                for k in range(self.n):
                    yield self._read(k)
                return
            while self._pending:
                fut = self._pending.popleft()
                self._fill()
                yield fut.result()
        finally:
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            for fut in self._pending:
                fut.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()


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


class _SlideRun:
    """One slide's extraction state: its partial bag and a reader already prefetching patches."""

    def __init__(self, slide: Slide, grid: dict[str, Any], grid_path: str | os.PathLike, out_path: str | os.PathLike,
                 p: dict[str, Any], encoder: Encoder, device: torch.device, log):
        self.slide, self.p, self.encoder, self.device, self.log = slide, p, encoder, device, log
        self.plan = grid["read_plan"]
        self.coords = np.asarray(grid["coords"], dtype=np.int64).reshape(-1, 2)
        self.n = int(self.coords.shape[0])
        self.bs = int(p["batch_size"])
        chunk_rows = self.bs * max(1, math.ceil(int(p["chunk_rows"]) / self.bs))
        self.fp = fingerprint(slide.path, grid_path, p, encoder.weights)
        self.stamp = slide_stamp(slide.path)  # compared before finalize: no bag from a slide replaced mid-read
        self.writer = BagWriter(out_path, self.n, encoder.embed_dim, fingerprint=self.fp, chunk_rows=chunk_rows)
        self.start = self.writer.rows_done  # a chunk boundary, hence a run boundary
        if self.start:
            print(f"[features] {slide.slide_id}: resuming at patch {self.start}/{self.n} from {self.writer.tmp}",
                  file=log, flush=True)
        runs = [r for r in plan_runs(self.coords, int(self.plan["patch_size_level0_px"]),
                                     boundaries=chunk_rows) if r[0] >= self.start]
        self.t0 = time.monotonic()
        self.blocks = Prefetcher(  # reader threads start now
            RunReader(str(slide.path), slide.reader, slide.mpp, self.coords, self.plan, runs),
            len(runs), int(p["num_workers"]), pin=device.type == "cuda")

    def run(self, extra_attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        plan, slide, enc = self.plan, self.slide, self.encoder
        progress = Progress(slide.slide_id, self.n, start=self.start, stream=self.log)
        row, pending, n_pending = self.start, [], 0

        def flush(k: int) -> None:
            nonlocal row, pending, n_pending
            batch = torch.cat(pending) if len(pending) > 1 else pending[0]
            take, rest = batch[:k], batch[k:]
            feats = embed_batch(enc, take, self.device)
            if not torch.isfinite(feats).all():
                raise RuntimeError(f"{slide.path}: encoder produced non-finite features at rows {row}..")
            self.writer.write(row, feats.numpy(), self.coords[row:row + k])
            row += k
            pending, n_pending = ([rest] if rest.shape[0] else []), int(rest.shape[0])
            progress.update(row)

        with torch.inference_mode():
            for block in self.blocks:
                pending.append(block.to(self.device, non_blocking=True))
                n_pending += int(block.shape[0])
                while n_pending >= self.bs:
                    flush(self.bs)
            if n_pending:
                flush(n_pending)
        if row != self.n:
            raise SlideError(slide.path, f"read {row - self.start} patches, expected {self.n - self.start}")
        if self.n > self.start:
            progress.update(row, force=True)
        attrs = {
            "slide_id": slide.slide_id,
            "n_patches": self.n,
            "feature_dim": int(enc.embed_dim),
            "model": enc.name,
            "model_tag": model_tag(self.p),
            "weights": enc.weights,
            "target_mpp": float(plan["requested_mpp"]),
            "effective_mpp": float(plan["effective_mpp"]),
            "patch_size_px": int(plan["patch_size_px"]),
            "patch_size_level0_px": int(plan["patch_size_level0_px"]),
            "level0_mpp": float(slide.mpp),
            "mpp_source": slide.mpp_source,
            "schema_version": SCHEMA_VERSION,
            "pipeline_version": __version__,
            "provenance": provenance("features", self.p, slide=slide.info(), read_plan=plan, device=str(self.device),
                                     decoder=slide.decoder(int(plan["level"])),
                                     resumed_from=self.start, seconds=round(time.monotonic() - self.t0, 3),
                                     fingerprint=self.fp),
            **(extra_attrs or {}),
        }
        if slide_stamp(slide.path) != self.stamp:
            self.writer.discard()
            raise SlideChangedError(slide.path, "the slide file changed on disk while its features were being "
                                                "extracted (replaced or rewritten): the partial bag was discarded; "
                                                "rerun to extract the new file")
        self.writer.finalize(attrs)
        return attrs


def _load_encoder(p: dict[str, Any], patch_size: int, device: torch.device) -> Encoder:
    enc = create_encoder(p["model"], weights=p["weights"], pretrained=p["pretrained"], seed=p["seed"],
                         input_size=int(patch_size))
    enc.model.to(device)
    return enc


def extract_slides(jobs: list[tuple[Slide, dict[str, Any], str | os.PathLike, str | os.PathLike]],
                   params: dict[str, Any] | None = None, encoder: Encoder | None = None,
                   log=sys.stderr, *, extra_attrs: dict[str, dict[str, Any]] | None = None,
                   on_done: Callable[[str, dict[str, Any] | None, BaseException | None], None] | None = None
                   ) -> list[dict[str, Any]]:
    """Extract several slides with one model. ``jobs``: (slide, grid, grid_path, out_path) tuples.

    The next slide's reader workers start while the current slide is being encoded, so the device does
    not wait on I/O between slides. A slide that fails is reported and the others still complete; the
    first error is raised at the end, unless ``on_done(out_path, attrs, error)`` is given, which is called
    for every slide instead. ``extra_attrs``: out path -> attributes added to that bag.
    """
    p = resolve_settings(params)
    device = resolve_device(str(p["device"]))
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    if not jobs:
        return results
    if encoder is None:
        encoder = _load_encoder(p, jobs[0][1]["read_plan"]["patch_size_px"], device)
    encoder.model.to(device)

    def failed(job, exc: BaseException) -> None:
        if on_done is not None:
            on_done(str(job[3]), None, exc)
        else:
            errors.append(exc)
            print(f"ERROR [features] {exc}", file=log, flush=True)

    def prepare(job):
        try:
            return _SlideRun(*job, p, encoder, device, log)
        except Exception as exc:  # noqa: BLE001 - reported per slide
            failed(job, exc)
            return None

    nxt = prepare(jobs[0])
    for i in range(len(jobs)):
        cur = nxt
        nxt = prepare(jobs[i + 1]) if i + 1 < len(jobs) else None
        if cur is None:
            continue
        try:
            attrs = cur.run((extra_attrs or {}).get(str(jobs[i][3])))
        except Exception as exc:  # noqa: BLE001
            failed(jobs[i], exc)
            continue
        results.append(attrs)
        if on_done is not None:
            on_done(str(jobs[i][3]), attrs, None)
    if errors:
        raise errors[0]
    return results


def write_failed_bag(out_path: str | os.PathLike, slide_id: str, reason: str, params: dict[str, Any] | None,
                     stage: str = "features", cache_key: str | None = None) -> None:
    """A schema-valid empty bag marked ``status: failed`` (``on_slide_error: skip``; MIL leaves such bags
    out and says so). Its feature width is the encoder's, built on the meta device (no memory, no weights)."""
    p = resolve_settings(params)
    with torch.device("meta"):
        dim = create_encoder(p["model"]).embed_dim
    write_bag(out_path, np.zeros((0, dim), np.float32), np.zeros((0, 2), np.int32), {
        "slide_id": slide_id, "status": "failed", "stage": stage, "error": reason,
        "model": p["model"], "model_tag": model_tag(p), "weights": None, "target_mpp": None,
        "patch_size_px": None, "level0_mpp": None, "mpp_source": None, "pipeline_version": __version__,
        "provenance": provenance("features", p), **({"cache_key": cache_key} if cache_key else {})})


def extract_slide(slide: Slide, grid: dict[str, Any], grid_path: str | os.PathLike, out_path: str | os.PathLike,
                  params: dict[str, Any] | None = None, encoder: Encoder | None = None,
                  log=sys.stderr) -> dict[str, Any]:
    """Extract features for every patch of ``grid`` and write the bag at ``out_path``.

    Resumes a partial bag left by an interrupted run when the inputs and settings are unchanged.
    """
    return extract_slides([(slide, grid, grid_path, out_path)], params, encoder=encoder, log=log)[0]
