"""Encoder presets: table vs model cards, meta-device builds of the giant ViTs, token pooling, the
phikon HF->timm key conversion, the CONCH v1.5 pooling head, and weight pinning (hub mocked, offline)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.features import create_encoder, list_encoders
from pipeline.features import presets as P
from pipeline.features import weights as W
from pipeline.files import sha256_file

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPT = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))

# name: (hub repo, embed_dim, input size, (mean, std), pool, params in millions from the cards/papers)
CARDS = {
    "uni": ("MahmoodLab/UNI", 1024, 224, IMAGENET, "cls", 303),
    "uni2_h": ("MahmoodLab/UNI2-h", 1536, 224, IMAGENET, "cls", 681),
    "conch_v1_5": ("MahmoodLab/conchv1_5", 768, 448, IMAGENET, "attn_pool", 307),
    "virchow2": ("paige-ai/Virchow2", 2560, 224, IMAGENET, "cls+mean", 632),
    "h_optimus_0": ("bioptimus/H-optimus-0", 1536, 224, HOPT, "cls", 1134),
    "h_optimus_1": ("bioptimus/H-optimus-1", 1536, 224, HOPT, "cls", 1134),
    "phikon_v2": ("owkin/phikon-v2", 1024, 224, IMAGENET, "cls", 303),
    "prov_gigapath": ("prov-gigapath/prov-gigapath", 1536, 224, IMAGENET, "cls", 1134),
    "h0_mini": ("bioptimus/H0-mini", 1536, 224, HOPT, "cls+mean", 86),
}
TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def test_every_preset_is_registered_and_documented():
    assert set(CARDS) | {"resnet50_trunc"} <= set(list_encoders())
    assert set(P.PRESETS) == set(CARDS) | {"resnet50_trunc"}
    for name, p in P.PRESETS.items():
        assert p.precision in ("bf16", "fp16", "fp32") and p.licence, name
        assert (p.hf_repo is None) == p.builtin, name


@pytest.mark.parametrize("name", sorted(CARDS))
def test_giant_presets_on_meta_device(name):
    repo, dim, size, (mean, std), pool, mparams = CARDS[name]
    p = P.PRESETS[name]
    assert (p.hf_repo, p.embed_dim, p.input_size, p.pool) == (repo, dim, size, pool)
    enc = create_encoder(name, device="meta")
    assert (enc.name, enc.embed_dim, enc.input_size, enc.weights) == (name, dim, size, "random")
    assert enc.mean == pytest.approx(mean) and enc.std == pytest.approx(std)
    assert enc.precision == p.precision
    n = sum(t.numel() for t in enc.model.parameters()) / 1e6
    assert n == pytest.approx(mparams, rel=0.02), f"{name}: {n:.1f}M parameters"
    out = enc.embed(torch.empty(2, 3, size, size, device="meta"))
    assert tuple(out.shape) == (2, dim) and out.is_meta


def test_meta_device_refuses_weights(tmp_path):
    with pytest.raises(ValueError, match="meta"):
        create_encoder("uni", weights=str(tmp_path / "x.bin"), device="meta")
    with pytest.raises(ValueError, match="either"):
        create_encoder("uni", weights="x", pretrained=True)


def test_non_native_input_size_interpolates_positions():
    with pytest.warns(UserWarning, match="native 224"):
        enc = create_encoder("virchow2", input_size=252, device="meta")
    assert enc.input_size == 252
    assert tuple(enc.embed(torch.empty(1, 3, 252, 252, device="meta")).shape) == (1, 2560)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="multiple of the ViT patch size 14"):
        create_encoder("h_optimus_0", input_size=256, device="meta")
    enc = create_encoder("uni", input_size=224, device="meta")  # what extraction passes: no warning
    assert enc.input_size == 224


def test_small_presets_for_real():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    for name, dim in (("resnet50_trunc", 1024), ("h0_mini", 1536)):
        enc = create_encoder(name, seed=3)
        assert enc.weights == "random" and enc.embed_dim == dim and not enc.model.training
        with torch.inference_mode():
            out = enc.embed(x)
        assert out.shape == (2, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
        if name == "h0_mini":
            again = create_encoder(name, seed=3)
            with torch.inference_mode():
                assert torch.equal(again.embed(x), out)  # seeded init: identical across jobs


def _tiny_vit(**kw):
    import timm

    return timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=1,
                             num_heads=2, num_classes=0, **kw).eval()


def test_cls_mean_pool_excludes_register_tokens():
    torch.manual_seed(0)
    m = _tiny_vit(reg_tokens=3, no_embed_class=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = m.forward_features(x)  # (B, 1 + 3 registers + 16 patches, 16)
        assert t.shape[1] == 20 and m.num_prefix_tokens == 4
        by_hand = torch.cat([t[:, 0], t[:, 4:].mean(1)], dim=-1)
        assert torch.allclose(P.pool_cls_mean(m, x), by_hand)
        assert not torch.allclose(P.pool_cls_mean(m, x), torch.cat([t[:, 0], t[:, 1:].mean(1)], -1))
        assert torch.equal(P.pool_cls(m, x), t[:, 0])


def test_attentional_pooler_is_multihead_cross_attention():
    torch.manual_seed(0)
    pool = P.AttentionalPooler(dim=8, context_dim=12, heads=2, queries=1)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        q = pool.to_q(pool.ln_q(pool.query))  # (1, 8)
        k, v = pool.to_kv(pool.ln_k(x)).chunk(2, dim=-1)  # (3, 5, 8)
        heads = []
        for h in range(2):
            s = slice(4 * h, 4 * h + 4)
            a = torch.softmax(torch.einsum("qd,bnd->bqn", q[:, s], k[..., s]) / math.sqrt(4), dim=-1)
            heads.append(torch.einsum("bqn,bnd->bqd", a, v[..., s]))
        by_hand = pool.to_out(torch.cat(heads, dim=-1))
        assert torch.allclose(pool(x), by_hand, atol=1e-6)


def _hf_dinov2_state_dict(hidden=16, layers=2, grid=2, patch=16, seed=0):
    """A synthetic transformers Dinov2Model state dict (no transformers needed)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "embeddings.cls_token": r(1, 1, hidden),
        "embeddings.mask_token": r(1, hidden),
        "embeddings.position_embeddings": r(1, 1 + grid * grid, hidden),
        "embeddings.patch_embeddings.projection.weight": r(hidden, 3, patch, patch),
        "embeddings.patch_embeddings.projection.bias": r(hidden),
        "layernorm.weight": r(hidden), "layernorm.bias": r(hidden),
    }
    for i in range(layers):
        pre = f"encoder.layer.{i}."
        for n in ("norm1", "norm2"):
            sd[pre + n + ".weight"], sd[pre + n + ".bias"] = r(hidden), r(hidden)
        for n in ("query", "key", "value"):
            sd[pre + f"attention.attention.{n}.weight"] = r(hidden, hidden)
            sd[pre + f"attention.attention.{n}.bias"] = r(hidden)
        sd[pre + "attention.output.dense.weight"], sd[pre + "attention.output.dense.bias"] = r(hidden, hidden), r(hidden)
        sd[pre + "layer_scale1.lambda1"], sd[pre + "layer_scale2.lambda1"] = r(hidden), r(hidden)
        sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = r(4 * hidden, hidden), r(4 * hidden)
        sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"] = r(hidden, 4 * hidden), r(hidden)
    return sd


