"""Named presets for the pathology foundation-model encoders, as data.

Each row of :data:`pipeline.features.catalog.PRESETS` (plain data, readable without torch) says how to build one encoder with timm (architecture + kwargs), what it
expects (native input size, normalisation), which tokens form the embedding (``pool``), the embedding
width, the default autocast precision on CUDA, and where its weights live on the Hugging Face hub.
Every preset registers through :func:`register_encoder`, so ``create_encoder(name, weights=...,
pretrained=..., seed=...)`` builds it exactly like any other encoder.

Weights, in order:

* ``weights=PATH``: a local file (safetensors or torch checkpoint), converted where the preset needs it
  (``phikon_v2`` ships Hugging Face ``transformers`` keys) and loaded strictly; recorded as
  ``{"source": "file:NAME", "sha256": <sha256 of the file>}``;
* ``pretrained=True``: the file is downloaded from the hub (``HF_TOKEN`` for gated repos, see
  :mod:`pipeline.features.weights`) and loaded as above; recorded as ``{"source": "hf:REPO/FILE", ...}``;
* neither: a seeded random init, recorded as ``"random"`` (tests and the demo only).

When weights are loaded the architecture is first built on the meta device (no random init of a
billion parameters, no second copy in memory) and the checkpoint tensors are assigned into it.
``device="meta"`` builds the empty architecture only: shapes and a meta forward, for tests.

See ``docs/encoders.md`` for the table, sources and what is uncertain.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .catalog import PRESETS, Preset
from .encoders import Encoder, load_checked, read_state_dict, register_encoder, timm_encoder
from .weights import download_weights

# -- token pooling ---------------------------------------------------------------------------------------

def pool_cls(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLS token of the final (normalised) token sequence: (B, D)."""
    return model.forward_features(x)[:, 0]


def pool_cls_mean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """concat(CLS, mean of the patch tokens) with register tokens excluded: (B, 2D)."""
    tokens = model.forward_features(x)
    return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(dim=1)], dim=-1)


def pool_module(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own forward returns the embedding (towers with a pooling head)."""
    return model(x)


POOLS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "cls": pool_cls, "cls+mean": pool_cls_mean, "attn_pool": pool_module,
}


class AttentionalPooler(nn.Module):
    """Cross-attention pooling (CoCa style): ``queries`` learned vectors attend over the trunk tokens.

    Parameter names follow the CONCH checkpoints (``query``, ``ln_q``, ``ln_k``, ``to_q``, ``to_kv``,
    ``to_out``); projections have no bias.
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 8, queries: int = 1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"pooler width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, N, context_dim) -> (B, queries, dim)."""
        b = x.shape[0]
        q = self.to_q(self.ln_q(self.query)).unsqueeze(0).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).reshape(b, q.shape[1], -1))


class AttnPoolTower(nn.Module):
    """A timm ViT trunk whose tokens (CLS included, after the final norm) go through an attentional pooler
    and a LayerNorm: the CONCH image tower without its image-text projection."""

    def __init__(self, trunk: nn.Module, dim: int, heads: int = 8, queries: int = 1):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(dim, int(trunk.num_features), heads=heads, queries=queries)
        self.ln_contrast = nn.LayerNorm(dim)
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


# -- checkpoints -----------------------------------------------------------------------------------------


def _resample_pos_embed(sd: dict[str, torch.Tensor], key: str, vit: nn.Module) -> None:
    """Resample a checkpoint's absolute position table to the model's patch grid (bicubic), in place."""
    if key not in sd or not hasattr(vit, "pos_embed") or vit.pos_embed is None:
        return
    have, want = sd[key], vit.pos_embed
    if tuple(have.shape) == tuple(want.shape):
        return
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 1))
    side = math.isqrt(have.shape[1] - prefix)
    if side * side != have.shape[1] - prefix or have.shape[-1] != want.shape[-1]:
        raise ValueError(f"position table {key} {tuple(have.shape)} cannot be resampled to {tuple(want.shape)}")
    sd[key] = resample_abs_pos_embed(have.float(), new_size=list(vit.patch_embed.grid_size),
                                     old_size=[side, side], num_prefix_tokens=prefix)


