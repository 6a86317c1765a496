"""Patch reader processes that scale with cores, handing uint8 patch blocks over through shared memory.

A :class:`ReaderPool` owns ``workers`` reader processes and a ring of equally sized *slots* in one
anonymous shared-memory file (``memfd`` on Linux, an unlinked temporary file elsewhere). The consumer
submits a slide as a :class:`Stream` of *batches* (consecutive bag rows, never crossing a chunk
boundary); every free slot is given the next batch of the oldest stream that still has unread batches,
so a slide submitted early (the next slide) is read while the current one is being encoded, by the same
processes. A batch is split into *units*: the batch's patches that fall in one tile-aligned column
stripe of the slide level. A unit goes to the process that read the unit above it (same stripe, previous
batch) unless that process is behind, so each process keeps reading the same part of the slide and its
decoded-tile cache holds the tile rows shared by consecutive batches: tiles are decoded about once, as
in one process. A reader cuts each patch from one region read per run of adjacent patches and, on the CPU
path, resizes it with OpenCV ``INTER_AREA`` straight into the slot. Only small control messages
(a few hundred bytes per unit) are pickled; pixels never are.

Processes are started as fresh interpreters (``python -c``, the *spawn* model, never ``fork``: the
parent runs torch/OpenMP/CUDA threads, whose locks a forked child would inherit). They import only
numpy, OpenCV and the slide readers (not torch), pin OpenCV/BLAS/OpenMP to one thread, ignore SIGINT
(the parent decides when they stop) and exit on their own when the parent goes away (end of file on
their control socket). The shared memory has no name: it is freed when the last process holding it
exits, so nothing can leak even after ``kill -9``.

``workers=0`` reads in the calling thread with the same code (tests, debugging).
"""

from __future__ import annotations

import atexit
import collections
import math
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

#: Upper bound on the shared memory of one pool (slots are fewer when they are large).
MAX_SHARED_BYTES = 4 << 30
#: A unit is the part of a batch inside one column stripe about this many patches wide.
STRIPE_PATCHES = 16
#: Longest run of adjacent patches read as one region.
MAX_RUN = 32


class ReaderError(RuntimeError):
    """A reader process failed or went away."""


@dataclass(frozen=True)
class ReadSpec:
    """What a reader needs to cut one slide's patches (small, picklable)."""

    path: str
    reader: str
    mpp: float
    level: int
    read_px: int  # patch side in level pixels
    patch_px: int  # patch side after resizing
    resize: bool  # True: resize read_px -> patch_px here (cv2); False: hand over read_px crops
    cache_bytes: int | None = None  # decoded-tile cache of each reader (None: the reader's default)

    @property
    def out_px(self) -> int:
        return self.patch_px if self.resize else self.read_px

    @property
    def patch_bytes(self) -> int:
        return self.out_px * self.out_px * 3

    @property
    def resize_method(self) -> str:
        """How pixels go from read size to patch size in the readers (recorded in provenance)."""
        if not self.resize:
            return "none (on device)"
        if self.read_px == self.patch_px:
            return "none"
        return "cpu-cv2-inter_area" if self.read_px > self.patch_px else "cpu-cv2-inter_linear"