def test_phikon_hf_to_timm_key_conversion():
    import timm

    hf = _hf_dinov2_state_dict(hidden=16, layers=2, grid=2)
    model = timm.create_model("vit_large_patch16_224", img_size=32, patch_size=16, embed_dim=16, depth=2,
                              num_heads=2, init_values=1e-5, num_classes=0)
    sd = P.convert_hf_dinov2({f"dinov2.{k}": v for k, v in hf.items()}, model)
    model.load_state_dict(sd, strict=True)  # every timm key covered, nothing left over
    assert "embeddings.mask_token" not in sd and not any(k.startswith("encoder.") for k in sd)
    b = model.blocks[1]
    pre = "encoder.layer.1.attention.attention."
    assert torch.equal(b.attn.qkv.weight[:16], hf[pre + "query.weight"])
    assert torch.equal(b.attn.qkv.weight[16:32], hf[pre + "key.weight"])
    assert torch.equal(b.attn.qkv.bias[32:], hf[pre + "value.bias"])
    assert torch.equal(b.ls2.gamma, hf["encoder.layer.1.layer_scale2.lambda1"])
    assert torch.equal(b.attn.proj.weight, hf["encoder.layer.1.attention.output.dense.weight"])
    assert torch.equal(model.norm.weight, hf["layernorm.weight"])
    assert torch.equal(model.pos_embed, hf["embeddings.position_embeddings"])
    assert torch.equal(model.cls_token, hf["embeddings.cls_token"])
    # a position table at another grid (HF configs often keep 518 px) is resampled to the model's
    hf4 = _hf_dinov2_state_dict(hidden=16, layers=2, grid=4)
    assert P.convert_hf_dinov2(hf4, model)["pos_embed"].shape == model.pos_embed.shape
    # an incomplete attention block is an error, not a silent partial load
    bad = dict(hf)
    del bad["encoder.layer.0.attention.attention.key.bias"]
    with pytest.raises(ValueError, match="incomplete"):
        P.convert_hf_dinov2(bad)


