"""The embedding size of every encoder is what it returns (issue 14), measured once when it is built.

timm's ``num_features`` is not the width that several families return with ``num_classes=0``
(MobileNetV3, GhostNet, HGNetV2 return their wider pre-logits), which made every slide fail in the
feature stage. Each family below is built with random weights through ``create_encoder`` at the
workflow's patch size and one real patch goes through the extraction path (``embed_batch``); models
that do not return one vector per patch are refused when built.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.features import create_encoder
from pipeline.features import encoders as E
from pipeline.features.extract import embed_batch
from pipeline.store import read_bag

PATCH = 224  # the workflow's default patch size (config.yaml grid.patch_size)

# One small architecture per timm family the project can meet: name -> (timm num_features, width returned).
# The first four are the families where the two differ (they failed before). mobilevitv2/fastvit (256 px)
# and the DINOv2 ViT (518 px) have a default input other than 224; coatnet is a conv/attention hybrid.
FAMILIES = {
    "mobilenetv3_small_100": (576, 1024),
    "mobilenetv3_large_100": (960, 1280),
    "ghostnet_100": (960, 1280),
    "hgnetv2_b0": (1024, 2048),
    "efficientnet_b0": (1280, 1280),
    "convnext_atto": (320, 320),
    "resnet18": (512, 512),
    "test_vit": (64, 64),
    "regnety_002": (368, 368),
    "levit_128s": (384, 384),
    "mobilevitv2_050": (256, 256),
    "fastvit_t8": (768, 768),
    "tiny_vit_5m_224": (320, 320),
    "efficientformer_l1": (448, 448),
    "vit_small_patch14_dinov2": (384, 384),
    "coatnet_nano_rw_224": (512, 512),
}
# More families, checked the same way only with WSIPIPE_TEST_ALL_ENCODERS=1 (about 15 s more CPU time;
# run it after a timm upgrade). The default list above costs about 17 s of CPU time on 2 cores.
MORE_FAMILIES = {
    "densenet121": (1024, 1024),
    "mobilenetv4_conv_small": (960, 1280),
    "efficientvit_b0": (128, 1280),
    "lcnet_050": (256, 1280),
    "efficientnet_b1": (1280, 1280),  # default input 240
    "maxvit_nano_rw_256": (512, 512),  # hybrid, default input 256, built for 224
    "swin_tiny_patch4_window7_224": (768, 768),
    "eva02_tiny_patch14_224": (192, 192),
    "vit_tiny_patch16_224": (192, 192),
}
ALL = os.environ.get("WSIPIPE_TEST_ALL_ENCODERS") == "1"


@pytest.fixture(scope="module")
def patch_u8():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, PATCH, PATCH, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", [*FAMILIES, *(pytest.param(n, marks=pytest.mark.skipif(
    not ALL, reason="set WSIPIPE_TEST_ALL_ENCODERS=1")) for n in MORE_FAMILIES)])
def test_recorded_width_is_what_the_encoder_returns(name, patch_u8):
    num_features, width = {**FAMILIES, **MORE_FAMILIES}[name]
    enc = create_encoder(name, input_size=PATCH)
    assert enc.input_size == PATCH and enc.weights == "random"
    assert int(enc.model.num_features) == num_features  # timm's attribute, for the record
    assert enc.embed_dim == width == int(enc.model.head_hidden_size)
    if hasattr(enc.model, "patch_embed") and hasattr(enc.model.patch_embed, "img_size"):
        assert tuple(enc.model.patch_embed.img_size) == (PATCH, PATCH)  # built for the patch, not resized
    with torch.inference_mode():
        out = embed_batch(enc, patch_u8, torch.device("cpu"))  # what extraction does, uint8 -> (B, D)
    assert out.shape == (1, enc.embed_dim) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_meta_build_gives_the_same_width():
    """The failed-bag writer builds the encoder on the meta device and reads ``embed_dim``."""
    with torch.device("meta"):
        enc = create_encoder("mobilenetv3_small_100")
    assert enc.embed_dim == 1024 and next(enc.model.parameters()).is_meta


def test_presets_declared_width_is_checked(monkeypatch):
    import dataclasses

    from pipeline.features import presets as P

    with torch.device("meta"):
        enc = create_encoder("resnet50_trunc")  # custom pool (layer 3 + average): declared and measured 1024
    assert enc.embed_dim == 1024
    assert create_encoder("h0_mini", device="meta").embed_dim == 1536  # cls+mean of a 768-wide ViT
    monkeypatch.setitem(P.PRESETS, "h0_mini", dataclasses.replace(P.PRESETS["h0_mini"], embed_dim=768))
    with pytest.raises(ValueError, match="'h0_mini' declares embed_dim 768 but returns 1536"):
        create_encoder("h0_mini", device="meta")


# -- refusals --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, shape", [
    ({"global_pool": ""}, "(2, 96, 7, 7)"),  # CNN feature map
    ({"features_only": True}, "a list of"),  # multi-scale feature pyramid (detection/segmentation backbone)
])
def test_non_vector_timm_outputs_are_refused(kwargs, shape):
    with pytest.raises(ValueError, match="one float vector per patch") as ei:
        create_encoder("test_resnet", input_size=PATCH, model_kwargs=kwargs)
    assert "'test_resnet'" in str(ei.value) and shape in str(ei.value)


def test_token_sequence_is_refused():
    with pytest.raises(ValueError, match=r"'test_vit'.*shape \(2, 197, 64\)"):
        create_encoder("test_vit", input_size=PATCH, model_kwargs={"global_pool": ""})


class _TinySeg(nn.Module):
    """A segmentation-style model: one class map per patch, (B, C, H, W)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class _Pooled(nn.Module):
    """Data-dependent control flow: cannot run on the meta device."""

    def __init__(self, width=12):
        super().__init__()
        self.proj = nn.Linear(3, width)
        self.num_features = width

    def forward(self, x):
        if float(x.abs().sum()) >= 0:  # .item()-like: no meta kernel
            return self.proj(x.mean(dim=(2, 3)))
        return self.proj(x.amax(dim=(2, 3)))


