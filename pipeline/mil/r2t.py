"""R²T: the Re-embedded Regional Transformer of "Feature Re-Embedding: Towards Foundation Model-Level
Performance in Computational Pathology" (Tang et al., CVPR 2024), in front of any MIL model (``base``).

Instance features are projected, ``h = Dropout(ReLU(W x + b))`` (``dim``, 512), and re-embedded online by
two residual transformer steps before the aggregator ``base`` (built with ``in_dim = dim``) sees them:

1. **Regional multi-head self-attention (R-MSA)**, ``h ← h + R-MSA(LayerNorm(h))``: the bag is cut into
   regions of the patch grid and self-attention runs within each region only. The paper lays the instance
   sequence out as a square and cuts it into ``region_num × region_num`` regions; we cut the *real* patch
   grid: each patch's grid cell ``(g_x, g_y)`` comes from its coordinates (offset by the bag's minimum, divided
   by the grid step, the smallest positive spacing of the coordinates), the grid's ``n_x × n_y`` cells are
   split into ``region_num`` parts per side (regions of ``ceil(n_x / region_num) × ceil(n_y / region_num)``
   cells), and every patch belongs to the region of its cell. Without coordinates (in-memory data, or all
   coordinates equal) the paper's layout is used: instance ``i`` sits at cell ``(i mod L, i div L)`` of an
   ``L × L`` square,
   ``L = ceil(√N)``. The attention logits of each region pass through the *embedded position encoding
   generator* (EPEG): a depth-wise convolution with kernel ``(epeg_k, 1)`` per head over the attention
   matrix, added to it, before the softmax.
2. **Cross-region MSA (CR-MSA)**, ``h ← h + CR-MSA(LayerNorm(h))``: each region is summarised into
   ``crmsa_k`` representative tokens (softmax over the region's instances of ``h W_a``, ``W_a`` ``dim × k``),
   all regions' representatives attend to each other (multi-head self-attention), and each instance receives
   the updated representatives of its region, weighted by the softmax over the ``k`` of its ``h W_a`` row.

Defaults: ``dim`` 512, dropout 0.25 on the projection, 8 heads, ``region_num`` 8 (8 × 8 regions), EPEG
kernel 15, base ``abmil``; ``crmsa_k`` 3 representatives per region is our choice. Adam(W) lr 2e-4, weight
decay 1e-5. Outputs: the base's (its ``attention`` / ``instance_logits`` are over the bag's instances, in
their order). ``uses_coords``: yes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import call_model, create_model, register_model
from ._layers import as_bag


def grid_cells(coords: torch.Tensor | None, n: int, device=None) -> torch.Tensor:
    """Integer grid cell ``(n, 2)`` of every instance: from the coordinates, or the paper's square layout."""
    if coords is None or n == 0 or bool((coords == coords[:1]).all()):  # no (or degenerate) coordinates
        side = max(1, math.ceil(math.sqrt(max(n, 1))))
        i = torch.arange(n, device=device)
        return torch.stack([i % side, i // side], dim=1)
    c = coords.detach().to(torch.float64)
    if c.shape != (n, 2):
        raise ValueError(f"coords must have shape ({n}, 2), got {tuple(c.shape)}")
    c = c - c.min(dim=0).values
    cells = []
    for j in range(2):
        v = torch.unique(c[:, j])
        diffs = v[1:] - v[:-1]
        diffs = diffs[diffs > 1e-6]
        step = float(diffs.min()) if diffs.numel() else 1.0
        cells.append(torch.round(c[:, j] / step).to(torch.long))
    return torch.stack(cells, dim=1).to(device if device is not None else coords.device)


def region_ids(coords: torch.Tensor | None, n: int, region_num: int = 8, device=None) -> torch.Tensor:
    """Region index ``(n,)`` of every instance (module docstring), numbered 0.. in row-major region order."""
    cells = grid_cells(coords, n, device)
    if n == 0:
        return cells.new_zeros(0)
    extent = cells.max(dim=0).values + 1
    size = torch.clamp((extent + region_num - 1) // region_num, min=1)  # cells per region and side
    r = cells // size
    per_row = int((extent[0] + size[0] - 1) // size[0])
    rid = r[:, 1] * per_row + r[:, 0]
    return torch.unique(rid, return_inverse=True)[1]  # consecutive ids of the non-empty regions


def _pad_regions(rid: torch.Tensor):
    """Gather plan for a padded ``(R, P)`` layout of the regions: flat slot of every instance, ``R``, ``P``."""
    n = rid.shape[0]
    n_reg = int(rid.max()) + 1
    counts = torch.bincount(rid, minlength=n_reg)
    p = int(counts.max())
    order = torch.argsort(rid, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(rid)
    pos[order] = torch.arange(n, device=rid.device) - starts[rid[order]]
    return rid * p + pos, n_reg, p


def _regions(h: torch.Tensor, rid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instances ``h`` (N, dim) laid out per region: ``(x (R, P, dim) zero-padded, valid (R, P), slot (N,))``
    where ``slot`` is each instance's position in the flattened ``R × P`` layout."""
    n, dim = h.shape
    slot, n_reg, p = _pad_regions(rid)
    x = h.new_zeros(n_reg * p, dim).index_copy(0, slot, h).view(n_reg, p, dim)
    valid = torch.zeros(n_reg * p, dtype=torch.bool, device=h.device)
    valid[slot] = True
    return x, valid.view(n_reg, p), slot


class _MSA(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor):
        """``(..., T, dim)`` -> q, k, v ``(..., heads, T, d)``."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = x.shape[:-1] + (self.heads, self.d)
        return [t.reshape(shape).transpose(-3, -2) for t in (q, k, v)]

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        o = o.transpose(-3, -2)
        return self.proj(o.reshape(o.shape[:-2] + (self.heads * self.d,)))


class RegionalMSA(nn.Module):
    """R-MSA with EPEG (module docstring)."""

    def __init__(self, dim: int, heads: int, epeg_k: int = 15):
        super().__init__()
        self.msa = _MSA(dim, heads)
        self.epeg = nn.Conv2d(heads, heads, (int(epeg_k), 1), padding=(int(epeg_k) // 2, 0), groups=heads) \
            if int(epeg_k) > 0 else None

    def forward(self, h: torch.Tensor, rid: torch.Tensor) -> torch.Tensor:
        x, valid, slot = _regions(h, rid)
        n_reg, p, dim = x.shape
        q, k, v = self.msa.split(x)  # (R, H, P, d)
        logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.msa.d)  # (R, H, P, P)
        pair = valid[:, None, :, None] & valid[:, None, None, :]
        logits = logits.masked_fill(~pair, 0.0)
        if self.epeg is not None:
            logits = logits + self.epeg(logits)
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        att = torch.softmax(logits, dim=-1).masked_fill(~valid[:, None, :, None], 0.0)
        o = self.msa.merge(att.to(v.dtype) @ v)  # (R, P, dim)
        return o.reshape(n_reg * p, dim)[slot]


class CrossRegionMSA(nn.Module):
    """CR-MSA (module docstring): region representatives attend to each other, then are distributed back."""

    def __init__(self, dim: int, heads: int, k: int = 3):
        super().__init__()
        self.w_a = nn.Linear(dim, int(k), bias=False)
        self.msa = _MSA(dim, heads)

    def forward(self, h: torch.Tensor, rid: torch.Tensor) -> torch.Tensor:
        x, valid, slot = _regions(h, rid)
        n_reg, p, dim = x.shape
        s = self.w_a(x).float()  # (R, P, k)
        agg = torch.softmax(s.masked_fill(~valid[..., None], float("-inf")), dim=1)  # over the region's instances
        reps = agg.transpose(1, 2).to(x.dtype) @ x  # (R, k, dim)
        kk = reps.shape[1]
        q, kq, v = self.msa.split(reps.reshape(1, n_reg * kk, dim))  # one sequence of all representatives
        att = torch.softmax((q @ kq.transpose(-1, -2)).float() / math.sqrt(self.msa.d), dim=-1)
        reps = self.msa.merge(att.to(v.dtype) @ v).view(n_reg, kk, dim)
        dist = torch.softmax(s, dim=-1)  # (R, P, k): each instance over its region's representatives
        o = dist.to(reps.dtype) @ reps  # (R, P, dim)
        return o.reshape(n_reg * p, dim)[slot]


class R2T(nn.Module):
    uses_coords = True

    def __init__(self, in_dim: int, n_classes: int, base: str = "abmil", base_kwargs: dict[str, Any] | None = None,
                 dim: int = 512, heads: int = 8, region_num: int = 8, epeg_k: int = 15, crmsa_k: int = 3,
                 dropout: float = 0.25, task: str = "classification"):
        super().__init__()
        if base == "r2t":
            raise ValueError("r2t cannot wrap itself")
        if int(region_num) < 1:
            raise ValueError("region_num must be >= 1")
        self.in_dim, self.n_classes, self.dim = int(in_dim), int(n_classes), int(dim)
        self.region_num = int(region_num)
        self.proj = nn.Sequential(nn.Linear(self.in_dim, self.dim), nn.ReLU(), nn.Dropout(float(dropout)))
        self.norm1, self.norm2 = nn.LayerNorm(self.dim), nn.LayerNorm(self.dim)
        self.rmsa = RegionalMSA(self.dim, int(heads), epeg_k)
        self.crmsa = CrossRegionMSA(self.dim, int(heads), crmsa_k)
        self.base = create_model(base, self.dim, n_classes, task=task, **(base_kwargs or {}))
        self.uses_label = bool(getattr(self.base, "uses_label", False))
        if getattr(self.base, "uses_coords", False):
            raise ValueError(f"r2t: base {base!r} uses coordinates itself; wrap it the other way round")

    def reembed(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(features)
        if h.shape[0] == 0:
            return h
        rid = region_ids(coords, h.shape[0], self.region_num, h.device)
        h = h + self.rmsa(self.norm1(h), rid)
        return h + self.crmsa(self.norm2(h), rid)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None,
                label: torch.Tensor | int | None = None) -> dict[str, Any]:
        features = as_bag(features, self.in_dim, "R2T")
        return call_model(self.base, self.reembed(features, coords), label=label)


@register_model(lr=2e-4, weight_decay=1e-5)
def r2t(in_dim: int, n_classes: int, base: str = "abmil", base_kwargs: dict[str, Any] | None = None, dim: int = 512,
        heads: int = 8, region_num: int = 8, epeg_k: int = 15, crmsa_k: int = 3, dropout: float = 0.25, *,
        task: str = "classification") -> R2T:
    """R²T: regional + cross-region transformer re-embedding (regions of the patch grid) before ``base``."""
    return R2T(in_dim, n_classes, base=base, base_kwargs=base_kwargs, dim=dim, heads=heads, region_num=region_num,
               epeg_k=epeg_k, crmsa_k=crmsa_k, dropout=dropout, task=task)
