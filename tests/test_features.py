"""Feature extraction: bag schema, determinism, resume after an interruption, encoder registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.features import create_encoder, list_encoders
from pipeline.features import extract as ex
from pipeline.grid import make_grid
from pipeline.files import sha256_file
from pipeline.slide import open_slide
from pipeline.store import partial_path, read_bag
from pipeline.synthetic import make_slide

TEST_MODEL = "test_resnet"  # small timm CNN, random weights

SETTINGS = {"model": TEST_MODEL, "batch_size": 8, "chunk_rows": 8, "num_workers": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def slide_and_grid(tmp_path_factory):
    import json

    d = tmp_path_factory.mktemp("feat")
    path = make_slide(d / "s.svs", width=2048, height=1536, mpp=0.5, seed=7, flavour="svs",
                      positive=True)["path"]
    with open_slide(path) as s:
        mask = np.ones((96, 128), bool)
        grid = make_grid(s, mask, 16.0, {"patch_size": 128, "target_mpp": 1.0})
    gpath = d / "grid.json"
    gpath.write_text(json.dumps(grid))
    return path, grid, gpath


def _extract(path, grid, gpath, out, settings=SETTINGS):
    with open_slide(path) as s:
        return ex.extract_slide(s, grid, gpath, out, settings)


def test_bag_schema_and_values(slide_and_grid, tmp_path):
    path, grid, gpath = slide_and_grid
    attrs = _extract(path, grid, gpath, tmp_path / "s.zarr")
    bag = read_bag(tmp_path / "s.zarr")
    n = len(grid["coords"])
    assert n == 8 * 6 and bag.n == n
    assert bag.features.dtype == np.float16 and bag.features.shape == (n, attrs["feature_dim"])
    np.testing.assert_array_equal(bag.coords, np.asarray(grid["coords"]))
    a = bag.attrs
    assert a["model"] == TEST_MODEL and a["weights"] == "random"
    assert a["target_mpp"] == 1.0 and a["patch_size_px"] == 128 and a["level0_mpp"] == 0.5
    assert a["mpp_source"] == "openslide.mpp-x" and a["feature_dim"] == bag.features.shape[1]
    assert np.isfinite(bag.features.astype(np.float32)).all()
    assert bag.features.astype(np.float32).std(axis=0).mean() > 0  # patches differ
    # target 1.0 on a 0.5 scan needs 2x: level 0 (ds 1) is read at 256 px and resized to 128
    plan = a["provenance"]["read_plan"]
    assert (plan["level"], plan["read_size_px"], plan["patch_size_level0_px"]) == (0, 256, 256)
    prov = a["provenance"]
    assert (prov["decoder"], prov["resize"], prov["weights_dtype"]) == ("tiled-jpeg-direct", "cpu-cv2-inter_area",
                                                                         "fp32")
    assert prov["gpu_decode"] == {"requested": False, "used": False} and prov["reader_processes"] == 0


def test_same_inputs_bit_identical_and_resume_after_crash(slide_and_grid, tmp_path, monkeypatch):
    path, grid, gpath = slide_and_grid
    _extract(path, grid, gpath, tmp_path / "ref.zarr")
    ref = read_bag(tmp_path / "ref.zarr").features

    # Crash after the 3rd batch: nothing appears under the final name, the partial bag remains.
    calls = {"n": 0}
    real = ex.embed_batch

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(ex, "embed_batch", crashing)
    out = tmp_path / "run.zarr"
    with pytest.raises(RuntimeError, match="simulated"):
        _extract(path, grid, gpath, out)
    assert not out.exists() and partial_path(out).is_dir()

    # Resume: only the remaining batches are computed, and the result equals the uninterrupted run.
    calls["n"] = -1000
    attrs = _extract(path, grid, gpath, out)
    assert attrs["provenance"]["resumed_from"] == 24
    np.testing.assert_array_equal(read_bag(out).features, ref)
    assert not partial_path(out).exists()


def test_partial_from_other_settings_not_reused(slide_and_grid, tmp_path):
    path, grid, gpath = slide_and_grid
    out = tmp_path / "x.zarr"
    _extract(path, grid, gpath, out)
    other = dict(SETTINGS, seed=1)
    attrs = _extract(path, grid, gpath, tmp_path / "y.zarr", other)
    assert attrs["provenance"]["resumed_from"] == 0
    assert not np.array_equal(read_bag(out).features, read_bag(tmp_path / "y.zarr").features)


def test_empty_grid_gives_valid_empty_bag(slide_and_grid, tmp_path):
    path, grid, gpath = slide_and_grid
    empty = dict(grid, coords=[], tissue_fraction=[], n_patches=0)
    _extract(path, empty, gpath, tmp_path / "e.zarr")
    bag = read_bag(tmp_path / "e.zarr")
    assert bag.n == 0 and bag.features.shape[1] == bag.attrs["feature_dim"] > 0


def test_workers_give_same_features(slide_and_grid, tmp_path):
    path, grid, gpath = slide_and_grid
    _extract(path, grid, gpath, tmp_path / "a.zarr")
    _extract(path, grid, gpath, tmp_path / "b.zarr", dict(SETTINGS, num_workers=2))
    np.testing.assert_array_equal(read_bag(tmp_path / "a.zarr").features, read_bag(tmp_path / "b.zarr").features)


def test_many_slides_share_one_pool_and_a_failure_stays_per_slide(slide_and_grid, tmp_path, spawned_readers):
    """extract_slides: the reader processes are started once for all slides (the next slide is read while
    the current one is encoded); a broken slide is reported, the others complete, the error is raised
    at the end; bags equal single-slide runs bit for bit."""
    import shutil

    path, grid, gpath = slide_and_grid
    bad = tmp_path / "bad.svs"
    shutil.copy(path, bad)
    spawned = spawned_readers
    settings = dict(SETTINGS, num_workers=2)
    with open_slide(path) as s1, open_slide(bad) as s2, open_slide(path) as s3:
        src = bad.read_bytes()
        with open(bad, "r+b") as fh:  # tile data gone after opening
            fh.truncate(len(src) // 4)
        jobs = [(s1, grid, gpath, tmp_path / "1.zarr"), (s2, grid, gpath, tmp_path / "2.zarr"),
                (s3, grid, gpath, tmp_path / "3.zarr")]
        with pytest.raises(Exception) as exc:
            ex.extract_slides(jobs, settings)
    assert str(bad) in str(exc.value)
    assert len(spawned) == 2  # one pool of 2 reader processes for the three slides
    assert not (tmp_path / "2.zarr").exists()
    _extract(path, grid, gpath, tmp_path / "ref.zarr")
    for k in ("1", "3"):
        np.testing.assert_array_equal(read_bag(tmp_path / f"{k}.zarr").features, read_bag(tmp_path / "ref.zarr").features)


def test_first_slide_is_read_while_the_encoder_is_built(slide_and_grid, tmp_path, monkeypatch, spawned_readers):
    """The reader processes start on the first slide before the encoder exists (a feature job's fixed
    start-up, mostly importing timm and building the model, overlaps reading); that read is the one the
    slide uses (one submission per slide), the bag is bit-identical, and a slide with a partial bag to
    resume, or an encoder that cannot be built, leaves no read behind."""
    import threading

    from pipeline.readers import ReaderPool

    path, grid, gpath = slide_and_grid
    settings = dict(SETTINGS, num_workers=1)
    _extract(path, grid, gpath, tmp_path / "ref.zarr", settings)
    read_started = threading.Event()
    seen = {"waited": None, "submits": 0}
    real_ahead, real_load, real_submit = ex._read_ahead, ex._load_encoder, ReaderPool.submit

    def ahead(*a, **k):
        r = real_ahead(*a, **k)
        seen["ahead"] = sorted(r)
        if r:
            read_started.set()
        return r

    def load(*a, **k):  # the build waits (up to 30 s) for the read to be under way
        seen["waited"] = read_started.wait(30)
        return real_load(*a, **k)

    def submit(self, *a, **k):
        seen["submits"] += 1
        return real_submit(self, *a, **k)

    monkeypatch.setattr(ex, "_read_ahead", ahead)
    monkeypatch.setattr(ex, "_load_encoder", load)
    monkeypatch.setattr(ReaderPool, "submit", submit)
    _extract(path, grid, gpath, tmp_path / "a.zarr", settings)
    assert seen == {"waited": True, "submits": 1, "ahead": [0]}
    np.testing.assert_array_equal(read_bag(tmp_path / "a.zarr").features, read_bag(tmp_path / "ref.zarr").features)

    # several slides: the next ones are read ahead too while their batches fit in the slots (6 batches
    # each here, 64 slots), up to a slide with a partial bag; each read is the one its slide uses
    partial_path(tmp_path / "m3.zarr").mkdir(parents=True)
    seen.update(waited=None, submits=0)
    with open_slide(path) as s:
        ex.extract_slides([(s, grid, gpath, tmp_path / f"m{k}.zarr") for k in range(5)], settings)
    assert seen == {"waited": True, "submits": 5, "ahead": [0, 1, 2]}
    for k in range(5):
        np.testing.assert_array_equal(read_bag(tmp_path / f"m{k}.zarr").features,
                                      read_bag(tmp_path / "ref.zarr").features)

    # a partial bag: the start row depends on the encoder's fingerprint, so nothing is read ahead
    partial_path(tmp_path / "b.zarr").mkdir(parents=True)
    read_started.clear()
    seen.update(waited=None, submits=0)
    monkeypatch.setattr(ex, "_load_encoder", real_load)
    _extract(path, grid, gpath, tmp_path / "b.zarr", settings)
    assert not read_started.is_set() and seen["submits"] == 1
    np.testing.assert_array_equal(read_bag(tmp_path / "b.zarr").features, read_bag(tmp_path / "ref.zarr").features)

    # the encoder cannot be built: the error comes out, the early read is closed with the pool
    def broken(*a, **k):
        read_started.wait(30)
        raise RuntimeError("no such weights")

    monkeypatch.setattr(ex, "_load_encoder", broken)
    read_started.clear()
    with pytest.raises(RuntimeError, match="no such weights"):
        _extract(path, grid, gpath, tmp_path / "c.zarr", settings)
    assert read_started.is_set() and not (tmp_path / "c.zarr").exists()
    import time

    from test_readers import _alive

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in spawned_readers):
        time.sleep(0.1)
    assert len(spawned_readers) == 5  # one reader process per run (the reference, a, m, b, c)
    assert not [pid for pid in spawned_readers if _alive(pid)]  # each closed with its pool


def test_local_weights_file_sha256_recorded(slide_and_grid, tmp_path):
    from safetensors.torch import save_file

    enc = create_encoder(TEST_MODEL, seed=5)
    wfile = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(wfile))
    loaded = create_encoder(TEST_MODEL, weights=str(wfile), seed=99)
    assert loaded.weights == {"source": "file:w.safetensors", "sha256": sha256_file(wfile)}
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(enc.embed(x), loaded.embed(x))


@pytest.mark.parametrize("arch, meta_built", [("test_vit", True), ("test_vit_relpos", False)])
def test_weights_file_replaces_random_init(tmp_path, monkeypatch, arch, meta_built):
    """A timm architecture with a local weights file is built without storage and the file's tensors are
    assigned (no random initialisation, seconds for a ViT-L), unless it has buffers that only construction
    computes (relative position indices: built for real, then loaded); same embeddings either way, and a
    file for another architecture is refused naming the file."""
    from safetensors.torch import save_file

    from pipeline.features import encoders

    ref = create_encoder(arch, seed=5)
    wfile = tmp_path / "w.safetensors"
    save_file({k: v.contiguous().to(torch.bfloat16 if v.is_floating_point() else v.dtype)
               for k, v in ref.model.state_dict().items()}, str(wfile))  # dtype differs from the model's
    ref.model.load_state_dict({k: v.to(torch.bfloat16).float() if v.is_floating_point() else v
                               for k, v in ref.model.state_dict().items()})
    seen = []
    real = encoders._checkpoint_complete

    def spy(model):
        seen.append((next(model.parameters()).is_meta, real(model)))
        return seen[-1][1]

    monkeypatch.setattr(encoders, "_checkpoint_complete", spy)
    loaded = create_encoder(arch, weights=str(wfile), seed=99)
    assert seen == [(True, meta_built)]
    tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
    assert not any(t.is_meta for t in tensors) and {t.dtype for t in loaded.model.parameters()} == {torch.float32}
    x = torch.rand(2, 3, ref.input_size, ref.input_size)
    with torch.inference_mode():
        torch.testing.assert_close(ref.embed(x), loaded.embed(x))
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in create_encoder("test_vit2").model.state_dict().items()}, str(other))
    with pytest.raises(ValueError, match="other.safetensors: weights do not match"):
        create_encoder(arch, weights=str(other))


def test_registry_presets_and_errors():
    assert "resnet50_trunc" in list_encoders()
    enc = create_encoder("resnet50_trunc")
    with torch.inference_mode():
        out = enc.embed(torch.rand(1, 3, 224, 224))
    assert enc.embed_dim == 1024 and out.shape == (1, 1024)
    with pytest.raises(ValueError, match="unknown encoder"):
        create_encoder("definitely_not_a_model")
    vit = create_encoder("test_vit", input_size=128)  # ViTs are rebuilt for the patch size, not resized
    with torch.inference_mode():
        assert vit.embed(torch.rand(1, 3, 128, 128)).shape == (1, vit.embed_dim)


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="batchsize"):
        ex.resolve_settings({"batchsize": 3})


def test_sigkill_mid_slide_resumes_to_identical_bag(tmp_path):
    """A feature job killed with SIGKILL resumes from its last finished chunk; the bag equals an
    uninterrupted run bit for bit."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    slide = make_slide(tmp_path / "k.svs", width=4096, height=3072, mpp=0.5, seed=9, positive=True)["path"]
    with open_slide(slide) as s:
        grid = make_grid(s, np.ones((192, 256), bool), 16.0, {"patch_size": 64, "target_mpp": 0.8})
    gpath = tmp_path / "grid.json"
    gpath.write_text(json.dumps(grid))
    settings = json.dumps({"model": TEST_MODEL, "batch_size": 16, "chunk_rows": 16, "num_workers": 1,
                           "device": "cpu"})
    cmd = [sys.executable, "-m", "pipeline", "features", "--slide", str(slide), "--grid", str(gpath),
           "--settings", settings, "--threads", "1"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    subprocess.run(cmd + ["--out", str(ref)], check=True, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = partial_path(out) / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a few chunks are on disk
        try:
            if json.loads(progress.read_text())["rows_done"] >= 64:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial_path(out).is_dir()
    done = json.loads(progress.read_text())["rows_done"]
    assert 0 < done < len(grid["coords"]) and done % 16 == 0
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True)
    bag = read_bag(out)
    assert bag.attrs["provenance"]["resumed_from"] == done
    np.testing.assert_array_equal(bag.features, read_bag(ref).features)
    np.testing.assert_array_equal(bag.coords, read_bag(ref).coords)
