"""Work moved from the CPU readers to the device: area resize, bf16 weights, JPEG tile decoding.

* :func:`resize_area`: patches read at ``r`` px resized to ``p`` px on the device. An exact integer
  reduction (``r = k p``, e.g. 448 -> 224) is an average pool; other reductions use the exact area
  weights OpenCV's ``INTER_AREA`` uses (each output pixel the overlap-weighted mean of the input pixels
  it covers), as two small matrix products; enlargements are bilinear (OpenCV ``INTER_LINEAR``). The
  result is float (not rounded to uint8 as OpenCV's is): within 0.5 grey level of OpenCV (tested).
* :func:`cast_weights`: model weights cast to bf16/fp16 (not only autocast), normalisation layers kept
  in fp32 (autocast runs them in fp32 anyway; their statistics need the precision).
* :class:`JpegTileSource`: the patches of a batch decoded from the slide's JPEG tiles with
  ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA, batched), the TIFF JPEGTables spliced
  into each tile and RGB-coded (Aperio) tiles marked as such (:func:`pipeline.tiles.standalone_jpeg`),
  then assembled into patches on the device. :func:`check_tile_decoder` compares a few tiles with the CPU
  decoder first; extraction falls back to the CPU readers when it fails or differs.
"""

from __future__ import annotations

import math
import queue
import threading
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_WEIGHTS: dict[tuple, torch.Tensor] = {}
# torchvision >= 0.29 deprecates its image codecs in favour of TorchCodec; decode_jpeg still works and is
# the batched nvJPEG entry point available in the pinned environment.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def area_weights(src: int, dst: int) -> torch.Tensor:
    """(dst, src) float64 matrix of area interpolation: row j averages input pixels over
    ``[j*s, (j+1)*s)`` (s = src/dst) weighted by their overlap with it."""
    s = src / dst
    a = torch.arange(dst, dtype=torch.float64)[:, None] * s
    k = torch.arange(src, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(a + s, k + 1) - torch.maximum(a, k)).clamp_(min=0)
    return overlap / s


def resize_method(src: int, dst: int) -> str:
    if src == dst:
        return "none"
    if src > dst:
        return "device-avg_pool" if src % dst == 0 else "device-area"
    return "device-bilinear"


def resize_area(x: torch.Tensor, dst: int) -> torch.Tensor:
    """Float (B, C, src, src) -> (B, C, dst, dst) by area averaging (bilinear when enlarging)."""
    src = int(x.shape[-1])
    if x.shape[-2] != src:
        raise ValueError(f"square patches expected, got {tuple(x.shape)}")
    if src == dst:
        return x
    if src > dst and src % dst == 0:
        return F.avg_pool2d(x, src // dst)
    if src < dst:
        return F.interpolate(x, size=(dst, dst), mode="bilinear", align_corners=False)
    key = (src, dst, x.device, x.dtype)
    w = _WEIGHTS.get(key)
    if w is None:
        w = _WEIGHTS[key] = area_weights(src, dst).to(device=x.device, dtype=x.dtype)
    return torch.matmul(torch.matmul(w, x), w.t())


_NORMS: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)


def cast_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the floating-point parameters of every non-normalisation module to ``dtype`` in place;
    returns how many tensors were cast. Buffers (running statistics, rotary tables) are left as they are."""
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _NORMS):
                continue
            for p in m.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    n += 1
    return n


def weights_dtype(model: nn.Module) -> str:
    """The dtype most parameters are stored in ("bf16", "fp16", "fp32")."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    dt = max(counts, key=counts.get) if counts else torch.float32
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, "fp32")


def register_host_memory(mem: Any) -> Any:
    """Page-lock (pin) a host buffer (e.g. the reader pool's shared memory) for asynchronous copies to
    CUDA; returns a function that unregisters it, or None when it could not be registered (copies
    still work, staged by the driver)."""
    import ctypes

    if mem is None or not torch.cuda.is_available():
        return None
    try:
        ref = ctypes.c_char.from_buffer(mem)
        addr, size = ctypes.addressof(ref), len(mem)
        del ref
        cudart = torch.cuda.cudart()
        torch.cuda.check_error(cudart.cudaHostRegister(addr, size, 0))
    except Exception:  # noqa: BLE001 - pinning is an optimisation
        return None

    def unregister() -> None:
        try:
            torch.cuda.cudart().cudaHostUnregister(addr)
        except Exception:  # noqa: BLE001
            pass

    return unregister


