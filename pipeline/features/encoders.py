"""Encoder registry, timm style: ``create_encoder(name, **kw)``.

Any timm architecture name works (``resnet50``, ``vit_base_patch16_224``, ``test_vit`` ...): the model is
built with ``num_classes=0`` so it returns its pooled embedding. Named presets (configuration as data)
can be registered with :func:`register_encoder` for encoders that need specific kwargs, normalisation or
token pooling.

The embedding size is what the encoder returns, measured in one place: :func:`create_encoder` runs one
forward pass of a patch of ``input_size`` px on the meta device (shapes only: no memory, no compute) and
records the width (:func:`measure_embed_dim`). timm's ``num_features`` is not used: with
``num_classes=0`` several families (MobileNetV3/V4, GhostNet, HGNetV2, EfficientViT, ...) return their
pre-logits (``head_hidden_size``), which is wider. An encoder whose output is not one vector per patch
(a feature map, a token sequence, a detection or segmentation output) is refused when it is built.

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
    """A ready-to-run encoder: uint8 patches in, one embedding per patch out.

    ``embed_dim``: the width of :meth:`embed`'s output. A builder may leave it ``None`` (plain timm
    models) or declare the width it expects (presets: the model card's); :func:`create_encoder` measures
    it and refuses an encoder that returns anything else."""

    name: str
    model: nn.Module
    embed_dim: int | None
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


def load_checked(model: nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike,
                 what: str = "the architecture") -> dict[str, Any]:
    """Load the state dict ``sd`` (read from ``path``) into ``model`` strictly, with errors that name the
    file and ``what`` it was meant for. ``model`` may live on the meta device: the tensors are then
    assigned, cast to the model's dtypes. Returns ``{"source": "file:NAME", "sha256": ...}``."""
    from ..files import sha256_file

    path = Path(path)
    target = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    sd = {k: v.to(target[k].dtype) if k in target and v.is_floating_point() and v.dtype != target[k].dtype
          else v for k, v in sd.items()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False,
                                                    assign=any(t.is_meta for t in target.values()))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"{path}: weights do not match {what} "
                         f"({' '.join(x.strip() for x in first[1:3]) or first[0]})") from exc
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match {what} (missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]})")
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ValueError(f"{path}: {what}: tensors left uninitialised after loading: {empty[:5]}")
    return {"source": f"file:{path.name}", "sha256": sha256_file(path)}


