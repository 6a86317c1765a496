"""Faults in the middle of a run: nothing finished is lost, nothing half-done is taken as complete.

* the whole ``snakemake`` process group killed with SIGKILL, then rerun;
* the disk filling up while a bag is written (a small tmpfs as the results folder; needs root, else
  skipped saying why);
* a slide file replaced on disk while its features are extracted, or after the job started reading it
  ahead (while the encoder was being built).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.features import extract as ex
from pipeline.grid import make_grid
from pipeline.files import DiskFullError
from pipeline.slide import SlideChangedError, open_slide
from pipeline.store import BagWriter, list_bags, partial_path, read_bag
from pipeline.synthetic import make_cohort, make_slide

SETTINGS = {"model": "test_resnet", "batch_size": 16, "chunk_rows": 16, "num_workers": 0, "device": "cpu"}


def _slide_and_grid(d: Path, name: str, seed: int, patch: int = 64):
    path = make_slide(d / name, width=2048, height=1536, mpp=0.5, seed=seed, positive=True)["path"]
    with open_slide(path) as s:
        grid = make_grid(s, np.ones((96, 128), bool), 16.0, {"patch_size": patch, "target_mpp": 1.0})
    gpath = d / f"{Path(name).stem}.grid.json"
    gpath.write_text(json.dumps(grid))
    return Path(path), grid, gpath


# -------------------------------------------------------------------------------------------------
# a slide replaced while it is read
# -------------------------------------------------------------------------------------------------
def test_slide_replaced_mid_extraction_is_not_finalised(tmp_path, monkeypatch):
    path, grid, gpath = _slide_and_grid(tmp_path, "s.svs", seed=5)
    other = make_slide(tmp_path / "other.svs", width=2048, height=1536, mpp=0.5, seed=6)["path"]
    out = tmp_path / "s.zarr"
    real_write = BagWriter.write
    calls = {"n": 0}

    def write_then_replace(self, start, feats, coords):
        real_write(self, start, feats, coords)
        calls["n"] += 1
        if calls["n"] == 2:  # the slide is replaced by another file after two batches
            tmp = path.with_name(".incoming.svs")
            shutil.copyfile(other, tmp)
            os.replace(tmp, path)

    monkeypatch.setattr(BagWriter, "write", write_then_replace)
    with open_slide(path) as s:
        with pytest.raises(SlideChangedError) as exc:
            ex.extract_slide(s, grid, gpath, out, SETTINGS)
    assert "changed on disk" in str(exc.value) and str(path) in str(exc.value)
    assert getattr(exc.value, "retryable", False)
    assert not out.exists() and not partial_path(out).exists()  # no bag, and no partial to resume from
    monkeypatch.setattr(BagWriter, "write", real_write)
    with open_slide(path) as s:  # the rerun reads the new file from the start
        attrs = ex.extract_slide(s, grid, gpath, out, SETTINGS)
    assert attrs["provenance"]["resumed_from"] == 0 and read_bag(out).n == len(grid["coords"])


def test_slide_replaced_after_its_read_ahead_is_not_finalised(tmp_path, monkeypatch):
    """A job reads its first slides ahead while the encoder is built; a slide replaced after its early read
    started (here: before its turn comes) must not get a bag made of the old file's patches, even though
    its own set-up (and a stamp taken there) would only see the new file."""
    a, grid, gpath = _slide_and_grid(tmp_path, "a.svs", seed=5)
    b = tmp_path / "b.svs"
    shutil.copyfile(a, b)
    other = make_slide(tmp_path / "other.svs", width=2048, height=1536, mpp=0.5, seed=6)["path"]
    real_load, real_ahead = ex._load_encoder, ex._read_ahead
    seen = {}
    read_started = threading.Event()

    def ahead(*args, **kw):
        seen["ahead"] = sorted(r := real_ahead(*args, **kw))
        read_started.set()
        return r

    def load_then_replace(*args, **kw):
        enc = real_load(*args, **kw)
        seen["waited"] = read_started.wait(30)  # bounded: a build that is never overlapped fails, not hangs
        tmp = b.with_name(".incoming.svs")
        shutil.copyfile(other, tmp)
        os.replace(tmp, b)
        return enc

    monkeypatch.setattr(ex, "_read_ahead", ahead)
    monkeypatch.setattr(ex, "_load_encoder", load_then_replace)
    done = {}
    settings = dict(SETTINGS, num_workers=1)
    with open_slide(a) as sa, open_slide(b) as sb:
        ex.extract_slides([(sa, grid, gpath, tmp_path / "a.zarr"), (sb, grid, gpath, tmp_path / "b.zarr")],
                          settings, on_done=lambda out, attrs, exc: done.__setitem__(Path(out).name, exc))
    assert seen["waited"] and seen["ahead"] == [0, 1]
    assert done["a.zarr"] is None and read_bag(tmp_path / "a.zarr").n == len(grid["coords"])
    assert isinstance(done["b.zarr"], SlideChangedError) and "changed on disk" in str(done["b.zarr"])
    assert not (tmp_path / "b.zarr").exists() and not partial_path(tmp_path / "b.zarr").exists()


def test_slide_rewritten_in_place_is_detected(tmp_path, monkeypatch):
    """Same inode, same size, modification time put back: ctime still changes."""
    path, grid, gpath = _slide_and_grid(tmp_path, "s.svs", seed=5)
    out = tmp_path / "s.zarr"
    real_write = BagWriter.write
    st = path.stat()

    def write_then_touch(self, start, feats, coords):
        real_write(self, start, feats, coords)
        if start == 0:
            data = path.read_bytes()
            with open(path, "r+b") as fh:
                fh.write(data)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    monkeypatch.setattr(BagWriter, "write", write_then_touch)
    with open_slide(path) as s, pytest.raises(SlideChangedError):
        ex.extract_slide(s, grid, gpath, out, SETTINGS)
    assert not out.exists()


# -------------------------------------------------------------------------------------------------
# disk full
# -------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (skipped, saying why, where mounting is not permitted)."""
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and the dev machines run as root)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(proc.stderr or proc.stdout).strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``disk``."""
    filler = disk / "filler.bin"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_disk_full_names_disk_and_slide_and_rerun_completes(small_disk, tmp_path, capsys):
    from pipeline.__main__ import main

    src = tmp_path / "src"
    src.mkdir()
    a, _, ga = _slide_and_grid(src, "a.svs", seed=1, patch=32)
    b, grid_b, gb = _slide_and_grid(src, "b.svs", seed=2, patch=32)
    feats = small_disk / "features"
    settings = json.dumps(SETTINGS)

    def features(slide, grid, out):
        return main(["features", "--slide", str(slide), "--grid", str(grid), "--out", str(out),
                     "--settings", settings, "--threads", "1", "--on-error", "fail"])

    assert features(a, ga, feats / "a.zarr") == 0
    before = _tree(feats / "a.zarr")
    filler = _fill(small_disk, leave=24 * 1024)  # bag b needs well over 24 KiB
    capsys.readouterr()
    assert features(b, gb, feats / "b.zarr") == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("ERROR [features]"))
    assert "disk full" in line and f"mounted at {small_disk}" in line and "free of" in line
    assert "slide b" in line and str(b) in line
    assert not (feats / "b.zarr").exists()  # nothing that looks complete
    assert _tree(feats / "a.zarr") == before  # the other bag is untouched
    # space freed: the rerun completes the slide (resuming from the chunks that made it to disk)
    filler.unlink()
    assert features(b, gb, feats / "b.zarr") == 0
    bag = read_bag(feats / "b.zarr")
    assert bag.n == len(grid_b["coords"]) and np.isfinite(bag.features.astype(np.float32)).all()
    assert [p.name for p in list_bags(feats)] == ["a.zarr", "b.zarr"]
    assert _tree(feats / "a.zarr") == before


def test_disk_full_in_json_outputs_is_named(small_disk):
    from pipeline.files import write_json_atomic

    _fill(small_disk, leave=0)
    with pytest.raises(DiskFullError) as exc:
        write_json_atomic(small_disk / "x.json", {"a": "b" * 100_000})
    assert f"mounted at {small_disk}" in str(exc.value) and str(small_disk / "x.json") in str(exc.value)
    assert [p.name for p in small_disk.iterdir()] == ["filler.bin"]  # no temporary file left behind


# -------------------------------------------------------------------------------------------------
# snakemake killed
# -------------------------------------------------------------------------------------------------
BLOCK = r"\n\s*\[[A-Z][a-z]{2} [^\]]+\][^\n]*\n"


def planned(text: str) -> dict[str, set[str]]:
    """Rule -> slides of the jobs a dry run plans."""
    jobs: dict[str, set[str]] = {}
    for block in re.split(BLOCK, text):
        m = re.match(r"\s*(?:local)?rule (\w+):", block)
        if m:
            w = re.search(r"wildcards: slide=(\S+)", block)
            jobs.setdefault(m.group(1), set()).add(w.group(1).rstrip(",") if w else "")
    return jobs


def _stamps(results: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in [*results.glob("features/*/*.zarr"), *results.glob("tissue/*/*"), *results.glob("grid/*.json")]:
        if not p.name.startswith("."):
            out[str(p.relative_to(results))] = (p.stat().st_ino, p.stat().st_mtime_ns)
    return out


@pytest.mark.slow
def test_snakemake_killed_then_rerun(root, env_with_venv, tmp_path):
    """SIGKILL to snakemake and all its jobs while a feature job is half-way through its batch (one bag
    finished, the next one being written): the rerun plans that batch again, keeps the finished bag and
    every finished tissue and grid output as they were (same inode and mtime), and completes the other."""
    import yaml

    slides = tmp_path / "slides"
    make_cohort(slides, n=2, width=2048, height=1536, mpp=0.5, seed=4)
    all_slides = {p.stem for p in slides.glob("slide_*")}
    results = tmp_path / "results"
    shutil.copyfile(root / "config.yaml", tmp_path / "config.yaml")  # the Snakefile's defaults, from its workdir
    cfg = tmp_path / "run.yaml"
    # resnet18 and small chunks, so that a slide takes long enough to be caught half-way through its batch
    cfg.write_text(yaml.safe_dump({
        "slides_dir": str(slides), "results_dir": str(results), "labels_csv": None,
        "features": {"model": "resnet18", "batch_size": 4, "num_workers": 0, "device": "cpu",
                     "chunk_rows": 4, "slides_per_job": 2},
    }))
    cmd = ["snakemake", "--snakefile", str(root / "Snakefile"), "--directory", str(tmp_path), "--cores", "2",
           "--configfile", str(cfg)]
    bags = results / "features" / "resnet18"
    log_path = tmp_path / "killed_run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_with_venv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if bags.is_dir() and list_bags(bags) and list(bags.glob(".*.zarr.partial")):
                    break  # one bag of the batch finished, the next one being written
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # snakemake and every job it started
            proc.wait()
    text = log_path.read_text()
    assert proc.returncode == -signal.SIGKILL, text[-4000:]
    finished = {p.stem for p in list_bags(bags)}
    assert 1 <= len(finished) < len(all_slides), text[-3000:]
    kept = _stamps(results)
    assert all(any(f"features/resnet18/{s}.zarr" == k for k in kept) for s in finished)
    # the dry run plans the interrupted feature batch again (its manifest was never written) and nothing
    # upstream of it
    dry = subprocess.run(cmd + ["-n"], cwd=tmp_path, env=env_with_venv, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    plan = planned(dry.stdout + dry.stderr)
    assert "features" in plan and "tissue" not in plan and "grid" not in plan, plan
    # SIGKILL leaves Snakemake's own directory lock behind; it says so and names --unlock (pipeline.runlock's
    # flock on the results folder, which guards against a second run, is released by the kernel)
    locked = subprocess.run(cmd, cwd=tmp_path, env=env_with_venv, capture_output=True, text=True, timeout=300)
    if locked.returncode != 0:
        assert "--unlock" in locked.stdout + locked.stderr, locked.stdout[-3000:] + locked.stderr[-3000:]
        subprocess.run(cmd + ["--unlock"], cwd=tmp_path, env=env_with_venv, check=True, capture_output=True,
                       timeout=300)
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env_with_venv, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = _stamps(results)
    assert all(after[k] == v for k, v in kept.items())  # finished bags, tissue and grids untouched
    assert {p.stem for p in list_bags(bags)} == all_slides
    for s in all_slides:
        grid = json.loads((results / "grid" / f"{s}.json").read_text())
        assert read_bag(bags / f"{s}.zarr").n == grid["n_patches"]
    assert not list(bags.glob(".*.partial"))
    manifest = json.loads(next((bags / ".batches").glob("*.json")).read_text())
    assert {s for s, v in manifest["slides"].items() if v["status"] == "cached"} == finished
