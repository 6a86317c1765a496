"""Reader processes: same pixels as reading in-process (and as OpenSlide), slides queued on one pool,
per-slide failures, a dead reader reported, and clean shutdown: no orphan processes, no shared memory
left behind (after close, an error, KeyboardInterrupt, or the parent killed with SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.readers import ReaderError, ReaderPool, ReadSpec, cut_patches, level_origins
from pipeline.slide import SlideError, open_slide
from pipeline.synthetic import make_slide


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("readers")
    return [make_slide(d / "a.svs", width=3072, height=2048, mpp=0.25, seed=3, positive=True)["path"],
            make_slide(d / "b.tif", width=2048, height=1536, mpp=0.5, seed=4)["path"]]


def _job(path, read_px=448, patch_px=224, resize=True, step=None):
    """Every patch of a regular grid over the slide (edges included, some hanging over the border)."""
    with open_slide(path) as s:
        W, H = s.level_dimensions[0]
        spec = ReadSpec(str(s.path), s.reader, float(s.mpp), 0, read_px, patch_px, resize)
    step = step or read_px
    xs, ys = np.meshgrid(np.arange(0, W, step), np.arange(0, H, step))
    origins = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int32)
    return spec, origins


def _batches(n, bs):
    return [(a, min(a + bs, n)) for a in range(0, n, bs)]


def _reference(spec, origins):
    out = np.empty((len(origins), spec.out_px, spec.out_px, 3), np.uint8)
    with open_slide(spec.path) as s:
        cut_patches(s, spec, origins, out)
    return out


def _check_stream(stream, spec, origins, bs):
    """Every batch of ``stream`` equals the inline cut of the same patches; the stream is closed."""
    ref = _reference(spec, origins)
    for i, (a, b) in enumerate(_batches(len(origins), bs)):
        np.testing.assert_array_equal(stream.get(i), ref[a:b])
        stream.release(i)
    stream.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_level_origins_round_to_the_level_grid():
    o = level_origins(np.array([[0, 0], [449, 1], [898, 2]]), 4.0)
    np.testing.assert_array_equal(o, [[0, 0], [112, 0], [224, 0]])


def test_cut_patches_match_openslide(slides):
    """Regions read per run and cut: each patch equals OpenSlide's read of the same pixels, resized by cv2."""
    import cv2

    spec, origins = _job(slides[0], step=300)  # overlapping patches, several runs per row
    got = _reference(spec, origins[:40])
    with open_slide(slides[0], reader="openslide") as s:
        for k in (0, 7, 13, 39):
            x, y = (int(v) for v in origins[k])
            ref = cv2.resize(s.read_region(x, y, 0, 448, 448), (224, 224), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(got[k], ref)


def test_pool_pixels_identical_to_inline_and_processes_reused(slides):
    shm_before = _shm_entries()
    jobs = [_job(slides[0]), _job(slides[1], read_px=256, patch_px=256), _job(slides[0], resize=False)]
    with ReaderPool(2, slot_bytes=max(5 * spec.patch_bytes for spec, _ in jobs)) as pool:
        streams = [pool.submit(spec, org, _batches(len(org), 5), stripe_px=512) for spec, org in jobs]
        pids = pool.pids()
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        for stream, (spec, org) in zip(streams, jobs):  # the queued streams are read in turn, in order
            _check_stream(stream, spec, org, 5)
        assert pool.pids() == pids  # the same processes served every slide
        assert pool.tiles_decoded > 0
    assert not any(_alive(p) for p in pids)
    assert _shm_entries() == shm_before  # nothing named in /dev/shm, ever


def test_inline_pool_reads_in_the_calling_process(slides):
    spec, org = _job(slides[1], read_px=300, patch_px=224)
    with ReaderPool(0) as pool:
        stream = pool.submit(spec, org, _batches(len(org), 4))
        assert pool.pids() == []
        got = np.concatenate([stream.get(i) for i in range(len(stream))])
        stream.close()
    np.testing.assert_array_equal(got, _reference(spec, org))


def test_slide_failure_is_reported_and_the_pool_goes_on(slides, tmp_path):
    bad = tmp_path / "cut.svs"
    src = Path(slides[0]).read_bytes()
    bad.write_bytes(src)
    spec_bad, org = _job(bad)
    with open(bad, "r+b") as fh:  # tile data gone after the slide was opened
        fh.truncate(len(src) // 3)
    spec_ok, org_ok = _job(slides[1])
    with ReaderPool(2) as pool:
        s1 = pool.submit(spec_bad, org, _batches(len(org), 8))
        s2 = pool.submit(spec_ok, org_ok, _batches(len(org_ok), 8))
        with pytest.raises(SlideError) as exc:
            for i in range(len(s1)):
                s1.get(i)
                s1.release(i)
        assert str(bad) in str(exc.value)
        s1.close()
        _check_stream(s2, spec_ok, org_ok, 8)


def test_dead_reader_is_reported_and_replaced(slides):
    spec, org = _job(slides[0], step=224)
    with ReaderPool(2, n_slots=3) as pool:
        stream = pool.submit(spec, org, _batches(len(org), 4))
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises((SlideError, ReaderError), match="exited unexpectedly|has exited"):
            for i in range(len(stream)):
                stream.get(i)
                stream.release(i)
        stream.close()
        # the next slide gets a fresh reader in place of the dead one
        spec2, org2 = _job(slides[1])
        s2 = pool.submit(spec2, org2, _batches(len(org2), 8))
        assert victim not in pool.pids() and len(pool.pids()) == 2
        _check_stream(s2, spec2, org2, 8)


def test_consumer_holding_every_slot_is_an_error_not_a_hang(slides):
    spec, org = _job(slides[0], step=224)
    with ReaderPool(1, n_slots=2) as pool:
        stream = pool.submit(spec, org, _batches(len(org), 2))
        stream.get(0)
        stream.get(1)
        with pytest.raises(ReaderError, match="release"):
            stream.get(2)


def test_keyboard_interrupt_leaves_no_reader_behind(slides, monkeypatch, tmp_path, spawned_readers):
    """Ctrl-C during extraction: the exception propagates, the readers are stopped, finished batches
    are on disk (a rerun resumes after them)."""
    from pipeline.features import extract as ex
    from pipeline.grid import make_grid
    from pipeline.store import partial_path

    with open_slide(slides[1]) as s:
        grid = make_grid(s, np.ones((96, 128), bool), 16.0, {"patch_size": 64, "target_mpp": 1.0})
    gpath = tmp_path / "grid.json"
    gpath.write_text(json.dumps(grid))
    spawned = spawned_readers
    calls = {"n": 0}
    real = ex.embed_batch

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ex, "embed_batch", interrupted)
    shm_before = _shm_entries()
    out = tmp_path / "k.zarr"
    with open_slide(slides[1]) as s, pytest.raises(KeyboardInterrupt):
        ex.extract_slide(s, grid, gpath, out, {"model": "test_resnet", "batch_size": 8, "chunk_rows": 8,
                                               "num_workers": 2, "device": "cpu"})
    assert len(spawned) == 2 and not any(_alive(p) for p in spawned)
    assert _shm_entries() == shm_before
    assert json.loads((partial_path(out) / "progress.json").read_text())["rows_done"] == 16


def test_parent_killed_readers_exit(slides, tmp_path):
    """kill -9 of the process that owns the pool: its readers notice and exit (no orphans)."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from pipeline.readers import ReaderPool
        pool = ReaderPool(2, slot_bytes=1 << 20)
        pool.wait_ready()
        print(" ".join(map(str, pool.pids())), flush=True)
        time.sleep(120)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(v) for v in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