def load_weights_file(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a local weights file into ``model`` strictly (classifier heads are ignored), see
    :func:`load_checked`."""
    sd = read_state_dict(path)
    head = ("fc.", "head.", "classifier.", "head_dist.")
    return load_checked(model, {k: v for k, v in sd.items() if not k.startswith(head)}, path)


def _checkpoint_complete(model: nn.Module) -> bool:
    """Whether a checkpoint can hold every tensor of ``model``: no buffer computed at construction and
    left out of state dicts (relative position indices, rotary tables, attention masks...)."""
    keys = set(model.state_dict())
    return all(name in keys for name, _ in model.named_buffers())


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

    def build(**extra: Any) -> nn.Module:
        torch.manual_seed(int(seed))  # random init must be identical in every job of a cohort
        try:
            return timm.create_model(arch, pretrained=bool(pretrained), **extra, **kw)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ValueError(f"unknown encoder {name!r}: not a registered preset ({list_encoders()}) "
                                 f"nor a timm architecture") from exc
            raise

    def make() -> nn.Module:
        if input_size and "img_size" not in kw:
            # Fixed-size architectures (ViTs, some hybrids) are built for the patch size, once (timm
            # resamples position embeddings of pretrained weights); patches are never resized, which would
            # change the µm/px. Architectures without an img_size argument (convolutional) take any size.
            try:
                return build(img_size=int(input_size))
            except TypeError:
                pass
        return build()

    model = None
    if weights:  # no random initialisation for tensors the file replaces (seconds for a ViT-L)
        with torch.device("meta"):
            model = make()
        if not _checkpoint_complete(model):
            model = None  # some tensors only construction computes: built for real, then loaded
    if model is None:
        model = make()
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
    return Encoder(  # embed_dim: measured by create_encoder (num_features is not what every family returns)
        name=name, model=model, embed_dim=None, input_size=int(size),
        mean=tuple(mean or cfg.get("mean") or IMAGENET_MEAN), std=tuple(std or cfg.get("std") or IMAGENET_STD),
        weights=info, precision=precision, pool=pool,
    )


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"shape {tuple(out.shape)} ({str(out.dtype).removeprefix('torch.')})"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} [{', '.join(_describe(o) for o in out[:4])}" \
               f"{', ...' if len(out) > 4 else ''}]"
    if isinstance(out, dict):
        return f"a dict with keys {list(out)[:6]}"
    return f"a {type(out).__name__}"


class _Probe(nn.Module):
    """``encoder.embed`` as a module, so that :func:`torch.func.functional_call` can swap its tensors."""

    def __init__(self, model: nn.Module, pool: Callable | None):
        super().__init__()
        self.model, self._pool = model, pool

    def forward(self, x: torch.Tensor) -> Any:
        return self._pool(self.model, x) if self._pool is not None else self.model(x)


def _meta_forward(model: nn.Module, pool: Callable | None, x: torch.Tensor) -> Any:
    """``pool(model, x)`` with every parameter and buffer replaced by a meta tensor of its shape and dtype:
    shapes are propagated, nothing is allocated or computed, the model itself is left as it is."""
    from torch.func import functional_call

    probe = _Probe(model, pool)
    tensors = {k: torch.empty_like(v, device="meta") for k, v in  # tied weights: named once, tied by torch
               [*probe.named_parameters(), *probe.named_buffers()]}
    return functional_call(probe, tensors, (x,), strict=False)


def measure_embed_dim(name: str, model: nn.Module, input_size: int,
                      pool: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> int:
    """The width D of what ``pool(model, x)`` (or ``model(x)``) returns for patches of ``input_size`` px.

    Runs one forward pass of a batch of two blank patches on the meta device (the model's own tensors
    are not touched, so this costs no memory whatever the model size). Where a model cannot run on the
    meta device (an operation without a meta kernel, data-dependent control flow), a model with real
    weights embeds one real blank patch instead; an empty (meta) model falls back to timm's
    ``head_hidden_size`` (the width of the pre-logits that ``num_classes=0`` returns), with a warning.

    Raises ``ValueError`` naming the model and what it returned when the output is not one float vector
    per patch, shape (B, D): a feature map (B, C, H, W), a token sequence (B, N, D), a tuple or dict
    (detection, segmentation, ``features_only`` models).
    """
    import warnings

    size = int(input_size)
    was_training = model.training
    model.eval()
    batch = 2
    try:
        with torch.no_grad():
            try:
                out = _meta_forward(model, pool, torch.zeros(batch, 3, size, size, device="meta"))
            except Exception as exc:  # noqa: BLE001 - no meta kernel / data-dependent: try for real
                first = next(iter(model.parameters()), None)
                if first is None or first.is_meta:
                    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
                    if not width:
                        raise ValueError(f"encoder {name!r}: cannot measure its embedding size on the meta "
                                         f"device ({type(exc).__name__}: {exc})") from exc
                    warnings.warn(f"encoder {name!r}: cannot run on the meta device ({type(exc).__name__}); "
                                  f"embedding size taken from the model's attributes ({int(width)})",
                                  stacklevel=3)
                    return int(width)
                batch = 1
                x = torch.zeros(batch, 3, size, size, device=first.device, dtype=torch.float32)
                out = _Probe(model, pool)(x)
    finally:
        model.train(was_training)
    if (not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch or out.shape[1] < 1
            or not out.is_floating_point()):
        raise ValueError(f"encoder {name!r} ({type(model).__name__}) returned {_describe(out)} for a batch of "
                         f"{batch} patches of {size} px: an encoder must return one float vector per patch, "
                         f"shape ({batch}, D). Feature maps, token sequences and detection or segmentation "
                         f"outputs are not embeddings (for a timm model keep its global pooling and "
                         f"num_classes=0, or register an encoder with a pool function)")
    return int(out.shape[1])


def create_encoder(name: str, weights: str | None = None, pretrained: bool = False, seed: int = 0,
                   **kwargs: Any) -> Encoder:
    """A registered preset by name, else any timm architecture by name.

    The encoder's ``embed_dim`` is measured here, for every encoder (:func:`measure_embed_dim`): the
    single source of the embedding size for extraction, the bag schema, failed bags and benchmarks. A
    builder that declared another width, or a model that does not return one vector per patch, is
    refused with a ``ValueError`` before any patch is read.
    """
    if name in _REGISTRY:
        enc = _REGISTRY[name](weights=weights, pretrained=pretrained, seed=seed, **kwargs)
    else:
        enc = timm_encoder(name, weights=weights, pretrained=pretrained, seed=seed, **kwargs)
    enc.model.eval()
    dim = measure_embed_dim(enc.name, enc.model, enc.input_size, enc.pool)
    if enc.embed_dim is not None and int(enc.embed_dim) != dim:
        raise ValueError(f"encoder {enc.name!r} declares embed_dim {enc.embed_dim} but returns {dim}-d "
                         f"embeddings for {enc.input_size} px patches")
    enc.embed_dim = dim
    return enc


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
    enc.embed_dim = 1024  # declared (the width of layer 3); create_encoder checks it against the output
    return enc
