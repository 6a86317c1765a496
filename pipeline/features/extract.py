"""Feature extraction: the patches of one slide's grid through an encoder into a Zarr bag.

Reading (:mod:`pipeline.readers`): ``num_workers`` reader *processes*, each with its own file handles
and decoded-tile cache, cut patches from tile-aligned regions (direct libjpeg-turbo decoding of tiled
JPEG TIFFs where the file allows it, OpenSlide/tiffslide otherwise) and write them as uint8 blocks into
a ring of shared-memory slots, one batch per slot; only small control messages are pickled. The pool
outlives slides: :func:`extract_slides` submits the next slide while the current one is being encoded,
so reading never stops between slides, and reuses the same processes for every slide.

CPU path (exactly as before): readers resize with OpenCV ``INTER_AREA``; the model runs in fp32.
Bit-identical run to run, whatever ``num_workers``, and pixel-identical to OpenSlide.

CUDA path: readers hand over patches at read size, copied asynchronously from pinned shared memory;
resize (:func:`pipeline.features.device.resize_area`), normalisation and the model run on the device,
the model's weights cast to its precision (bf16 for the presets) and run under autocast; features come
back by asynchronous copies into pinned buffers that a writer thread waits for and writes into the bag,
so the host never waits for the device per batch. Optionally (``gpu_decode``) the JPEG tiles are decoded
on the device with nvJPEG, checked against the CPU decoder first (CPU fallback otherwise). Every bag
records which decoder and resize path made it.

Features are written chunk by chunk into a partial bag (:class:`pipeline.store.BagWriter`), so memory
does not grow with slide size and a killed job resumes from its last finished chunk (batches never
cross a chunk boundary).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..config import model_tag, resolve
from ..files import sha256_file
from ..provenance import provenance
from ..readers import ReaderPool, ReadSpec, grid_step, level_origins, stripe_width
from ..slide import Slide, SlideChangedError, SlideError, slide_stamp
from ..store import SCHEMA_VERSION, BagWriter, partial_path, write_bag
from ..log import get_logger
from . import create_encoder
from .encoders import Encoder

_log = get_logger("features")


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


def fingerprint(slide_path: str | os.PathLike, grid_path: str | os.PathLike, params: dict[str, Any],
                weights: Any, paths: dict[str, Any] | None = None) -> str:
    """Identity of a bag's inputs and settings; ``paths``: the resolved device, decoder, resize and
    weight dtype (a partial bag is resumed only by the same computation)."""
    st = Path(slide_path).stat()
    rec = {"slide": [Path(slide_path).name, st.st_size, st.st_mtime_ns], "grid": sha256_file(grid_path),
           "params": params, "weights": weights, "pipeline": __version__}
    if paths:
        rec["paths"] = paths
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()


def _say(log, msg: str, error: bool = False) -> None:
    """A message of the feature stage: through :mod:`logging` (``log=None``, the default: the job's log
    file via :func:`pipeline.log.setup`), or written to the stream ``log`` (benchmarks pass /dev/null)."""
    if log is None:
        (_log.error if error else _log.info)(msg)
    else:
        print(f"{'ERROR ' if error else ''}[features] {msg}", file=log, flush=True)


class Progress:
    """Progress lines that read well in a terminal and in a log file (one line per update, at most one
    every ``every_s`` seconds)."""

    def __init__(self, slide_id: str, total: int, start: int = 0, every_s: float = 10.0, stream=None):
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
        _say(self.stream, f"{self.slide_id}: {done}/{self.total} patches ({pct:.0f}%) "
                          f"{rate:.1f} patches/s eta {eta:.0f}s")


# ------------------------------------------------------------------------------------------------
# the device side of one batch
# ------------------------------------------------------------------------------------------------
_NORM_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def compute_dtype(encoder: Encoder, device: torch.device) -> torch.dtype | None:
    """Reduced precision the encoder runs in on ``device`` (None: fp32). CPU always runs fp32."""
    if device.type == "cuda" and encoder.precision in ("bf16", "fp16"):
        return torch.bfloat16 if encoder.precision == "bf16" else torch.float16
    return None


def prepare_encoder(encoder: Encoder, device: torch.device) -> str:
    """Move the encoder to ``device`` and cast its weights to its precision there (in place, idempotent);
    returns the weights' dtype ("fp32", "bf16", "fp16")."""
    from .device import cast_weights, weights_dtype

    encoder.model.to(device)
    dt = compute_dtype(encoder, device)
    if dt is not None:
        cast_weights(encoder.model, dt)
    return weights_dtype(encoder.model)


