"""Work moved to the device: area resize (against OpenCV), bf16 weights, JPEG tiles made standalone and
decoded by torchvision and assembled into patches (on the CPU here; CUDA-only tests skip without CUDA)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from pipeline.features import create_encoder
from pipeline.features import device as dv
from pipeline.features import extract as ex
from pipeline.grid import make_grid
from pipeline.readers import ReadSpec, cut_patches
from pipeline.slide import open_slide
from pipeline.store import read_bag
from pipeline.synthetic import make_slide

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),  # small models: one thread is fastest on 2 shared cores
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    d = tmp_path_factory.mktemp("devsvs")
    return make_slide(d / "s.svs", width=2304, height=1792, mpp=0.25, seed=5, positive=True)["path"]


@pytest.mark.parametrize("src,dst", [(448, 224), (431, 224), (300, 224), (225, 224), (200, 224), (224, 224)])
def test_device_resize_matches_opencv(src, dst):
    rng = np.random.default_rng(src)
    imgs = np.stack([cv2.GaussianBlur(rng.integers(0, 255, (src, src, 3), dtype=np.uint8), (0, 0), 1)
                     for _ in range(3)])
    interp = cv2.INTER_AREA if src > dst else cv2.INTER_LINEAR
    ref = np.stack([cv2.resize(x, (dst, dst), interpolation=interp) for x in imgs]).astype(np.float32)
    got = dv.resize_area(torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), dst).permute(0, 2, 3, 1).numpy()
    assert got.shape == ref.shape
    # OpenCV rounds to uint8 (and uses fixed point for bilinear); the device result is the exact mean
    assert np.abs(got - ref).max() <= (0.5 + 1e-3 if src >= dst else 1.0)
    assert np.abs(got - ref).mean() < 0.3


def test_area_weights_are_an_average():
    w = dv.area_weights(431, 224)
    torch.testing.assert_close(w.sum(1), torch.ones(224, dtype=torch.float64))
    assert (w >= 0).all() and dv.resize_method(448, 224) == "device-avg_pool"
    assert dv.resize_method(431, 224) == "device-area" and dv.resize_method(200, 224) == "device-bilinear"


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_bf16_weights_keep_norms_fp32_and_agree(name):
    enc = create_encoder(name, input_size=64)
    x = torch.rand(4, 3, 64, 64)
    with torch.inference_mode():
        ref = enc.embed(x)
        assert dv.cast_weights(enc.model, torch.bfloat16) > 0
        assert dv.weights_dtype(enc.model) == "bf16"
        for m in enc.model.modules():
            want = torch.float32 if isinstance(m, dv._NORMS) else torch.bfloat16
            assert all(p.dtype == want for p in m.parameters(recurse=False))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = enc.embed(x.to(torch.bfloat16)).float()
    assert float(torch.nn.functional.cosine_similarity(ref, out).min()) > 0.999


@pytest.mark.parametrize("which", ["svs", "rgb"])
def test_tile_source_assembles_patches_like_the_cpu_reader(svs, abbreviated, which):
    """Tiles decoded by torchvision (CPU here, nvJPEG on CUDA) and assembled into patches equal the CPU
    readers' crops, including patches hanging over the level's edge (white)."""
    path = svs if which == "svs" else abbreviated["rgb"]
    with open_slide(path) as s:
        W, H = s.level_dimensions[0]
        r = 300
        xs, ys = np.meshgrid(np.arange(0, W, 260), np.arange(0, H, 260))
        org = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int32)
        batches = [(a, min(a + 5, len(org))) for a in range(0, len(org), 5)]
        src = dv.JpegTileSource(s.tiled_jpeg(), 0, org, batches, r, torch.device("cpu"))
        spec = ReadSpec(str(s.path), s.reader, float(s.mpp), 0, r, 224, resize=False)
        try:
            for i, (a, b) in enumerate(batches):
                got = src.get(i)
                assert got.dtype == torch.uint8 and tuple(got.shape) == (b - a, r, r, 3)
                ref = np.empty((b - a, r, r, 3), np.uint8)
                cut_patches(s, spec, org[a:b], ref)
                np.testing.assert_array_equal(got.numpy(), ref)
        finally:
            src.close()
        chk = dv.check_tile_decoder(s.tiled_jpeg(), 0, torch.device("cpu"))
        assert chk["ok"] and chk["max_abs_diff"] == 0


def test_device_resize_path_on_cpu_records_provenance(svs, tmp_path):
    """resize: device runs the device path on CPU tensors: features close to the CPU (cv2) path and the
    bag says which path made it; the CPU path is the default on CPU."""
    with open_slide(svs) as s:
        grid = make_grid(s, np.ones((112, 144), bool), 16.0, {"patch_size": 64, "target_mpp": 0.5})
    gpath = tmp_path / "grid.json"
    gpath.write_text(json.dumps(grid))
    base = {"model": "test_resnet", "batch_size": 16, "num_workers": 0, "device": "cpu"}
    with open_slide(svs) as s:
        a = ex.extract_slide(s, grid, gpath, tmp_path / "cpu.zarr", base)
        b = ex.extract_slide(s, grid, gpath, tmp_path / "dev.zarr", dict(base, resize="device"))
    assert (a["provenance"]["resize"], a["provenance"]["decoder"]) == ("cpu-cv2-inter_area", "tiled-jpeg-direct")
    assert b["provenance"]["resize"] == "device-avg_pool" and b["provenance"]["weights_dtype"] == "fp32"
    assert a["provenance"]["fingerprint"] != b["provenance"]["fingerprint"]
    fa = torch.from_numpy(read_bag(tmp_path / "cpu.zarr").features.astype(np.float32))
    fb = torch.from_numpy(read_bag(tmp_path / "dev.zarr").features.astype(np.float32))
    assert float(torch.nn.functional.cosine_similarity(fa, fb).min()) > 0.999


def test_gpu_decode_without_cuda_falls_back(svs, tmp_path):
    with open_slide(svs) as s:
        grid = make_grid(s, np.ones((112, 144), bool), 16.0, {"patch_size": 64, "target_mpp": 1.0})
    gpath = tmp_path / "grid.json"
    gpath.write_text(json.dumps(grid))
    with open_slide(svs) as s:
        a = ex.extract_slide(s, grid, gpath, tmp_path / "g.zarr", {"model": "test_resnet", "batch_size": 16,
                                                                   "num_workers": 0, "device": "cpu",
                                                                   "gpu_decode": True})
    g = a["provenance"]["gpu_decode"]
    assert g["requested"] and not g["used"] and "CUDA" in g["reason"]
    assert a["provenance"]["decoder"] == "tiled-jpeg-direct"
    with pytest.raises(ValueError, match="gpu_decode"):
        ex.resolve_settings({"gpu_decode": True, "resize": "cpu"})
    with pytest.raises(ValueError, match="resize"):
        ex.resolve_settings({"resize": "gpu"})


# ------------------------------------------------------------------------------------------------
# CUDA only
# ------------------------------------------------------------------------------------------------
@cuda
def test_cuda_nvjpeg_against_cpu_decoder(svs, abbreviated, capsys):
    """nvJPEG pixels against libjpeg-turbo: the difference is recorded (printed); colours must agree."""
    dev = torch.device("cuda")
    for name, path in (("svs", svs), ("aperio_rgb", abbreviated["rgb"]), ("aperio_ycbcr", abbreviated["ycbcr"])):
        with open_slide(path) as s:
            rec = dv.check_tile_decoder(s.tiled_jpeg(), 0, dev, n=5)
        print(f"nvjpeg vs cpu {name}: {json.dumps(rec)}")
        assert rec.get("error") is None or "differs" in rec["error"], rec
        if name != "aperio_rgb":  # nvJPEG may ignore the Adobe marker: then extraction falls back (recorded)
            assert rec["ok"], rec


@cuda
def test_cuda_extraction_paths_and_agreement(svs, tmp_path):
    with open_slide(svs) as s:
        grid = make_grid(s, np.ones((112, 144), bool), 16.0, {"patch_size": 64, "target_mpp": 0.5})
    gpath = tmp_path / "grid.json"
    gpath.write_text(json.dumps(grid))
    base = {"model": "test_resnet", "batch_size": 16, "num_workers": 2}
    with open_slide(svs) as s:
        cpu = ex.extract_slide(s, grid, gpath, tmp_path / "cpu.zarr", dict(base, device="cpu"))
        gpu = ex.extract_slide(s, grid, gpath, tmp_path / "gpu.zarr", dict(base, device="cuda"))
        nvj = ex.extract_slide(s, grid, gpath, tmp_path / "nvj.zarr", dict(base, device="cuda", gpu_decode=True))
    assert gpu["provenance"]["resize"] == "device-avg_pool" and gpu["provenance"]["weights_dtype"] == "bf16"
    assert nvj["provenance"]["decoder"] in ("nvjpeg", "tiled-jpeg-direct")
    assert nvj["provenance"]["gpu_decode"]["used"] == (nvj["provenance"]["decoder"] == "nvjpeg")
    f = {k: torch.from_numpy(read_bag(tmp_path / f"{k}.zarr").features.astype(np.float32)) for k in ("cpu", "gpu", "nvj")}
    for k in ("gpu", "nvj"):
        cos = float(torch.nn.functional.cosine_similarity(f["cpu"], f[k]).min())
        print(f"cosine cpu vs {k}: {cos:.6f}")
        assert cos > 0.99


@cuda
def test_cuda_pinned_shared_memory():
    from pipeline.readers import ReaderPool

    with ReaderPool(1, slot_bytes=1 << 20) as pool:
        assert pool.pin(dv.register_host_memory) and pool.pinned
        t = torch.from_numpy(pool._buf[: 1 << 20])
        assert t.is_pinned()
        t.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        del t
    assert not pool.pinned  # unregistered when the memory went



def test_encoder_warm_up_only_on_cuda(monkeypatch):
    """The job's encoder build runs one blank batch on CUDA (one-off costs paid while the readers read), never
    on the CPU, whose cores the readers are using; on CUDA the encoder comes back in its precision there."""
    calls = []
    real = ex.forward
    monkeypatch.setattr(ex, "forward", lambda enc, x, dev: calls.append((tuple(x.shape), dev.type)) or real(enc, x, dev))
    p = ex.resolve_settings({"model": "test_resnet", "batch_size": 4})
    enc = ex._load_encoder(p, 64, torch.device("cpu"))
    assert calls == [] and next(enc.model.parameters()).device.type == "cpu"
    if torch.cuda.is_available():
        enc = ex._load_encoder(p, 64, torch.device("cuda"))
        assert calls == [((4, 3, 64, 64), "cuda")]
        assert dv.weights_dtype(enc.model) == "bf16"