def test_phikon_preset_loads_a_transformers_file(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "model.safetensors"
    hf = _hf_dinov2_state_dict(hidden=32, layers=1, grid=14)
    save_file(hf, str(f))
    enc = create_encoder("phikon_v2", weights=str(f), overrides=TINY)
    assert enc.weights == {"source": "file:model.safetensors", "sha256": sha256_file(f)}
    assert enc.embed_dim == 32 and enc.mean == IMAGENET[0]
    assert torch.equal(enc.model.blocks[0].attn.qkv.weight[32:64], hf["encoder.layer.0.attention.attention.key.weight"])
    with torch.inference_mode():
        out = enc.embed(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 32) and torch.isfinite(out).all()


def test_conch_v1_5_tower_loads_and_pools(tmp_path):
    from timm.layers import resample_abs_pos_embed

    small = {**TINY, "pool_dim": 16, "pool_heads": 2}
    ref = create_encoder("conch_v1_5", overrides=small, seed=1)
    sd = {k: v.clone() for k, v in ref.model.state_dict().items()}
    sd["trunk.pos_embed"] = sd["trunk.pos_embed"][:, :197].clone()  # a 224-px (14x14) table in the file
    sd["attn_pool_caption.query"] = torch.zeros(256, 16)  # captioning pooler: not part of the embedding
    f = tmp_path / "pytorch_model_vision.bin"
    torch.save(sd, f)
    enc = create_encoder("conch_v1_5", weights=str(f), overrides=small)
    assert enc.embed_dim == 16 and enc.input_size == 448 and enc.weights["sha256"] == sha256_file(f)
    assert torch.equal(enc.model.attn_pool_contrast.to_kv.weight, ref.model.attn_pool_contrast.to_kv.weight)
    want = resample_abs_pos_embed(sd["trunk.pos_embed"], new_size=[28, 28], old_size=[14, 14])
    assert torch.allclose(enc.model.trunk.pos_embed, want)
    x = torch.randn(1, 3, 448, 448)
    with torch.inference_mode():
        m = enc.model
        by_hand = m.ln_contrast(m.attn_pool_contrast(m.trunk.forward_features(x))[:, 0])
        assert torch.allclose(enc.embed(x), by_hand) and by_hand.shape == (1, 16)


def test_mismatched_weights_name_the_preset(tmp_path):
    import timm
    from safetensors.torch import save_file

    m = timm.create_model("vit_large_patch16_224", img_size=224, num_classes=0, **TINY)  # no LayerScale
    f = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(f))
    with pytest.raises(ValueError, match="uni architecture"):
        create_encoder("uni", weights=str(f), overrides=TINY)


