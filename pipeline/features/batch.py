"""Feature extraction of a batch of slides in one process: the workflow's feature jobs.

One job = one batch of slides (``features.slides_per_job``): the encoder is built once for the batch and
the next slide's reading overlaps the current slide's encoding (:func:`pipeline.features.extract.
extract_slides`). The bags stay per slide and act as a cache checked by content: every finished bag
records a ``cache_key`` (the slide's content fingerprint, the grid file's sha256, the resolved feature
settings, the weights' identity and the stage version). A slide whose bag carries the expected key is
skipped without being touched, so rerunning a batch because one of its slides changed re-encodes only
that slide, and a finished, valid bag is never deleted or rewritten. A bag with another key is rebuilt
into its hidden partial sibling and swapped in only when complete; an interrupted slide resumes from its
last finished chunk. Failures stay per slide: each gets its one-line record under ``failures/`` and, with
``on_error="skip"``, an explicit failed bag; the other slides of the batch go on.

The cache check reads only bag attributes (no torch), so a batch whose slides are all current finishes in
well under a second. The job writes a small manifest (``features/{tag}/.batches/{batch}.json``: per slide
the bag, its status and key) last, atomically: the Snakemake output of the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import STAGE_VERSIONS, __version__
from ..files import read_json, sha256_file, write_json_atomic
from ..log import get_logger
from ..provenance import content_fingerprint, provenance

log = get_logger("features")


@dataclass
class SlideJob:
    """One slide of a batch: where it is, its grid and bag, and how to open it."""

    slide_id: str
    slide: str
    grid: str
    out: str
    mpp: float | None = None  # manifest µm/px (overrides metadata)
    content: str | None = None  # content fingerprint (the workflow computed it while planning)
    status: str = "pending"  # cached | encoded | failed | skipped-upstream
    key: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_spec(text: str) -> list[SlideJob]:
    """The batch from ``--batch``: a JSON list of ``{slide_id, slide, grid, out[, mpp, content]}`` (or
    ``@FILE`` holding one)."""
    src = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
    try:
        rows = json.loads(src)
    except ValueError as exc:
        raise ValueError(f"--batch is not valid JSON ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("--batch must be a JSON list of {slide_id, slide, grid, out} objects")
    jobs = []
    for r in rows:
        missing = [k for k in ("slide_id", "slide", "grid", "out") if not r.get(k)]
        if missing:
            raise ValueError(f"--batch entry {r!r} lacks {', '.join(missing)}")
        jobs.append(SlideJob(str(r["slide_id"]), str(r["slide"]), str(r["grid"]), str(r["out"]),
                             mpp=r.get("mpp"), content=r.get("content")))
    return jobs


def weights_identity(settings: dict[str, Any]) -> Any:
    """What identifies the encoder's weights without loading them: ``random`` (+ seed, in the settings),
    the content fingerprint of a local weights file, or the hub source for ``pretrained``."""
    if settings.get("weights"):
        p = Path(settings["weights"])
        return {"file": p.name, "content": content_fingerprint(p) if p.is_file() else "missing"}
    if settings.get("pretrained"):
        return {"pretrained": settings["model"]}
    return "random"


def cache_key(content: str, grid_path: str | os.PathLike, settings: dict[str, Any], weights: Any) -> str:
    """The key a bag must carry to be reused: slide content, grid, settings, weights and stage version.
    Settings that do not change the features (batch size, reader processes, batching) are left out; the
    device, resize path and decoder stay in (CUDA bf16 features differ slightly from CPU fp32 ones)."""
    keep = {k: v for k, v in settings.items() if k not in ("batch_size", "num_workers", "slides_per_job")}
    rec = {"content": content, "grid": sha256_file(grid_path), "settings": keep, "weights": weights,
           "stage_version": STAGE_VERSIONS["features"], "pipeline": __version__}
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()


def bag_key(path: str | os.PathLike) -> str | None:
    """The ``cache_key`` of a finished bag (None when there is no readable bag)."""
    zj = Path(path) / "zarr.json"
    try:
        attrs = (read_json(zj, "bag metadata").get("attributes") or {})
    except (ValueError, AttributeError):
        return None
    return attrs.get("cache_key")


def run_batch(jobs: list[SlideJob], settings: dict[str, Any], *, reader: str = "auto",
              default_mpp: float | None = None, on_error: str = "fail", results_dir: str | None = None,
              manifest: str | os.PathLike | None = None, threads: int | None = None,
              batch_id: str = "") -> list[SlideJob]:
    """Bring every slide's bag of the batch up to date (see the module docstring). Returns the jobs with
    their status; writes ``manifest`` last when given. With ``on_error="fail"`` a failed slide is recorded
    and the others still run; the caller exits non-zero."""
    from .. import failures
    from ..failures import upstream_failure

    t0, started = time.monotonic(), time.time()
    p = settings
    wid = weights_identity(p)
    todo: list[SlideJob] = []
    for j in jobs:
        up = upstream_failure(j.grid)
        try:
            j.key = cache_key(j.content or content_fingerprint(j.slide), j.grid, p, wid)
        except OSError as exc:
            j.key = None
            j.extra["key_error"] = str(exc)
        if j.key is not None and bag_key(j.out) == j.key:
            j.status = "cached"
            continue
        if up:
            _write_failed(j, up.get("error", "failed upstream"), up.get("stage", "grid"), p)
            j.status, j.error = "skipped-upstream", f"{up.get('stage')} failed"
            log.info("%s: skipped, %s failed", j.slide_id, up.get("stage"))
            continue
        todo.append(j)
    n_cached = sum(j.status == "cached" for j in jobs)
    log.info("batch %s: %d slide(s), %d up to date, %d to encode", batch_id or "-", len(jobs), n_cached, len(todo))
    if todo:
        _encode(todo, p, reader=reader, default_mpp=default_mpp, threads=threads,
                on_failed=lambda j, reason, exc=None: _failed(j, reason, p, on_error, results_dir, exc))
        for j in todo:
            if j.status == "encoded" and results_dir:
                failures.clear_failure(results_dir, j.slide_id, "features")
    if manifest:
        write_json_atomic(manifest, {
            "batch": batch_id, "slides": {j.slide_id: {"bag": j.out, "status": j.status, "cache_key": j.key,
                                                       "error": j.error} for j in jobs},
            "started": started, "finished": time.time(),
            "provenance": provenance("features", p, seconds=round(time.monotonic() - t0, 3))})
    return jobs


def _write_failed(j: SlideJob, reason: str, stage: str, p: dict[str, Any]) -> None:
    from .extract import write_failed_bag

    write_failed_bag(j.out, j.slide_id, reason, p, stage, cache_key=j.key)


def _failed(j: SlideJob, reason: str, p: dict[str, Any], on_error: str, results_dir: str | None,
            exc: BaseException | None = None) -> None:
    """A slide of the batch failed: its one-line record, and (``on_error="skip"``) an explicit failed bag,
    unless the failure is not the slide's (a full disk, the file replaced while it was read, an encoder
    that cannot be built): then nothing is written and the job fails, so that a rerun completes it."""
    from .. import failures
    from ..cli._slide import retryable

    reason = failures.one_line(reason)
    j.status, j.error = "failed", reason
    log.error("%s: %s", j.slide, reason)
    if results_dir:
        try:
            failures.record_failure(results_dir, j.slide_id, "features", reason, j.slide)
        except OSError:
            pass
    if exc is not None and (retryable(exc) or j.extra.get("retryable")):
        j.extra["retryable"] = True
        return
    if on_error == "skip":
        # not cached (no key): a failure of this stage itself is retried when the batch runs again
        from .extract import write_failed_bag

        write_failed_bag(j.out, j.slide_id, reason, p, "features")
        log.info("%s: failed outputs written (on_slide_error=skip)", j.slide_id)


def claim_device(device: str, count: int, lock_dir: str | os.PathLike | None = None) -> tuple[str, Any]:
    """The device a feature job should use, and the held lock (keep it referenced until the job ends).

    ``auto``/``cuda`` with several visible GPUs: the first GPU no other feature job on this machine holds
    (an exclusive ``flock`` per GPU index under ``lock_dir``, released by the OS when the job exits), so
    ``snakemake --resources gpu=N`` runs N feature jobs on N different GPUs. One GPU, an explicit
    ``cuda:N``, or ``cpu``: unchanged."""
    import fcntl
    import tempfile

    if device not in ("auto", "cuda") or count <= 1:
        return device, None
    lock_dir = Path(lock_dir or tempfile.gettempdir())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "-")
    for i in range(count):
        path = lock_dir / f"wsipipe-gpu-{os.getuid()}-{visible}-{i}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return f"cuda:{i}", fd
    return "cuda:0", None  # more feature jobs than GPUs (no --resources gpu limit): share the first


def _encode(todo: list[SlideJob], p: dict[str, Any], *, reader: str, default_mpp: float | None,
            threads: int | None, on_failed: Callable[[SlideJob, str], None]) -> None:
    """Open the slides, build the encoder once and extract them one after another (next slide prefetched)."""
    if p.get("weights"):  # its hash goes into every bag: computed while torch and timm are imported
        from ..files import sha256_file_soon

        sha256_file_soon(p["weights"])
    import torch

    from ..grid import load_grid
    from ..slide import SlideError, open_slide
    from .extract import extract_slides

    if threads:  # the job's CPUs, for the model; the reader processes share them (they wait whenever the
        # model is the bottleneck: measured faster than splitting the cores between them, docs/benchmarks.md)
        torch.set_num_threads(max(1, int(threads)))
    if p["device"] in ("auto", "cuda") and torch.cuda.is_available():
        device, _held = claim_device(p["device"], torch.cuda.device_count())
        if device != p["device"]:
            log.info("using %s (of %d visible GPUs)", device, torch.cuda.device_count())
            p = {**p, "device": device}
    ready = []
    for j in todo:
        try:
            grid = load_grid(j.grid)
            slide = open_slide(j.slide, reader=reader, mpp=j.mpp, default_mpp=default_mpp, slide_id=j.slide_id)
            grid_mpp = grid["read_plan"]["level0_mpp"]
            if abs(grid_mpp - slide.mpp) > 1e-9 * max(1.0, grid_mpp):
                slide.close()
                raise SlideError(j.slide, f"level-0 mpp {slide.mpp} differs from the grid's {grid_mpp} "
                                          f"({j.grid} is stale: rerun the grid stage)")
        except (SlideError, ValueError, OSError) as exc:
            on_failed(j, exc.reason if isinstance(exc, SlideError) and exc.path == j.slide else str(exc), exc)
            continue
        ready.append((j, slide, grid))
    if not ready:
        return
    by_out = {str(j.out): j for j, _, _ in ready}

    def done(out: str, attrs: dict[str, Any] | None, exc: BaseException | None) -> None:
        j = by_out[str(out)]
        if exc is None:
            j.status = "encoded"
            log.info("%s: bag with %d patches written to %s", j.slide_id, attrs["n_patches"], j.out)
        else:
            from ..slide import SlideError as _SE

            reason = exc.reason if isinstance(exc, _SE) and exc.path == j.slide else f"{exc}"
            if not isinstance(exc, (_SE, ValueError, OSError)):
                reason = f"{type(exc).__name__}: {exc}"
            on_failed(j, reason, exc)

    try:
        extract_slides([(s, g, j.grid, j.out) for j, s, g in ready], p,
                       extra_attrs={str(j.out): {"cache_key": j.key} for j, _, _ in ready}, on_done=done)
    except Exception as exc:  # noqa: BLE001 - before any slide: the encoder cannot be built or moved
        for j, _, _ in ready:
            if j.status == "pending":
                j.extra["retryable"] = True  # not the slide's fault: no failed bag, the job fails
                on_failed(j, f"encoder {p['model']!r}: {exc}", exc)
    finally:
        for _, s, _ in ready:
            s.close()