def convert_hf_dinov2(sd: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face ``transformers`` Dinov2Model keys -> timm VisionTransformer keys.

    q/k/v projections are concatenated into ``qkv`` (in that order), ``layer_scale{1,2}.lambda1`` become
    ``ls{1,2}.gamma``, ``mask_token`` (training only) is dropped, a ``dinov2.`` prefix and ``classifier.*``
    (Dinov2ForImageClassification) are removed. The position table is resampled to ``model``'s grid
    when given. Keys that are not recognised are passed through, so strict loading reports them.
    """
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items() if not k.startswith("classifier.")}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    block = {
        "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    }
    for k, v in sd.items():
        if k == "embeddings.mask_token":
            continue
        if k in simple:
            out[simple[k]] = v
            continue
        if k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            if rest.startswith("attention.attention."):
                which, kind = rest[len("attention.attention."):].split(".", 1)  # query|key|value, weight|bias
                if which in ("query", "key", "value"):
                    qkv.setdefault((i, kind), {})[which] = v
                    continue
            for src, dst in block.items():
                if rest == src or rest.startswith(src + "."):
                    out[f"blocks.{i}.{dst}{rest[len(src):]}"] = v
                    break
            else:
                out[k] = v
            continue
        out[k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {i}: incomplete attention {kind} (have {sorted(parts)})")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if model is not None:
        _resample_pos_embed(out, "pos_embed", model)
    return out


def convert_conch_v1_5(sd: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """CONCH v1.5 vision checkpoint: keep the trunk, the contrastive pooler and its LayerNorm (drop the
    captioning pooler and projections if present), resample the trunk position table to the model grid."""
    drop = ("attn_pool_caption.", "ln_caption.", "proj_contrast", "head.", "text.", "logit_scale")
    out = {k: v for k, v in sd.items() if not k.startswith(drop)}
    if model is not None and hasattr(model, "trunk"):
        _resample_pos_embed(out, "trunk.pos_embed", model.trunk)
    return out


def _convert_timm(sd: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    head = ("fc.", "head.", "classifier.", "head_dist.")
    out = {k: v for k, v in sd.items() if not k.startswith(head)}
    if model is not None:
        _resample_pos_embed(out, "pos_embed", model)
    return out


CONVERTERS: dict[str | None, Callable[..., dict[str, torch.Tensor]]] = {
    None: _convert_timm, "hf_dinov2": convert_hf_dinov2, "conch_v1_5": convert_conch_v1_5,
}


def load_preset_weights(model: nn.Module, path: str | os.PathLike, preset: Preset) -> dict[str, Any]:
    """Convert and load ``path`` into ``model`` strictly (``model`` may live on the meta device: the
    checkpoint tensors are assigned). Returns ``{"source": "file:NAME", "sha256": ...}``."""
    return load_checked(model, CONVERTERS[preset.convert](read_state_dict(path), model), path,
                        f"the {preset.name} architecture")


# -- building --------------------------------------------------------------------------------------------

def _timm_kwargs(preset: Preset, overrides: dict[str, Any] | None) -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    kw = {**preset.kwargs, **(overrides or {})}
    if kw.get("mlp_layer") == "swiglu_packed":
        kw["mlp_layer"] = SwiGLUPacked
    if kw.get("act_layer") == "silu":
        kw["act_layer"] = nn.SiLU
    return kw


def build_preset(name: str, weights: str | os.PathLike | None = None, pretrained: bool = False, seed: int = 0,
                 input_size: int | None = None, device: str | torch.device | None = None,
                 overrides: dict[str, Any] | None = None, precision: str | None = None,
                 cache_dir: str | os.PathLike | None = None) -> Encoder:
    """Build the preset ``name`` as an :class:`Encoder`.

    ``input_size``: the patch size extraction feeds (default: the card's). Patches are never resized; a
    ViT run at another size interpolates its position table on the fly (``dynamic_img_size``), which
    the model was not trained for, so a warning is issued.
    ``device="meta"``: the architecture without storage (shape checks); cannot be combined with weights.
    ``overrides``: timm kwargs replacing the card's (small test configs, variants); ``pool_dim`` and
    ``pool_heads`` size the attentional pooler. ``embed_dim`` is the card's, which :func:`create_encoder`
    checks against the built model's output; with overrides it is left to be measured (``None``).
    ``cache_dir``: hub cache for ``pretrained=True`` (default: the Hugging Face cache).
    """
    preset = PRESETS[name]
    if weights and pretrained:
        raise ValueError("set either features.weights (local file) or features.pretrained, not both")
    meta = device is not None and torch.device(device).type == "meta"
    if meta and (weights or pretrained):
        raise ValueError(f"{name}: device='meta' builds an empty architecture and cannot load weights")
    overrides = dict(overrides or {})
    declared = None if overrides else preset.embed_dim  # with overrides: whatever the model returns
    head = {**(preset.head or {})}
    head["dim"] = overrides.pop("pool_dim", head.get("dim"))
    head["heads"] = overrides.pop("pool_heads", head.get("heads"))
    kw = _timm_kwargs(preset, overrides)
    size = int(input_size or preset.input_size)
    if size != preset.input_size:
        warnings.warn(f"{name}: running at {size} px instead of the native {preset.input_size} px "
                      "(position embeddings interpolated on the fly)", stacklevel=2)
        kw["dynamic_img_size"] = True

    source = None
    if pretrained:
        path, repo, file = download_weights(name, cache_dir=cache_dir)
        weights, source = path, f"hf:{repo}/{file}"
    build_device = torch.device("meta") if (meta or weights) else torch.device(device or "cpu")
    with build_device:
        enc = timm_encoder(name, arch=preset.arch, seed=seed, model_kwargs=kw, input_size=size,
                           mean=preset.mean, std=preset.std, precision=precision or preset.precision,
                           pool=POOLS[preset.pool])
        if preset.pool == "attn_pool":
            enc.model = AttnPoolTower(enc.model, dim=int(head["dim"]), heads=int(head["heads"]),
                                      queries=int(head.get("queries") or 1))
    vit = getattr(enc.model, "trunk", enc.model)
    patch = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
    if patch is not None and size % int(patch[0]):
        raise ValueError(f"{name}: patches of {size} px are not a multiple of the ViT patch size {patch[0]}; "
                         f"use the native {preset.input_size} px (or another multiple of {patch[0]})")
    enc.embed_dim = declared  # the card's width: create_encoder measures the output and checks it
    if weights:
        info = load_preset_weights(enc.model, weights, preset)
        if source:
            info = {"source": source, "sha256": info["sha256"]}
        enc.weights = info
        if device is not None:
            enc.model.to(device)
    enc.model.eval()
    return enc


def _register(name: str) -> None:
    @register_encoder(name)
    def _build(weights: str | None = None, pretrained: bool = False, seed: int = 0, **kw: Any) -> Encoder:
        return build_preset(name, weights=weights, pretrained=pretrained, seed=seed, **kw)

    _build.__name__ = _build.__qualname__ = f"preset_{name}"
    _build.__doc__ = PRESETS[name].notes


for _name, _preset in PRESETS.items():
    if not _preset.builtin:
        _register(_name)