def level_origins(coords: np.ndarray, level_downsample: float) -> np.ndarray:
    """Level-0 (x, y) patch corners -> (x, y) in pixels of the read level, as int32 (the exact pixel
    grid every patch is cut at, whichever run or process reads it)."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    return np.rint(c / float(level_downsample)).astype(np.int32)


def cut_patches(slide: Any, spec: ReadSpec, origins: np.ndarray, out: np.ndarray,
                positions: np.ndarray | None = None) -> None:
    """Write the patches at ``origins`` (level pixels, top-left) into ``out[positions[k]]``.

    Runs of horizontally adjacent patches (same row, each starting at most one patch after the previous)
    are read as one region; each patch is ``level[y:y+r, x:x+r]`` resized to P x P with ``INTER_AREA``
    (``INTER_LINEAR`` when enlarging), so its pixels do not depend on how patches are grouped.
    """
    import cv2

    r, p = spec.read_px, spec.patch_px
    interp = cv2.INTER_AREA if r > p else cv2.INTER_LINEAR
    n = int(origins.shape[0])
    pos = np.arange(n) if positions is None else positions
    xs, ys = origins[:, 0].astype(np.int64), origins[:, 1].astype(np.int64)
    i = 0
    while i < n:
        j = i + 1
        while j < n and j - i < MAX_RUN and ys[j] == ys[i] and 0 < xs[j] - xs[j - 1] <= r:
            j += 1
        x0 = int(xs[i])
        region = slide.read_level_region(spec.level, x0, int(ys[i]), int(xs[j - 1]) - x0 + r, r)
        for k in range(i, j):
            crop = region[:, int(xs[k]) - x0:int(xs[k]) - x0 + r]
            dst = out[int(pos[k])]
            if not spec.resize or r == p:
                dst[...] = crop
            else:
                cv2.resize(crop, (p, p), dst=dst, interpolation=interp)
        i = j


def stripe_width(level_width: int, read_px: int, workers: int, tile_w: int | None = None,
                 step: int | None = None) -> int:
    """Column-stripe width (level pixels) that splits batches into units: about ``STRIPE_PATCHES``
    patches wide, narrower (down to 4 patches) when there are more processes than stripes across the
    level, so each process can keep a stripe of its own (one stripe, the whole width, for one process). With tiles, a multiple of the tile width, and
    when possible of lcm(tile width, grid step) (1,792 px for 448 px patches on 256 px tiles): stripe
    borders then fall where a patch starts on a tile border, and neighbouring units share no tile."""
    if workers <= 1:  # one process reads every batch row by row: no need to split
        return int(max(level_width, read_px) + read_px)
    across = max(1.0, level_width / max(1, read_px))
    want = min(float(STRIPE_PATCHES), max(4.0, across / max(1, workers))) * read_px
    unit = int(tile_w or 1)
    if tile_w and step and step >= read_px:
        aligned = math.lcm(int(tile_w), int(step))
        if aligned <= 8 * read_px:
            unit = aligned
    return int(max(unit, round(want / unit) * unit))


def grid_step(origins: np.ndarray) -> int | None:
    """Spacing of the patch columns (level pixels), or None with fewer than two columns."""
    xs = np.unique(np.asarray(origins)[:, 0]) if len(origins) else np.zeros(0)
    return int(np.gcd.reduce(np.diff(xs))) if len(xs) > 1 else None


def _shared_file(size: int) -> int:
    """An anonymous shared-memory file descriptor of ``size`` bytes (no name, nothing to unlink)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("wsipipe-reader-slots", getattr(os, "MFD_CLOEXEC", 0))
    else:  # pragma: no cover - non-Linux
        import tempfile

        d = "/dev/shm" if os.path.isdir("/dev/shm") else None
        f = tempfile.TemporaryFile(dir=d)  # unlinked on creation
        fd = os.dup(f.fileno())
        f.close()
    os.ftruncate(fd, size)
    return fd


