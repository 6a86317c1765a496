"""Hopfield pooling: Ramsauer et al., "Hopfield Networks is All You Need", ICLR 2021.

The modern (continuous) Hopfield network stores patterns ``Y`` and retrieves with the update rule
``ξ_new = Yᵀ softmax(β Y ξ)``; as a layer, ``Z = softmax(β Q Kᵀ) V`` with ``K = Y W_K`` and ``V = Y W_K W_V``
(the paper's eq. for the Hopfield layer: the values are projections of the keys). *Hopfield pooling* makes the
state (query) pattern ``Q`` a learned parameter, so the layer pools a set of stored patterns (here: the
instances of a bag) into a fixed-size vector, which is how the paper's multiple-instance-learning experiments
use it. ``β`` is the inverse temperature; the paper's default is ``β = 1/√d_k``.

Model: instances are embedded, ``y_k = LayerNorm(Dropout(ReLU(W x_k + b)))`` (the layer normalises the
stored patterns), each of ``heads`` heads has a learned state pattern ``ξ_h`` (``d_k`` each, ``d_k =
hidden / heads``), ``update_steps`` Hopfield updates are applied to the state pattern in key space
(``ξ ← Kᵀ softmax(β K ξ)``; one step, the default, is plain attention with the learned query), and the
retrieved ``z_h = softmax(β K_h ξ_h)ᵀ V_h`` of all heads are concatenated, projected (``W_O``) and classified
by a linear layer. ``attention``: the mean over the heads of ``softmax(β K_h ξ_h)``;
``attention_branches``: every head's.

Defaults: β = 1/√d_k (the paper's), one update step, 8 heads, hidden size 256, dropout 0; the embedding
size, head count and optimiser (AdamW lr 1e-3, weight decay 1e-4) are our choices: the paper tuned them per
data set by grid search rather than fixing them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import register_model
from ._layers import as_bag, embedding


class HopfieldPooling(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, heads: int = 8,
                 beta: float | None = None, update_steps: int = 1, dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.n_classes, self.hidden_dim = int(in_dim), int(n_classes), int(hidden_dim)
        self.heads = int(heads)
        if self.heads < 1 or self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be a positive multiple of heads ({heads})")
        if int(update_steps) < 1:
            raise ValueError("update_steps must be >= 1")
        self.d_k = self.hidden_dim // self.heads
        self.beta = float(beta) if beta is not None else 1.0 / math.sqrt(self.d_k)
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (got {beta})")
        self.update_steps = int(update_steps)
        self.embed = embedding(self.in_dim, self.hidden_dim, dropout)
        self.norm = nn.LayerNorm(self.hidden_dim)
        self.w_k = nn.Linear(self.hidden_dim, self.hidden_dim, bias=False)
        self.w_v = nn.Linear(self.hidden_dim, self.hidden_dim, bias=False)  # V = K W_V
        self.query = nn.Parameter(torch.randn(self.heads, self.d_k) / math.sqrt(self.d_k))  # state patterns ξ
        self.w_o = nn.Linear(self.hidden_dim, self.hidden_dim)
        self.classifier = nn.Linear(self.hidden_dim, self.n_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        features = as_bag(features, self.in_dim, "HopfieldPooling")
        y = self.norm(self.embed(features))
        n = y.shape[0]
        if n == 0:
            z = self.w_o(y.new_zeros(self.hidden_dim))
            return {"logits": self.classifier(z), "attention": y.new_zeros(0, dtype=torch.float32)}
        k = self.w_k(y)  # (N, hidden)
        v = self.w_v(k).view(n, self.heads, self.d_k).transpose(0, 1)  # (H, N, d_k)
        kh = k.view(n, self.heads, self.d_k).transpose(0, 1).float()  # (H, N, d_k)
        xi = self.query.float()  # (H, d_k)
        for _ in range(self.update_steps - 1):  # extra Hopfield updates of the state pattern
            p = torch.softmax(self.beta * torch.einsum("hnd,hd->hn", kh, xi), dim=-1)
            xi = torch.einsum("hn,hnd->hd", p, kh)
        a = torch.softmax(self.beta * torch.einsum("hnd,hd->hn", kh, xi), dim=-1)  # (H, N)
        z = torch.einsum("hn,hnd->hd", a.to(v.dtype), v).reshape(self.hidden_dim)
        z = self.w_o(z)
        return {"logits": self.classifier(z), "attention": a.mean(dim=0), "attention_branches": a,
                "embedding": z}


@register_model(lr=1e-3, weight_decay=1e-4)
def hopfield(in_dim: int, n_classes: int, hidden_dim: int = 256, heads: int = 8, beta: float | None = None,
             update_steps: int = 1, dropout: float = 0.0) -> HopfieldPooling:
    """Hopfield pooling: learned state pattern queries the instances, softmax(β q Kᵀ) V (Ramsauer et al. 2021)."""
    return HopfieldPooling(in_dim, n_classes, hidden_dim=hidden_dim, heads=heads, beta=beta,
                           update_steps=update_steps, dropout=dropout)
