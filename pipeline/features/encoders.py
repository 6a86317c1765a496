"""Encoder registry, timm style: ``create_encoder(name, **kw)``.

Any timm architecture name works (``resnet50``, ``vit_base_patch16_224``, ``test_vit`` ...): the model is
built with ``num_classes=0`` so it returns its pooled embedding. Named presets (configuration as data)
can be registered with :func:`register_encoder` for encoders that need specific kwargs, normalisation or
token pooling.

Weights, in order: a local file (``weights=PATH``: safetensors or a torch checkpoint), the hub
(``pretrained=True``, needs network; timm/Hugging Face cache), or a seeded random init (tests and the
demo only; recorded as ``"random"`` in every bag).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .catalog import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class Encoder:
    """A ready-to-run encoder: uint8 patches in, one embedding per patch out."""

    name: str
    model: nn.Module
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: Any  # "random" or {"source": ..., "sha256": ...}
    precision: str = "bf16"  # autocast dtype on CUDA
    pool: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: normalised float (B, 3, H, W) -> (B, embed_dim)."""
        if self.pool is not None:
            return self.pool(self.model, x)
        out = self.model(x)
        if out.ndim != 2:
            raise RuntimeError(f"encoder {self.name} returned shape {tuple(out.shape)}, expected (B, D)")
        return out


_REGISTRY: dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    def deco(fn: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def state_dict_sha256(model: nn.Module) -> str:
    """A digest of the model's parameters and buffers (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch checkpoint (``state_dict``/``model``/``teacher``
    wrappers unwrapped, ``module.``/``backbone.`` prefixes removed). The format is sniffed, not taken
    from the suffix (hub cache blobs have none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file does not exist")
    with open(path, "rb") as fh:
        head = fh.read(10)
    is_zip_or_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if path.suffix == ".safetensors" or (not is_zip_or_pickle and len(head) >= 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "teacher"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}


def load_weights_file(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a local weights file into ``model`` strictly (classifier heads are ignored)."""
    from ..files import sha256_file

    path = Path(path)
    sd = read_state_dict(path)
    head = {k for k in sd if k.startswith(("fc.", "head.", "classifier.", "head_dist."))}
    missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if k not in head}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the architecture (missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]})")
    return {"source": f"file:{path.name}", "sha256": sha256_file(path)}


def timm_encoder(name: str, arch: str | None = None, weights: str | None = None, pretrained: bool = False,
                 seed: int = 0, model_kwargs: dict[str, Any] | None = None, input_size: int | None = None,
                 mean: tuple | None = None, std: tuple | None = None, precision: str = "bf16",
                 pool: Callable | None = None) -> Encoder:
    """Build an encoder from a timm architecture."""
    import timm

    arch = arch or name
    kw = {"num_classes": 0, **(model_kwargs or {})}
    if weights and pretrained:
        raise ValueError("set either features.weights (local file) or features.pretrained, not both")
    torch.manual_seed(int(seed))  # random init must be identical in every job of a cohort
    try:
        model = timm.create_model(arch, pretrained=bool(pretrained), **kw)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"unknown encoder {name!r}: not a registered preset ({list_encoders()}) "
                             f"nor a timm architecture") from exc
        raise
    default_size = int(((getattr(model, "pretrained_cfg", {}) or {}).get("input_size") or (3, 224, 224))[-1])
    if input_size and int(input_size) != default_size and "img_size" not in kw:
        # Fixed-size architectures (ViTs) are rebuilt for the patch size (timm resamples position
        # embeddings of pretrained weights); patches are never resized, which would change the µm/px.
        try:
            torch.manual_seed(int(seed))
            model = timm.create_model(arch, pretrained=bool(pretrained), img_size=int(input_size), **kw)
        except TypeError:
            pass  # convolutional: accepts any input size as it is
    if weights:
        info: Any = load_weights_file(model, weights)
    elif pretrained:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        src = cfg.get("hf_hub_id") or cfg.get("url") or arch
        info = {"source": f"timm:{src}", "sha256": state_dict_sha256(model)}
    else:
        info = "random"
    model.eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = input_size or int((cfg.get("input_size") or (3, 224, 224))[-1])
    return Encoder(
        name=name, model=model, embed_dim=int(model.num_features), input_size=int(size),
        mean=tuple(mean or cfg.get("mean") or IMAGENET_MEAN), std=tuple(std or cfg.get("std") or IMAGENET_STD),
        weights=info, precision=precision, pool=pool,
    )


def create_encoder(name: str, weights: str | None = None, pretrained: bool = False, seed: int = 0,
                   **kwargs: Any) -> Encoder:
    """A registered preset by name, else any timm architecture by name."""
    if name in _REGISTRY:
        return _REGISTRY[name](weights=weights, pretrained=pretrained, seed=seed, **kwargs)
    return timm_encoder(name, weights=weights, pretrained=pretrained, seed=seed, **kwargs)


def _resnet50_trunc_pool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = model
    x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
    x = m.layer3(m.layer2(m.layer1(x)))
    return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)


@register_encoder("resnet50_trunc")
def resnet50_trunc(weights: str | None = None, pretrained: bool = False, seed: int = 0, **kw: Any) -> Encoder:
    """ImageNet ResNet-50 truncated after layer 3, average-pooled: 1024-d (the CLAM baseline encoder)."""
    enc = timm_encoder("resnet50_trunc", arch="resnet50.tv_in1k", weights=weights, pretrained=pretrained,
                       seed=seed, pool=_resnet50_trunc_pool, **kw)
    enc.embed_dim = 1024
    return enc