def _register(monkeypatch, name, module_fn, embed_dim=None):
    def build(weights=None, pretrained=False, seed=0, input_size=PATCH, **kw):
        return E.Encoder(name=name, model=module_fn(), embed_dim=embed_dim, input_size=input_size,
                         mean=E.IMAGENET_MEAN, std=E.IMAGENET_STD, weights="random")

    monkeypatch.setitem(E._REGISTRY, name, build)


def test_registered_segmentation_model_is_refused_before_any_patch(monkeypatch):
    _register(monkeypatch, "tiny_seg", _TinySeg)
    with pytest.raises(ValueError, match=r"'tiny_seg' \(_TinySeg\) returned shape \(2, 4, 224, 224\)"):
        create_encoder("tiny_seg")


def test_declared_width_must_match(monkeypatch):
    _register(monkeypatch, "liar", lambda: _Pooled(12), embed_dim=16)
    with pytest.raises(ValueError, match="declares embed_dim 16 but returns 12"):
        create_encoder("liar")


def test_model_that_cannot_run_on_meta_is_measured_for_real(monkeypatch):
    _register(monkeypatch, "pooled", _Pooled)
    enc = create_encoder("pooled")
    assert enc.embed_dim == 12 and not enc.model.training
    with torch.device("meta"), warnings.catch_warnings(record=True) as w:  # empty model: attribute fallback
        warnings.simplefilter("always")
        assert create_encoder("pooled").embed_dim == 12
    assert any("meta device" in str(x.message) for x in w)


# -- end to end with a previously failing model ----------------------------------------------------------

@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    from pipeline.grid import make_grid
    from pipeline.slide import open_slide
    from pipeline.synthetic import make_slide

    d = tmp_path_factory.mktemp("dims")
    path = make_slide(d / "s.svs", width=2048, height=1536, mpp=0.5, seed=3, positive=True)["path"]
    with open_slide(path) as s:
        grid = make_grid(s, np.ones((96, 128), bool), 16.0, {"patch_size": PATCH, "target_mpp": 1.5})
    gpath = d / "grid.json"
    gpath.write_text(json.dumps(grid))
    return str(path), grid, gpath


def test_feature_stage_with_mobilenetv3(small_slide, tmp_path):
    from pipeline.__main__ import main

    path, grid, gpath = small_slide
    settings = json.dumps({"model": "mobilenetv3_small_100", "batch_size": 4, "num_workers": 1, "device": "cpu"})
    out = tmp_path / "s.zarr"
    assert main(["features", "--slide", path, "--grid", str(gpath), "--out", str(out), "--settings", settings]) == 0
    bag = read_bag(out)
    assert bag.n == len(grid["coords"]) > 0
    assert bag.features.shape == (bag.n, 1024) and bag.attrs["feature_dim"] == 1024
    assert np.isfinite(np.asarray(bag.features, dtype=np.float32)).all()
    # a slide whose grid failed upstream gets a failed bag of the same width (built on the meta device)
    failed = tmp_path / "failed_grid.json"
    failed.write_text(json.dumps({"status": "failed", "stage": "grid", "error": "no tissue"}))
    fout = tmp_path / "f.zarr"
    assert main(["features", "--slide", path, "--grid", str(failed), "--out", str(fout), "--settings", settings]) == 0
    fbag = read_bag(fout)
    assert fbag.attrs["status"] == "failed" and fbag.features.shape == (0, 1024)


def test_bench_extract_with_mobilenetv3(small_slide, capsys):
    from pipeline.bench import main

    path, _, _ = small_slide
    assert main(["extract", "--slide", path, "--model", "mobilenetv3_small_100", "--target-mpp", "1.5",
                 "--size", str(PATCH), "--batch-size", "4", "--device", "cpu", "--workers", "1",
                 "--max-patches", "8", "--no-compare-model"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["mode"] == "extract" and 0 < r["patches"] <= 8 and r["patches_per_s"] > 0
