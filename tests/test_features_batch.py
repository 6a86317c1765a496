"""Feature jobs over batches of slides: one encoder per batch, bags as a cache checked by content, failures
per slide, one GPU per job."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.features.batch import SlideJob, bag_key, claim_device, read_spec, run_batch
from pipeline.grid import make_grid
from pipeline.slide import open_slide
from pipeline.store import read_bag
from pipeline.synthetic import make_slide

SETTINGS = {"model": "test_resnet", "batch_size": 8, "chunk_rows": 8, "num_workers": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    from pipeline.config import resolve

    d = tmp_path_factory.mktemp("batch")
    jobs = []
    for i in range(2):
        path = make_slide(d / f"s{i}.tif", width=1024, height=768, mpp=0.5, seed=20 + i)["path"]
        with open_slide(path) as s:
            grid = make_grid(s, np.ones((48, 64), bool), 16.0, {"patch_size": 64, "target_mpp": 2.0})
        gpath = d / f"g{i}.json"
        gpath.write_text(json.dumps(grid))
        jobs.append((f"s{i}", str(path), str(gpath)))
    return d, jobs, resolve("features", SETTINGS)


def _jobs(jobs, out):
    return [SlideJob(sid, slide, grid, str(out / f"{sid}.zarr")) for sid, slide, grid in jobs]


def _stamp(path):
    st = (path / "zarr.json").stat()
    return st.st_ino, st.st_mtime_ns


def test_batch_encodes_once_then_keeps_up_to_date_bags(two_slides, tmp_path):
    _, jobs, settings = two_slides
    out = tmp_path / "bags"
    first = run_batch(_jobs(jobs, out), settings, manifest=tmp_path / "m.json", batch_id="b0")
    assert [j.status for j in first] == ["encoded", "encoded"]
    for j in first:
        bag = read_bag(j.out)
        assert bag.n > 0 and bag.attrs["cache_key"] == j.key == bag_key(j.out)
    man = json.loads((tmp_path / "m.json").read_text())
    assert man["batch"] == "b0" and {v["status"] for v in man["slides"].values()} == {"encoded"}
    stamps = [_stamp(out / f"{sid}.zarr") for sid, *_ in jobs]
    # same inputs: nothing is re-encoded or rewritten
    again = run_batch(_jobs(jobs, out), settings)
    assert [j.status for j in again] == ["cached", "cached"]
    assert [_stamp(out / f"{sid}.zarr") for sid, *_ in jobs] == stamps
    # settings that do not change the features (batch size, workers, device) keep the cache
    same = run_batch(_jobs(jobs, out), {**settings, "batch_size": 4, "num_workers": 1})
    assert [j.status for j in same] == ["cached", "cached"]
    # another seed (other random weights) re-encodes, replacing each bag only when the new one is complete
    other = run_batch(_jobs(jobs, out), {**settings, "seed": 5})
    assert [j.status for j in other] == ["encoded", "encoded"]
    assert all(j.key != f.key for j, f in zip(other, first))


def test_changed_grid_reencodes_only_that_slide(two_slides, tmp_path):
    d, jobs, settings = two_slides
    out = tmp_path / "bags"
    run_batch(_jobs(jobs, out), settings)
    kept = _stamp(out / "s0.zarr")
    g = json.loads((d / "g1.json").read_text())
    g["coords"] = g["coords"][:3]
    g["n_patches"] = 3
    changed = tmp_path / "g1.json"
    changed.write_text(json.dumps(g))
    res = run_batch([SlideJob("s0", jobs[0][1], jobs[0][2], str(out / "s0.zarr")),
                     SlideJob("s1", jobs[1][1], str(changed), str(out / "s1.zarr"))], settings)
    assert [j.status for j in res] == ["cached", "encoded"]
    assert _stamp(out / "s0.zarr") == kept and read_bag(out / "s1.zarr").n == 3


def test_failures_stay_per_slide(two_slides, tmp_path):
    d, jobs, settings = two_slides
    out, results = tmp_path / "bags", tmp_path / "results"
    failed_grid = tmp_path / "failed.json"
    failed_grid.write_text(json.dumps({"slide_id": "up", "status": "failed", "stage": "tissue",
                                       "error": "no mpp", "coords": [], "read_plan": None}))
    batch = _jobs(jobs[:1], out) + [
        SlideJob("gone", str(d / "missing.tif"), jobs[0][2], str(out / "gone.zarr")),
        SlideJob("up", jobs[1][1], str(failed_grid), str(out / "up.zarr"))]
    res = {j.slide_id: j for j in run_batch(batch, settings, on_error="skip", results_dir=str(results))}
    assert res["s0"].status == "encoded" and read_bag(out / "s0.zarr").n > 0
    assert res["gone"].status == "failed" and "does not exist" in res["gone"].error
    gone = read_bag(out / "gone.zarr")
    assert gone.attrs["status"] == "failed" and "cache_key" not in gone.attrs  # retried on the next run
    rec = json.loads((results / "failures" / "gone.json").read_text())
    assert rec["stage"] == "features" and "missing.tif" in rec["path"]
    up = read_bag(out / "up.zarr")
    assert res["up"].status == "skipped-upstream" and up.attrs["stage"] == "tissue" and up.attrs["error"] == "no mpp"
    # fail mode: the broken slide writes nothing, the others still complete
    res = {j.slide_id: j for j in run_batch(_jobs(jobs[1:], tmp_path / "f") + [
        SlideJob("gone", str(d / "missing.tif"), jobs[0][2], str(tmp_path / "f" / "gone.zarr"))], settings,
        on_error="fail")}
    assert res["s1"].status == "encoded" and res["gone"].status == "failed"
    assert not (tmp_path / "f" / "gone.zarr").exists()


def test_batch_cli(two_slides, tmp_path):
    from pipeline.cli import main

    _, jobs, settings = two_slides
    spec = [{"slide_id": sid, "slide": slide, "grid": grid, "out": str(tmp_path / f"{sid}.zarr")}
            for sid, slide, grid in jobs]
    args = ["features", "--batch", json.dumps(spec), "--manifest", str(tmp_path / "m.json"), "--settings",
            json.dumps(SETTINGS)]
    assert main(args) == 0 and all((tmp_path / f"{sid}.zarr").is_dir() for sid, *_ in jobs)
    assert main(["features", "--batch", "[{\"slide\": 1}]"]) == 1  # a malformed batch is refused
    with pytest.raises(ValueError, match="lacks slide_id"):
        read_spec('[{"slide": "x", "grid": "g", "out": "o"}]')


def test_each_feature_job_claims_its_own_gpu(tmp_path):
    import subprocess
    import sys

    assert claim_device("cpu", 4, tmp_path) == ("cpu", None)
    assert claim_device("cuda:1", 4, tmp_path) == ("cuda:1", None)
    assert claim_device("auto", 1, tmp_path) == ("auto", None)
    held = claim_device("auto", 2, tmp_path)
    assert held[0] == "cuda:0"
    # another process (another feature job) gets the next GPU while this one holds the first
    code = ("import sys; from pipeline.features.batch import claim_device; "
            f"print(claim_device('cuda', 2, {str(tmp_path)!r})[0])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "cuda:1", other.stderr


def test_weights_file_is_hashed_once_while_the_job_starts(two_slides, tmp_path, monkeypatch):
    """A batch with a local weights file starts hashing it before importing torch and building the model;
    the hash recorded in the bags is that one (the file is read for hashing once per job), and a file
    changed since is hashed again."""
    import hashlib
    import threading

    from safetensors.torch import save_file

    from pipeline import files
    from pipeline.features import create_encoder

    _, jobs, settings = two_slides
    wfile = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in create_encoder("test_resnet", seed=3).model.state_dict().items()},
              str(wfile))
    digest = hashlib.sha256(wfile.read_bytes()).hexdigest()
    hashed = []
    real = files._sha256

    def spy(path, *a, **k):
        hashed.append((str(path), threading.current_thread().name))
        return real(path, *a, **k)

    monkeypatch.setattr(files, "_sha256", spy)
    done = run_batch(_jobs(jobs, tmp_path / "bags"), {**settings, "weights": str(wfile)})
    assert [j.status for j in done] == ["encoded", "encoded"]
    assert [h for h in hashed if h[0] == str(wfile)] == [(str(wfile), "wsipipe-sha256")]
    for j in done:
        assert read_bag(j.out).attrs["weights"]["sha256"] == digest

    files.sha256_file_soon(tmp_path / "missing.bin")  # nothing to hash: the caller reports it later
    with pytest.raises(FileNotFoundError):
        files.sha256_file(tmp_path / "missing.bin")
    wfile.write_bytes(b"other bytes")  # changed since it was hashed: hashed again, in the caller
    assert files.sha256_file(wfile) == hashlib.sha256(b"other bytes").hexdigest()
    assert hashed[-1] == (str(wfile), threading.current_thread().name)