# ------------------------------------------------------------------------------------------------
# the reader process
# ------------------------------------------------------------------------------------------------
def _worker_main(conn_fd: int, mem_fd: int, n_slots: int, slot_bytes: int) -> None:
    """Body of a reader process: receive small messages, write pixels into the shared slots."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    import cv2

    cv2.setNumThreads(1)
    from .slide import open_slide

    conn = Connection(conn_fd)
    mem = mmap.mmap(mem_fd, n_slots * slot_bytes)
    os.close(mem_fd)
    buf = np.frombuffer(mem, dtype=np.uint8)
    specs: dict[int, ReadSpec] = {}
    slides: dict[int, Any] = {}
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent went away
                break
            kind = msg[0]
            if kind == "stop":
                break
            if kind == "open":
                specs[msg[1]] = msg[2]
            elif kind == "close":
                specs.pop(msg[1], None)
                s = slides.pop(msg[1], None)
                if s is not None:
                    s.close()
            elif kind == "read":
                _, key, slot, task, positions, origins = msg
                try:
                    spec = specs[key]
                    slide = slides.get(key)
                    if slide is None:
                        slide = slides[key] = open_slide(spec.path, reader=spec.reader, mpp=spec.mpp)
                        slide.tile_cache_bytes = spec.cache_bytes
                    cap = slot_bytes // spec.patch_bytes
                    out = buf[slot * slot_bytes:slot * slot_bytes + cap * spec.patch_bytes].reshape(
                        cap, spec.out_px, spec.out_px, 3)
                    tiles = slide.tiled_jpeg()
                    before, t0 = (tiles.decoded if tiles else 0), time.perf_counter()
                    cut_patches(slide, spec, origins, out, positions)
                    reply = ("done", task, (tiles.decoded if tiles else 0) - before, time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001 - reported to the parent, per slide
                    reply = ("error", task, f"{type(exc).__name__}: {exc}")
                try:
                    conn.send(reply)
                except (OSError, EOFError):
                    break
    finally:
        for s in slides.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass


def _worker_entry() -> None:  # python -c "...; _worker_entry()" CONN_FD MEM_FD N_SLOTS SLOT_BYTES
    _worker_main(*(int(a) for a in sys.argv[1:5]))


# ------------------------------------------------------------------------------------------------
# the parent side
# ------------------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, index: int, proc: subprocess.Popen, conn: Connection):
        self.index, self.proc, self.conn = index, proc, conn
        self.alive = True
        self.ready = False  # has said hello (imports done)
        self.load = 0  # patches queued to this process and not done yet
        self.opened: set[int] = set()
        self.tasks: set[int] = set()


class _Batch:
    __slots__ = ("a", "b", "slot", "pending", "error", "ready")

    def __init__(self, a: int, b: int):
        self.a, self.b = a, b
        self.slot: int | None = None
        self.pending = 0
        self.error: str | None = None
        self.ready = False


class Stream:
    """One slide's batches, read in order into the pool's slots. Use :meth:`get` for batches 0, 1, ...
    in order and :meth:`release` each when done with its pixels; :meth:`close` at the end (or on error)."""

    def __init__(self, pool: "ReaderPool", key: int, spec: ReadSpec, origins: np.ndarray,
                 batches: list[tuple[int, int]], stripe_px: int):
        self.pool, self.key, self.spec, self.stripe_px = pool, key, spec, max(1, int(stripe_px))
        self.origins = np.ascontiguousarray(origins, dtype=np.int32).reshape(-1, 2)
        self.batches = [_Batch(int(a), int(b)) for a, b in batches]
        self.next_assign = 0
        self.closed = False
        self._owner: dict[int, int] = {}  # stripe -> reader process that read it last
        self._slide = None  # inline mode only

    def __len__(self) -> int:
        return len(self.batches)

    def get(self, i: int) -> np.ndarray:
        """Batch ``i`` as a uint8 array (n, S, S, 3) in shared memory: valid until :meth:`release`."""
        return self.pool._get(self, i)

    def release(self, i: int, after: Any = None) -> None:
        """Give batch ``i``'s slot back; with ``after`` (an object with ``query()``, e.g. a CUDA event
        recorded after the copy out of the slot), only once ``after.query()`` is true."""
        self.pool._release(self, i, after)

    def close(self) -> None:
        """Stop reading this slide (unread batches are dropped; slots come back as readers finish)."""
        self.pool._close_stream(self)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_LIVE_POOLS: "weakref.WeakSet[ReaderPool]" = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()


class ReaderPool:
    """``workers`` reader processes and ``n_slots`` shared-memory slots of ``slot_bytes`` each.

    The pool outlives slides: submit every slide of a run to the same pool (the reader processes, their
    open files and the shared memory are reused, and the next slide is read while the current one is
    consumed). Always :meth:`close` it (it is a context manager); it also closes at interpreter exit.
    """

    def __init__(self, workers: int, slot_bytes: int = 0, n_slots: int | None = None):
        self.workers = max(0, int(workers))
        self.slot_bytes = 0
        self.n_slots = 0
        self._want_slots = n_slots
        self._fd: int | None = None
        self._mem: mmap.mmap | None = None
        self._buf: np.ndarray | None = None
        self._procs: list[_Worker] = []
        self._streams: collections.deque[Stream] = collections.deque()
        self._free: collections.deque[int] = collections.deque()
        self._releasing: list[tuple[int, Any]] = []
        self._tasks: dict[int, tuple[Stream, int, _Worker, int]] = {}
        self._next_key = self._next_task = 0
        self._closed = False
        self._unpin: Any = None  # undoes a registration of the slots with CUDA (see :meth:`pin`)
        self.tiles_decoded = 0  # JPEG tiles decoded by the readers so far (direct decoder only)
        self.busy_s = 0.0  # wall seconds the readers spent reading (not waiting for work), summed
        self.started_s = 0.0
        if slot_bytes:
            self.reserve(slot_bytes)
        _LIVE_POOLS.add(self)

    # -- set-up ------------------------------------------------------------------------------------
    @property
    def memory(self) -> mmap.mmap | None:
        """The shared slots (one mapping of ``n_slots * slot_bytes`` bytes), e.g. to pin it for CUDA."""
        return self._mem

    @property
    def pinned(self) -> bool:
        return self._unpin is not None

    def pin(self, register: Any) -> bool:
        """Register the slots for fast device copies with ``register(memory) -> undo or None`` (e.g.
        :func:`pipeline.features.device.register_host_memory`), once; undone when the slots are
        unmapped (:meth:`close`, or growing them). Returns whether the slots are pinned."""
        if self._mem is not None and self._unpin is None:
            self._unpin = register(self._mem)
        return self.pinned

    def reserve(self, slot_bytes: int) -> None:
        """Make slots hold at least ``slot_bytes`` (grows, restarting the readers, only while idle)."""
        if self._closed:
            raise ReaderError("reader pool is closed")
        if self.workers == 0 or slot_bytes <= self.slot_bytes:
            return
        if self._streams:
            raise ReaderError(f"reader pool slots of {self.slot_bytes} bytes are too small for "
                              f"{slot_bytes} while slides are being read")
        while self._tasks and any(w.alive for w in self._procs):  # leftovers of closed streams
            self._pump(1.0)
        self._stop_workers()
        self._unmap()
        self.slot_bytes = int(-(-int(slot_bytes) // 4096) * 4096)
        want = self._want_slots or self.workers + 3
        self.n_slots = int(max(2, min(want, MAX_SHARED_BYTES // self.slot_bytes)))
        self._fd = _shared_file(self.n_slots * self.slot_bytes)
        self._mem = mmap.mmap(self._fd, self.n_slots * self.slot_bytes)
        self._buf = np.frombuffer(self._mem, dtype=np.uint8)
        self._free = collections.deque(range(self.n_slots))
        self._start_workers()

    def _spawn(self, index: int) -> _Worker:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
            env[var] = "1"
        root = str(Path(__file__).resolve().parents[1])  # the directory holding the pipeline package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cfd = child.fileno()
        cmd = [sys.executable, "-c", "from pipeline.readers import _worker_entry; _worker_entry()",
               str(cfd), str(self._fd), str(self.n_slots), str(self.slot_bytes)]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(cfd, self._fd), env=env, stdin=subprocess.DEVNULL)
        finally:
            child.close()
        return _Worker(index, proc, Connection(parent.detach()))

    def _start_workers(self) -> None:
        t0 = time.monotonic()
        self._procs = [self._spawn(i) for i in range(self.workers)]
        self.started_s = time.monotonic() - t0

    def _ensure_workers(self) -> None:
        for i, w in enumerate(self._procs):
            if not w.alive:
                self._procs[i] = self._spawn(i)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until every reader process has started (for benchmarks); returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not all(w.ready for w in self._procs if w.alive):
                self._pump(0.1)
            if not any(w.alive for w in self._procs) and self._procs:
                raise ReaderError("every reader process has exited")
            if all(w.ready for w in self._procs if w.alive):
                return time.monotonic() - t0
        raise ReaderError(f"reader processes did not start within {timeout:.0f} s")

    # -- streams -----------------------------------------------------------------------------------
    def submit(self, spec: ReadSpec, origins: np.ndarray, batches: list[tuple[int, int]],
               stripe_px: int | None = None) -> Stream:
        """Queue one slide: ``origins`` (n, 2) level-pixel patch corners in bag order, ``batches`` row
        ranges into them. Reading starts as soon as slots are free."""
        if self._closed:
            raise ReaderError("reader pool is closed")
        cap = max((b - a for a, b in batches), default=0)
        if self.workers:
            self.reserve(cap * spec.patch_bytes)
            self._ensure_workers()
        self._next_key += 1
        stream = Stream(self, self._next_key, spec, origins, batches,
                        stripe_px or STRIPE_PATCHES * spec.read_px)
        if self.workers:
            self._streams.append(stream)
            self._assign()
        return stream

    def _assign(self) -> None:
        """Give free slots to the next unassigned batches (oldest stream first) and queue their units."""
        while self._free:
            stream = next((s for s in self._streams if s.next_assign < len(s.batches)), None)
            if stream is None:
                return
            if not any(w.alive for w in self._procs):
                return  # the consumer reports it (``get``); the next ``submit`` starts new readers
            i = stream.next_assign
            stream.next_assign += 1
            batch = stream.batches[i]
            batch.slot = self._free.popleft()
            if batch.b == batch.a:
                batch.ready = True
                continue
            org = stream.origins[batch.a:batch.b]
            stripes = org[:, 0].astype(np.int64) // stream.stripe_px
            for s in np.unique(stripes):
                idx = np.flatnonzero(stripes == s)
                n = len(idx)
                live = [w for w in self._procs if w.alive]
                if not live:
                    batch.error = batch.error or "every reader process has exited"
                    break
                best = min(live, key=lambda w: w.load)
                owner = stream._owner.get(int(s))
                w = owner if owner is not None and owner.alive and owner.load - best.load <= n else best
                stream._owner[int(s)] = w
                self._send_task(w, stream, i, idx.astype(np.int32), org[idx])
            if batch.pending == 0:  # every unit failed to go out (a reader died): report it
                batch.ready = True

    def _send_task(self, w: _Worker, stream: Stream, i: int, positions: np.ndarray, origins: np.ndarray) -> None:
        batch = stream.batches[i]
        self._next_task += 1
        task = self._next_task
        try:
            if stream.key not in w.opened:
                w.conn.send(("open", stream.key, stream.spec))
                w.opened.add(stream.key)
            w.conn.send(("read", stream.key, batch.slot, task, positions, np.ascontiguousarray(origins)))
        except (OSError, EOFError):
            self._died(w)
            batch.error = batch.error or self._death_reason(w)
            return
        self._tasks[task] = (stream, i, w, len(positions))
        w.tasks.add(task)
        w.load += len(positions)
        batch.pending += 1

    def _death_reason(self, w: _Worker) -> str:
        code = w.proc.poll()
        return f"reader process {w.proc.pid} exited unexpectedly (exit code {code})"

    def _died(self, w: _Worker) -> None:
        if not w.alive:
            return
        w.alive = False
        try:
            w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        reason = self._death_reason(w)
        for task in list(w.tasks):
            self._finish(task, reason)
        try:
            w.conn.close()
        except OSError:
            pass

    def _finish(self, task: int, error: str | None) -> None:
        stream, i, w, n = self._tasks.pop(task)
        w.tasks.discard(task)
        w.load -= n
        batch = stream.batches[i]
        batch.pending -= 1
        if error and batch.error is None:
            batch.error = error
        if batch.pending == 0:
            batch.ready = True
            if stream.closed:
                self._free_slot(batch)

    def _pump(self, timeout: float | None) -> None:
        """Handle messages from the readers (waiting at most ``timeout`` seconds for the first)."""
        conns = {w.conn: w for w in self._procs if w.alive}
        if not conns:
            return
        for conn in wait(list(conns), timeout):
            w = conns[conn]
            try:
                while True:
                    msg = conn.recv()
                    if msg[0] == "done":
                        self.tiles_decoded += msg[2]
                        self.busy_s += msg[3]
                        self._finish(msg[1], None)
                    elif msg[0] == "error":
                        self._finish(msg[1], msg[2])
                    elif msg[0] == "ready":
                        w.ready = True
                    if not conn.poll():
                        break
            except (EOFError, OSError):
                self._died(w)

    def _reclaim(self) -> bool:
        """Free slots whose release condition (a CUDA event) has passed; True if any is still pending."""
        still = []
        for slot, after in self._releasing:
            if after.query():
                self._free.append(slot)
            else:
                still.append((slot, after))
        self._releasing = still
        return bool(still)

    def _free_slot(self, batch: _Batch) -> None:
        if batch.slot is not None:
            self._free.append(batch.slot)
            batch.slot = None

    def _get(self, stream: Stream, i: int) -> np.ndarray:
        spec = stream.spec
        if stream.closed:
            raise ReaderError("stream is closed")
        batch = stream.batches[i]
        if self.workers == 0:
            return self._read_inline(stream, batch)
        while not batch.ready:
            waiting = self._reclaim()
            self._assign()
            if batch.slot is None and not self._free and not waiting and not self._tasks:
                raise ReaderError("every reader slot is held by the consumer: release batches before "
                                  "asking for more")
            self._pump(0.002 if waiting else 1.0)
            if not any(w.alive for w in self._procs):
                raise ReaderError("every reader process has exited")
        if batch.error:
            from .slide import SlideError

            raise SlideError(spec.path, f"cannot read patches {batch.a}..{batch.b}: {batch.error}")
        n = batch.b - batch.a
        off = batch.slot * self.slot_bytes
        assert self._buf is not None
        return self._buf[off:off + n * spec.patch_bytes].reshape(n, spec.out_px, spec.out_px, 3)

    def _read_inline(self, stream: Stream, batch: _Batch) -> np.ndarray:
        from .slide import open_slide

        spec = stream.spec
        if stream._slide is None:
            stream._slide = open_slide(spec.path, reader=spec.reader, mpp=spec.mpp)
            stream._slide.tile_cache_bytes = spec.cache_bytes
        out = np.empty((batch.b - batch.a, spec.out_px, spec.out_px, 3), np.uint8)
        cut_patches(stream._slide, spec, stream.origins[batch.a:batch.b], out)
        return out

    def _release(self, stream: Stream, i: int, after: Any) -> None:
        if self.workers == 0:
            return
        batch = stream.batches[i]
        if batch.slot is None:
            return
        if after is not None and not after.query():
            self._releasing.append((batch.slot, after))
            batch.slot = None
        else:
            self._free_slot(batch)
        self._assign()

    def _close_stream(self, stream: Stream) -> None:
        if stream.closed:
            return
        stream.closed = True
        if stream._slide is not None:
            stream._slide.close()
            stream._slide = None
        if self.workers == 0:
            return
        stream.next_assign = len(stream.batches)  # nothing more is queued
        for batch in stream.batches:
            if batch.slot is not None and batch.pending == 0:
                self._free_slot(batch)  # done or never started; in-flight ones free on completion
        for w in self._procs:
            if w.alive and stream.key in w.opened:
                w.opened.discard(stream.key)
                try:
                    w.conn.send(("close", stream.key))
                except (OSError, EOFError):
                    self._died(w)
        try:
            self._streams.remove(stream)
        except ValueError:
            pass
        if not self._closed:
            self._assign()

    # -- shutdown ----------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._procs if w.alive]

    def _stop_workers(self, timeout: float = 5.0) -> None:
        for w in self._procs:
            if w.alive:
                try:
                    w.conn.send(("stop",))
                except (OSError, EOFError):
                    pass
        deadline = time.monotonic() + timeout
        for w in self._procs:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.alive = False
            try:
                w.conn.close()
            except OSError:
                pass
        self._procs = []
        self._tasks.clear()

    def _unmap(self) -> None:
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        self._buf = None
        if self._mem is not None:
            try:
                self._mem.close()
            except BufferError:  # a consumer still holds a view: the mapping goes with it
                pass
            self._mem = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Stop the reader processes (waiting briefly, then killing) and free the shared memory."""
        if self._closed:
            return
        self._closed = True
        for s in list(self._streams):
            s.closed = True
        self._streams.clear()
        self._stop_workers()
        self._releasing.clear()
        self._unmap()
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> "ReaderPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