def preprocess(encoder: Encoder, batch_u8: torch.Tensor, device: torch.device, size: int | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, P, P) on ``device``; resized there to ``size``
    when given (the device resize path)."""
    x = batch_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if size is not None and int(x.shape[-1]) != int(size):
        from .device import resize_area

        x = resize_area(x, int(size))
    x = x.div_(255.0)
    key = (tuple(encoder.mean), tuple(encoder.std), str(device))
    ms = _NORM_CACHE.get(key)
    if ms is None:
        ms = _NORM_CACHE[key] = (torch.tensor(encoder.mean, device=device).view(1, 3, 1, 1),
                                 torch.tensor(encoder.std, device=device).view(1, 3, 1, 1))
    return (x - ms[0]) / ms[1]


def forward(encoder: Encoder, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The encoder on a normalised batch, in its precision on ``device``; float32 (B, D) on the device."""
    dt = compute_dtype(encoder, device)
    if dt is None:
        return encoder.embed(x).float()
    with torch.autocast(device.type, dtype=dt):
        return encoder.embed(x.to(dt)).float()


def embed_batch(encoder: Encoder, batch_u8: torch.Tensor, device: torch.device, size: int | None = None,
                sync: bool = True) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, D): on the CPU (``sync``) or left on the device (no host
    synchronisation). Resizing (``size``) and normalisation happen on the device."""
    out = forward(encoder, preprocess(encoder, batch_u8, device, size), device)
    return out.cpu() if sync else out


class _AsyncWriter:
    """Writes finished batches into the bag from a thread, in order; waits for each batch's
    device-to-host copy there (``event.synchronize()``), so the main thread never does. ``finish(fn)``
    runs ``fn`` (the bag's finalisation) in the thread after the last write, so the next slide's
    encoding does not wait for it; :meth:`result` joins and returns its value or raises."""

    def __init__(self, writer: BagWriter, slide_path: Any, depth: int = 3):
        self.writer, self.slide_path = writer, slide_path
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.value: Any = None
        self.thread = threading.Thread(target=self._run, name="bag-writer", daemon=True)
        self.thread.start()

    def put(self, row: int, feats: torch.Tensor, coords: np.ndarray, event: Any = None) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((row, feats, coords, event))

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            try:
                if callable(item):  # finish
                    self.value = item()
                    continue
                row, feats, coords, event = item
                if event is not None:
                    event.synchronize()
                arr = feats.numpy()
                if not np.isfinite(arr).all():
                    raise RuntimeError(f"{self.slide_path}: encoder produced non-finite features at rows "
                                       f"{row}..{row + arr.shape[0]}")
                self.writer.write(row, arr, coords)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self.error = exc

    def finish(self, fn) -> "_AsyncWriter":
        self.q.put(fn)
        self.q.put(None)
        return self

    def result(self) -> Any:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value

    def close(self) -> None:
        """Finish the queued writes (they are valid even when the caller is failing) and stop."""
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()


def _tile_cache_bytes(tiles: Any, level: int, workers: int, origins: np.ndarray | None = None,
                      batches: list[tuple[int, int]] | None = None, read_px: int = 0) -> int | None:
    """Decoded-tile cache of each reader process: the tile rows a process revisits (3 when one
    process reads every batch row by row; a batch's tile rows + 2 when processes keep column stripes
    of consecutive batches) across its share of the level's width (2/processes, with a margin),
    32-512 MiB. Sized from the slide's width and the batch, never its area."""
    if not tiles or not tiles.supports(level):
        return None
    L = tiles.levels[level]
    row = L.ntx * L.tw * L.th * 3
    rows = 3
    if workers > 1 and origins is not None and batches:
        ys = np.asarray(origins)[:, 1].astype(np.int64)
        span = max(int((ys[a:b].max() + read_px - 1) // L.th - ys[a:b].min() // L.th + 1)
                   for a, b in batches if b > a)
        rows = span + 2
    return int(min(max(rows * row * min(1.0, 2.0 / max(1, workers)), 32 << 20), 512 << 20))


def _on_device_resize(p: dict[str, Any], device: torch.device) -> bool:
    return p["resize"] == "device" or (p["resize"] == "auto" and device.type == "cuda")


@dataclasses.dataclass
class _Reading:
    """What the reader pool is asked for one slide from row ``start`` on (a function of the slide, its grid,
    the settings, the device and the pool only, not of the encoder: reading can start before it is built)."""
    start: int
    spec: ReadSpec
    origins: np.ndarray
    batches: list[tuple[int, int]]
    stripe: int | None  # None: JPEG tiles decoded on the device (no reader processes)
    stamp: list  # the slide's files before reading starts: a bag is finalised only if they are unchanged

    @classmethod
    def plan(cls, slide: Slide, grid: dict[str, Any], p: dict[str, Any], device: torch.device, pool: ReaderPool,
             start: int, gpu_decode: bool) -> "_Reading":
        stamp = slide_stamp(slide.path)
        plan = grid["read_plan"]
        n = len(grid["coords"])
        coords = np.asarray(grid["coords"], dtype=np.int64).reshape(-1, 2)
        level = int(plan["level"])
        r, ps = int(plan["read_size_px"]), int(plan["patch_size_px"])
        bs = int(p["batch_size"])
        tiles = slide.tiled_jpeg()
        resize_here = not (_on_device_resize(p, device) or gpu_decode)
        spec = ReadSpec(str(slide.path), slide.reader, float(slide.mpp), level, r, ps, resize=resize_here)
        batches = [(a, min(a + bs, n - start)) for a in range(0, n - start, bs)]
        origins = level_origins(coords[start:], float(plan["level_downsample"]))
        spec = dataclasses.replace(spec, cache_bytes=_tile_cache_bytes(tiles, level, pool.workers, origins,
                                                                       batches, r))
        stripe = None
        if not gpu_decode:
            tw = tiles.levels[level].tw if tiles and tiles.supports(level) else None
            stripe = stripe_width(slide.level_dimensions[level][0], r, pool.workers, tw, grid_step(origins))
        return cls(start, spec, origins, batches, stripe, stamp)

    def same(self, other: "_Reading") -> bool:
        return (self.start == other.start and self.spec == other.spec and self.batches == other.batches
                and self.stripe == other.stripe and np.array_equal(self.origins, other.origins))

    def submit(self, pool: ReaderPool):
        return pool.submit(self.spec, self.origins, self.batches, stripe_px=self.stripe)  # reading starts now


def _read_ahead(jobs: list[tuple], p: dict[str, Any], device: torch.device, pool: ReaderPool
                ) -> dict[int, tuple[_Reading, Any]]:
    """Start reading the first slides of a run while the encoder is still being built: job index ->
    ``(reading, stream)``. The first slide is always submitted, the next ones while their batches fit in
    the pool's slots (the readers would otherwise idle once the first slide is read, and the start-up
    lasts seconds). Stops at a slide whose start row is not known without the encoder (a partial bag to
    resume: its fingerprint involves the weights); nothing is read ahead when tiles are decoded on the
    device. Every read but the first holds all of its slots, so a slide whose early read goes unused (read
    anew, behind the others) gets the slots that closing it frees."""
    early: dict[int, tuple[_Reading, Any]] = {}
    if p["gpu_decode"]:
        return early
    used = 0
    for i, (slide, grid, _, out) in enumerate(jobs):
        if partial_path(out).exists():
            break
        try:
            reading = _Reading.plan(slide, grid, p, device, pool, 0, gpu_decode=False)
        except Exception:  # noqa: BLE001 - the slide's own set-up reports it, with its name
            break
        used += len(reading.batches)
        if early and used > pool.n_slots:
            break
        early[i] = (reading, reading.submit(pool))
    return early


class _SlideRun:
    """One slide's extraction state: its partial bag and a source already reading its patches.
    ``early``: a read already started by :func:`_read_ahead` (used when it is the read this slide needs,
    closed otherwise)."""

    def __init__(self, slide: Slide, grid: dict[str, Any], grid_path: str | os.PathLike, out_path: str | os.PathLike,
                 p: dict[str, Any], encoder: Encoder, device: torch.device, log, pool: ReaderPool,
                 weights_dtype: str, early: tuple[_Reading, Any] | None = None):
        from . import device as dev

        self.slide, self.p, self.encoder, self.device, self.log = slide, p, encoder, device, log
        self.plan = grid["read_plan"]
        self.coords = np.asarray(grid["coords"], dtype=np.int64).reshape(-1, 2)
        self.n = int(self.coords.shape[0])
        self.bs = int(p["batch_size"])
        chunk_rows = self.bs * max(1, math.ceil(int(p["chunk_rows"]) / self.bs))
        level = int(self.plan["level"])
        r, ps = int(self.plan["read_size_px"]), int(self.plan["patch_size_px"])
        on_device = _on_device_resize(p, device)
        tiles = slide.tiled_jpeg()
        self.gpu_decode: dict[str, Any] = {"requested": bool(p["gpu_decode"]), "used": False}
        if p["gpu_decode"]:
            if device.type != "cuda":
                self.gpu_decode["reason"] = f"no CUDA device (device {device})"
            elif not (tiles and tiles.supports(level)):
                self.gpu_decode["reason"] = f"level {level} is not stored as JPEG tiles"
            else:
                chk = dev.check_tile_decoder(tiles, level, device)
                self.gpu_decode["check"] = chk
                self.gpu_decode["used"] = bool(chk["ok"])
                if not chk["ok"]:
                    self.gpu_decode["reason"] = chk.get("error")
            if not self.gpu_decode["used"]:
                _say(log, f"{slide.slide_id}: gpu_decode falls back to the CPU readers "
                          f"({self.gpu_decode['reason']})")
        self.decoder = "nvjpeg" if self.gpu_decode["used"] else slide.decoder(level)
        self.resize_to = ps if (on_device or self.gpu_decode["used"]) else None
        self.resize = dev.resize_method(r, ps) if self.resize_to else \
            ReadSpec(str(slide.path), slide.reader, float(slide.mpp), level, r, ps, resize=True).resize_method
        self.paths = {"device": device.type, "decoder": self.decoder, "resize": self.resize,
                      "weights_dtype": weights_dtype}
        self.info = slide.info()  # read here: the bag is finalised from the writer thread
        self.extra_attrs: dict[str, Any] = {}  # added to the bag's attributes (e.g. the batch's cache key)
        self.out_path = str(out_path)
        self.fp = fingerprint(slide.path, grid_path, p, encoder.weights, self.paths)
        self.writer = BagWriter(out_path, self.n, encoder.embed_dim, fingerprint=self.fp, chunk_rows=chunk_rows)
        self.start = self.writer.rows_done  # a chunk boundary, hence a batch boundary
        if self.start:
            _say(log, f"{slide.slide_id}: resuming at patch {self.start}/{self.n} from {self.writer.tmp}")
        reading = _Reading.plan(slide, grid, p, device, pool, self.start, self.gpu_decode["used"])
        self.spec, self.batches = reading.spec, reading.batches
        self.stamp = reading.stamp  # compared before finalize: no bag from a slide replaced mid-read
        self.t0 = time.monotonic()
        if self.gpu_decode["used"]:
            self.source: Any = dev.JpegTileSource(tiles, level, reading.origins, self.batches, r, device)
        elif early is not None and early[0].same(reading):
            self.source = early[1]  # reading started while the encoder was built
            self.stamp = early[0].stamp  # the files as they were when that reading started
            early = None
        else:
            self.source = reading.submit(pool)
        if early is not None:
            early[1].close()

    def close(self) -> None:
        """Stop reading this slide (idempotent)."""
        self.source.close()

    def run(self) -> dict[str, Any]:
        """Encode the slide and write its bag; returns the bag's attributes."""
        return self.encode().result()

    def encode(self) -> _AsyncWriter:
        """Encode every batch; the last writes and the bag's finalisation continue in the writer thread
        (``.result()`` waits for them and returns the bag's attributes, or raises)."""
        slide, enc, device = self.slide, self.encoder, self.device
        progress = Progress(slide.slide_id, self.n, start=self.start, stream=self.log)
        cuda = device.type == "cuda"
        aw = _AsyncWriter(self.writer, slide.path)
        ring = ([torch.empty((self.bs, enc.embed_dim), dtype=torch.float32, pin_memory=True)
                 for _ in range(aw.q.maxsize + 2)] if cuda else [])
        # host-to-device copies on a stream of their own: batch i+1 is copied while batch i is encoded
        copy_stream = torch.cuda.Stream(device) if cuda else None
        try:
            with torch.inference_mode():
                for i, (a, b) in enumerate(self.batches):
                    block = self.source.get(i)
                    x = torch.from_numpy(block) if isinstance(block, np.ndarray) else block
                    copied = None
                    if cuda and x.device.type == "cpu":
                        with torch.cuda.stream(copy_stream):
                            x = x.to(device, non_blocking=True)  # from pinned shared memory
                            copied = torch.cuda.Event()
                            copied.record(copy_stream)
                        compute = torch.cuda.current_stream(device)
                        compute.wait_event(copied)
                        x.record_stream(compute)
                    feats = embed_batch(enc, x, device, size=self.resize_to, sync=not cuda)
                    row = self.start + a
                    if cuda:
                        self.source.release(i, after=copied)
                        out = ring[i % len(ring)][:b - a]
                        out.copy_(feats, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record()
                        aw.put(row, out, self.coords[row:row + b - a], done)
                    else:
                        self.source.release(i)
                        aw.put(row, feats, self.coords[row:row + b - a])
                    progress.update(self.start + b)
        except BaseException:
            self.source.close()
            aw.close()  # batches already computed are written: a rerun resumes after them
            raise
        self.source.close()
        seconds = time.monotonic() - self.t0
        return aw.finish(lambda: self._finalize(progress, seconds))

    def _finalize(self, progress: Progress, seconds: float) -> dict[str, Any]:
        plan, slide, enc, device = self.plan, self.slide, self.encoder, self.device
        if self.writer.rows_done != self.n:
            raise SlideError(slide.path, f"wrote {self.writer.rows_done - self.start} patches, expected "
                                         f"{self.n - self.start}")
        if self.n > self.start:
            progress.update(self.n, force=True)
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
            "provenance": provenance("features", self.p, slide=self.info, read_plan=plan, device=str(device),
                                     decoder=self.decoder, resize=self.resize,
                                     weights_dtype=self.paths["weights_dtype"], gpu_decode=self.gpu_decode,
                                     reader_processes=int(self.p["num_workers"]),
                                     resumed_from=self.start, seconds=round(seconds, 3),
                                     fingerprint=self.fp),
            **self.extra_attrs,
        }
        if slide_stamp(slide.path) != self.stamp:
            self.writer.discard()
            raise SlideChangedError(slide.path, "the slide file changed on disk while its features were being "
                                                "extracted (replaced or rewritten): the partial bag was discarded; "
                                                "rerun to extract the new file")
        self.writer.finalize(attrs)
        return attrs


#: Shared memory a feature job's reader pool may fill ahead of the model (while the encoder is being built,
#: the CPUs are otherwise idle); the pool never has fewer slots than ``workers + 3``.
READ_AHEAD_BYTES = 512 << 20


class _Background(threading.Thread):
    """``fn(*args)`` in a thread; :meth:`result` waits for it and returns its value or raises its error."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        super().__init__(daemon=True, name="wsipipe-encoder-build")
        self._fn, self._args = fn, args
        self._value: Any = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of result()
            self._error = exc

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def _load_encoder(p: dict[str, Any], patch_size: int, device: torch.device) -> Encoder:
    """Build the encoder and move it to ``device`` in its precision there. On CUDA, one batch of blank
    patches then goes through it: the first batch's one-off costs (library handles, kernel selection and
    loading) are paid here, while the readers read and the device is otherwise idle, not by the first
    slide. Not on the CPU, where that batch would take the cores the readers are using."""
    enc = create_encoder(p["model"], weights=p["weights"], pretrained=p["pretrained"], seed=p["seed"],
                         input_size=int(patch_size))
    prepare_encoder(enc, device)
    if device.type == "cuda":
        size = int(patch_size)
        with torch.inference_mode():
            forward(enc, torch.zeros((int(p["batch_size"]), 3, size, size), device=device), device)
        torch.cuda.synchronize(device)
    return enc


def slot_bytes(jobs: list[tuple], p: dict[str, Any], device: torch.device) -> int:
    """Shared-memory slot size for the largest batch of ``jobs`` (patches at read size when resizing
    on the device)."""
    on_device = p["resize"] == "device" or (p["resize"] == "auto" and device.type == "cuda")
    key = "read_size_px" if on_device or p["gpu_decode"] else "patch_size_px"
    side = max(int(job[1]["read_plan"][key]) for job in jobs)
    return int(p["batch_size"]) * side * side * 3


def extract_slides(jobs: list[tuple[Slide, dict[str, Any], str | os.PathLike, str | os.PathLike]],
                   params: dict[str, Any] | None = None, encoder: Encoder | None = None,
                   log=None, pool: ReaderPool | None = None, *,
                   extra_attrs: dict[str, dict[str, Any]] | None = None,
                   on_done: Callable[[str, dict[str, Any] | None, BaseException | None], None] | None = None
                   ) -> list[dict[str, Any]]:
    """Extract several slides with one model. ``jobs``: (slide, grid, grid_path, out_path) tuples.

    One pool of reader processes serves every slide (pass ``pool`` to reuse one across calls; it is then
    left open). The next slide is submitted to it while the current one is being encoded, so the device
    does not wait on I/O between slides. A slide that fails is reported and the others still complete;
    the first error is raised at the end, unless ``on_done(out_path, attrs, error)`` is given, which is
    called for every slide instead. ``extra_attrs``: out path -> attributes added to that bag. The encoder
    is moved to the device and, on CUDA, its weights cast to its precision (in place). Progress and errors
    go to the ``features`` logger, or to the stream ``log`` when one is given.
    """
    p = resolve_settings(params)
    device = resolve_device(str(p["device"]))
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    if not jobs:
        return results
    own_pool = pool is None
    if own_pool:  # building the encoder here: enough slots for the readers to run ahead meanwhile
        workers = int(p["num_workers"])
        slots = max(workers + 3, min(64, READ_AHEAD_BYTES // max(1, slot_bytes(jobs, p, device)))) \
            if encoder is None and workers else None
        pool = ReaderPool(workers, n_slots=slots)
    loader = None
    if encoder is None:  # built in a thread while the reader processes start on the first slide
        loader = _Background(_load_encoder, p, jobs[0][1]["read_plan"]["patch_size_px"], device)
    runs: list[_SlideRun] = []  # every prepared slide, closed at the end whatever happens
    early_reads: dict[int, tuple[_Reading, Any]] = {}  # reads started before the encoder was ready, by job
    pending = None  # the previous slide's writer, finishing while the next slide is encoded

    def failed(out, exc: BaseException) -> None:
        if on_done is not None:
            on_done(str(out), None, exc)
        else:
            errors.append(exc)
            _say(log, f"{exc}", error=True)

    def prepare(job, early=None):
        try:
            run = _SlideRun(*job, p, encoder, device, log, pool, wdtype, early=early)
        except Exception as exc:  # noqa: BLE001 - reported per slide
            if early is not None:
                early[1].close()  # (idempotent) its slots go back to the other slides
            failed(job[3], exc)
            return None
        run.extra_attrs = dict((extra_attrs or {}).get(str(job[3])) or {})
        runs.append(run)
        return run

    def collect(item):  # a slide's last writes and finalisation, done while the next one was encoded
        handle, out = item
        try:
            attrs = handle.result()
        except Exception as exc:  # noqa: BLE001 - reported per slide
            failed(out, exc)
            return
        results.append(attrs)
        if on_done is not None:
            on_done(str(out), attrs, None)

    try:
        pool.reserve(slot_bytes(jobs, p, device))
        if device.type == "cuda":
            from .device import register_host_memory

            pool.pin(register_host_memory)  # pinned until the pool's memory goes (close or growth)
        if loader is not None:
            early_reads = _read_ahead(jobs, p, device, pool)
            encoder = loader.result()
        wdtype = prepare_encoder(encoder, device)
        nxt = prepare(jobs[0], early_reads.pop(0, None))
        for i in range(len(jobs)):
            cur = nxt
            nxt = prepare(jobs[i + 1], early_reads.pop(i + 1, None)) if i + 1 < len(jobs) else None
            if cur is None:
                continue
            try:
                handle = cur.encode()
            except Exception as exc:  # noqa: BLE001
                failed(cur.out_path, exc)
                continue
            finally:
                if pending is not None:
                    collect(pending)
                    pending = None
            pending = (handle, cur.out_path)
        if pending is not None:
            collect(pending)
            pending = None
    finally:
        if pending is not None:
            pending[0].close()  # interrupted: let the queued writes land (a rerun resumes after them)
        for run in runs:
            run.close()
        for _, stream in early_reads.values():
            stream.close()
        if loader is not None:
            loader.join()  # an interrupted build finishes before the pool goes
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # no copy from the slots in flight past this point
        if own_pool:
            pool.close()
    if errors:
        raise errors[0]
    return results


def extract_slide(slide: Slide, grid: dict[str, Any], grid_path: str | os.PathLike, out_path: str | os.PathLike,
                  params: dict[str, Any] | None = None, encoder: Encoder | None = None,
                  log=None, pool: ReaderPool | None = None) -> dict[str, Any]:
    """Extract features for every patch of ``grid`` and write the bag at ``out_path``.

    Resumes a partial bag left by an interrupted run when the inputs and settings are unchanged.
    """
    return extract_slides([(slide, grid, grid_path, out_path)], params, encoder=encoder, log=log, pool=pool)[0]


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