def _tiny_h0_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    kw = P._timm_kwargs(P.PRESETS["h0_mini"], TINY)
    m = timm.create_model(P.PRESETS["h0_mini"].arch, num_classes=0, **kw)
    f = tmp_path / "src" / "pytorch_model.bin"
    f.parent.mkdir(parents=True, exist_ok=True)
    save_file(m.state_dict(), str(f))  # safetensors bytes under a .bin name: the format is sniffed
    return f


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    state = {"file": _tiny_h0_file(tmp_path), "raise": None}

    def fake(repo_id, filename, token=None, **kw):
        calls.append((repo_id, filename, token))
        if state["raise"] is not None:
            raise state["raise"]
        return str(state["file"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    state["calls"] = calls
    return state


def test_pretrained_downloads_with_token_and_records_hub_source(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    enc = create_encoder("h0_mini", pretrained=True, overrides=TINY)
    assert fake_hub["calls"] == [("bioptimus/H0-mini", "pytorch_model.bin", "hf_test")]
    assert enc.weights == {"source": "hf:bioptimus/H0-mini/pytorch_model.bin",
                           "sha256": sha256_file(fake_hub["file"])}
    assert enc.embed_dim == 64  # concat(CLS, mean patch) of a 32-wide test config


def _http_error(cls, status, msg):
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - depends on the huggingface_hub release
        import httpx
    req = httpx.Request("GET", "https://huggingface.co/x")
    return cls(msg, response=httpx.Response(status, request=req))


def test_download_errors_name_the_repo_and_the_token(fake_hub, monkeypatch):
    from huggingface_hub import errors

    monkeypatch.delenv("HF_TOKEN", raising=False)
    fake_hub["raise"] = _http_error(errors.GatedRepoError, 403, "Access to model is restricted")
    with pytest.raises(W.WeightsError) as ei:
        create_encoder("uni", pretrained=True)
    msg = str(ei.value)
    assert "hf:MahmoodLab/UNI" in msg and "HF_TOKEN" in msg and "licence" in msg and "\n" not in msg
    fake_hub["raise"] = OSError("Network is unreachable")
    with pytest.raises(W.WeightsError, match="prov-gigapath/prov-gigapath.*Network is unreachable"):
        W.download_weights("prov_gigapath")


def test_missing_file_falls_back_to_the_next_name(fake_hub):
    from huggingface_hub import errors

    seen = []

    def fake(repo_id, filename, token=None, **kw):
        seen.append(filename)
        if filename == "pytorch_model.bin":
            raise _http_error(errors.RemoteEntryNotFoundError, 404, "Entry not found")
        return str(fake_hub["file"])

    import huggingface_hub

    huggingface_hub.hf_hub_download = fake  # restored by the fixture's monkeypatch
    path, repo, file = W.download_weights("virchow2")
    assert (repo, file, seen) == ("paige-ai/Virchow2", "model.safetensors", ["pytorch_model.bin", "model.safetensors"])


def test_prefetch_writes_an_idempotent_lock(fake_hub, tmp_path):
    cache = tmp_path / "weights"
    rec = W.prefetch("h0_mini", cache)
    lock = json.loads((cache / "h0_mini.lock.json").read_text())
    sha = sha256_file(fake_hub["file"])
    assert lock == rec
    assert {k: lock[k] for k in ("name", "repo", "file", "sha256")} == {
        "name": "h0_mini", "repo": "bioptimus/H0-mini", "file": "pytorch_model.bin", "sha256": sha}
    assert lock["weights"] == {"source": "hf:bioptimus/H0-mini/pytorch_model.bin", "sha256": sha}
    assert W.resolve_locked("h0_mini", cache) == lock["path"]
    assert W.resolve_locked("h0_mini", cache, verify=True) == lock["path"]
    assert W.prefetch("h0_mini", cache) == rec and len(fake_hub["calls"]) == 1  # verified, not re-downloaded
    enc = create_encoder("h0_mini", weights=W.resolve_locked("h0_mini", cache), overrides=TINY)
    assert enc.weights["sha256"] == sha
    fake_hub["file"].write_bytes(b"tampered")  # the pinned bytes changed: refuse
    with pytest.raises(W.WeightsError, match="pins"):
        W.prefetch("h0_mini", cache)
    assert W.resolve_locked("uni", cache) is None


def test_prefetch_cli(fake_hub, tmp_path, capsys):
    cache = tmp_path / "c"
    assert W.main(["prefetch", "--model", "h0_mini", "--cache-dir", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["repo"] == "bioptimus/H0-mini"
    assert W.main(["prefetch", "--model", "resnet50_trunc", "--cache-dir", str(cache)]) == 0
    lock = json.loads((cache / "resnet50_trunc.lock.json").read_text())
    assert lock["path"] is None and lock["weights"].startswith("timm:")
    assert W.main(["prefetch", "--model", "test_vit", "--cache-dir", str(cache), "--no-pretrained"]) == 0
    assert json.loads((cache / "test_vit.lock.json").read_text())["weights"] == "random"
    assert W.prefetch("vit_giant_patch14_224", cache)["weights"] == "random"  # timm has no weights for it
    capsys.readouterr()
    fake_hub["raise"] = OSError("connection refused")
    assert W.main(["prefetch", "--model", "uni2_h", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MahmoodLab/UNI2-h" in err and "connection refused" in err
    assert not (cache / "uni2_h.lock.json").exists()
    assert W.main(["prefetch", "--model", "no_such_model", "--cache-dir", str(cache)]) == 2
    assert "unknown encoder" in capsys.readouterr().err