# ------------------------------------------------------------------------------------------------
# JPEG tiles decoded on the device
# ------------------------------------------------------------------------------------------------
def decode_tiles(streams: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """Complete JPEG files -> list of uint8 (3, H, W) tensors on ``device`` (nvJPEG, batched, on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return []
    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def assemble_patches(tiles: dict[tuple[int, int], torch.Tensor], origins: np.ndarray, read_px: int,
                     tile_w: int, tile_h: int, width: int, height: int, device: torch.device) -> torch.Tensor:
    """Patches (n, r, r, 3) uint8 cut from decoded tiles ``{(tx, ty): (3, th, tw)}`` on ``device``.

    The tiles are placed in a mosaic covering the patches' tile range (missing and sparse tiles and
    everything outside the level's ``width`` x ``height`` are white, as the CPU reader does), from which
    every patch is gathered with one indexing operation.
    """
    r = int(read_px)
    xs, ys = origins[:, 0].astype(np.int64), origins[:, 1].astype(np.int64)
    tx0, ty0 = int(xs.min()) // tile_w, int(ys.min()) // tile_h
    nx = (int(xs.max()) + r - 1) // tile_w - tx0 + 1
    ny = (int(ys.max()) + r - 1) // tile_h - ty0 + 1
    mosaic = torch.full((ny, tile_h, nx, tile_w, 3), 255, dtype=torch.uint8, device=device)
    if tiles:
        keys = sorted(tiles)
        stacked = torch.stack([tiles[k] for k in keys]).permute(0, 2, 3, 1)  # (T, th, tw, 3)
        ix = _to_device([k[0] - tx0 for k in keys], device)
        iy = _to_device([k[1] - ty0 for k in keys], device)
        mosaic.permute(0, 2, 1, 3, 4)[iy, ix] = stacked
    flat = mosaic.view(ny * tile_h, nx * tile_w, 3)
    ox, oy = tx0 * tile_w, ty0 * tile_h
    if width - ox < nx * tile_w:  # tile padding beyond the level's right edge
        flat[:, max(0, width - ox):] = 255
    if height - oy < ny * tile_h:
        flat[max(0, height - oy):] = 255
    ar = torch.arange(r, device=device)
    rows = _to_device(ys - oy, device)[:, None] + ar  # (n, r)
    cols = _to_device(xs - ox, device)[:, None] + ar
    return flat[rows[:, :, None], cols[:, None, :]]


def _to_device(a: np.ndarray | list, device: torch.device) -> torch.Tensor:
    """A small host array on ``device`` without synchronising (pinned, asynchronous copy on CUDA)."""
    t = torch.as_tensor(np.asarray(a, dtype=np.int64))
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def batch_tiles(origins: np.ndarray, read_px: int, tile_w: int, tile_h: int, ntx: int, nty: int) -> list[tuple[int, int]]:
    """The (tx, ty) tiles the patches at ``origins`` cover (inside the level only)."""
    need: set[tuple[int, int]] = set()
    for x, y in origins.astype(np.int64):
        for ty in range(max(0, y // tile_h), min(nty - 1, (y + read_px - 1) // tile_h) + 1):
            for tx in range(max(0, x // tile_w), min(ntx - 1, (x + read_px - 1) // tile_w) + 1):
                need.add((tx, ty))
    return sorted(need)


def check_tile_decoder(tiles_reader: Any, level: int, device: torch.device, n: int = 4,
                       max_mean_diff: float = 4.0) -> dict[str, Any]:
    """Decode ``n`` tiles of ``level`` on ``device`` and with the CPU decoder; ``ok`` when the device
    decoder works and agrees (mean absolute difference at most ``max_mean_diff`` grey levels; a wrong
    colour transform gives tens). Returns ``{"ok", "max_abs_diff", "mean_abs_diff", "tiles", "error"}``."""
    L = tiles_reader.levels[level]
    total = L.ntx * -(-L.height // L.th)
    picks = [k for k in sorted({0, total // 3, total // 2, 2 * total // 3, total - 1}) if L.counts[k]][:n]
    rec: dict[str, Any] = {"ok": False, "tiles": len(picks), "max_abs_diff": None, "mean_abs_diff": None}
    if not picks:
        rec["error"] = "no non-empty tile to check"
        return rec
    try:
        keys = [(k % L.ntx, k // L.ntx) for k in picks]
        dev = decode_tiles([tiles_reader.standalone_tile(level, tx, ty) for tx, ty in keys], device)
        diffs = []
        for (tx, ty), t in zip(keys, dev):
            ref = torch.from_numpy(np.ascontiguousarray(tiles_reader._tile(level, tx, ty)))
            got = t.permute(1, 2, 0).cpu()
            if got.shape != ref.shape:
                raise RuntimeError(f"tile {tx},{ty} decodes to {tuple(got.shape)}, expected {tuple(ref.shape)}")
            diffs.append((got.int() - ref.int()).abs())
        d = torch.stack(diffs).float()
        rec.update(max_abs_diff=int(d.max()), mean_abs_diff=round(float(d.mean()), 4))
        rec["ok"] = rec["mean_abs_diff"] <= max_mean_diff
        if not rec["ok"]:
            rec["error"] = f"device decoder differs from the CPU decoder by {rec['mean_abs_diff']} on average"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the CPU decoder
        rec["error"] = f"{type(exc).__name__}: {exc}"
    return rec


class JpegTileSource:
    """Batches of one slide's patches (uint8 (n, r, r, 3) on ``device``, not resized), their JPEG tiles
    decoded on the device. A background thread reads and decodes up to ``depth`` batches ahead.
    Same interface as :class:`pipeline.readers.Stream` (``get``/``release``/``close``)."""

    def __init__(self, tiles_reader: Any, level: int, origins: np.ndarray, batches: list[tuple[int, int]],
                 read_px: int, device: torch.device, depth: int = 2):
        self.tiles, self.level, self.read_px, self.device = tiles_reader, level, int(read_px), device
        self.origins = np.asarray(origins).reshape(-1, 2)
        self.batches = batches
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        # CUDA: decode and assemble on a stream of their own, handed over with an event, so neither
        # thread waits for the other's kernels
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="jpeg-tile-decoder", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self.batches)

    def _batch(self, a: int, b: int) -> torch.Tensor:
        L = self.tiles.levels[self.level]
        org = self.origins[a:b]
        keys = batch_tiles(org, self.read_px, L.tw, L.th, L.ntx, -(-L.height // L.th))
        streams, present = [], []
        for tx, ty in keys:
            s = self.tiles.standalone_tile(self.level, tx, ty)
            if s is not None:  # sparse tiles stay white
                streams.append(s)
                present.append((tx, ty))
        decoded = decode_tiles(streams, self.device)
        for (tx, ty), t in zip(present, decoded):
            if tuple(t.shape) != (3, L.th, L.tw):
                raise OSError(f"{self.tiles.path}: tile {tx},{ty} of level {self.level} decodes to "
                              f"{tuple(t.shape)}")
        return assemble_patches(dict(zip(present, decoded)), org, self.read_px, L.tw, L.th, L.width, L.height,
                                self.device)

    def _run(self) -> None:
        for i, (a, b) in enumerate(self.batches):
            if self._stop.is_set():
                return
            try:
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        item: Any = self._batch(a, b)
                        ready = torch.cuda.Event()
                        ready.record(self._stream)
                    item = (item, ready)
                else:
                    item = (self._batch(a, b), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                item = exc
            while not self._stop.is_set():
                try:
                    self._q.put((i, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self, i: int) -> torch.Tensor:
        from ..slide import SlideError

        while True:
            try:
                k, item = self._q.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("JPEG tile decoder thread stopped") from None
        if k != i:
            raise RuntimeError(f"JPEG tile source out of order: got batch {k}, expected {i}")
        if isinstance(item, BaseException):
            raise SlideError(self.tiles.path, f"cannot decode patches {self.batches[i]} on {self.device}: "
                                              f"{type(item).__name__}: {item}") from item
        patches, ready = item
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            patches.record_stream(stream)  # the allocator must not reuse it before the consumer is done
        return patches

    def release(self, i: int, after: Any = None) -> None:
        pass

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest row-wise cosine similarity of two (N, D) feature matrices."""
    a, b = a.double(), b.double()
    c = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return float(c.min()) if c.numel() else math.nan
