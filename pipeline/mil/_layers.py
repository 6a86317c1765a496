"""Small building blocks shared by the MIL models."""

from __future__ import annotations

import torch
from torch import nn


def as_bag(features: torch.Tensor, in_dim: int, name: str) -> torch.Tensor:
    """Validate one bag ``(N, D)`` (a ``(1, N, D)`` batch of one bag is accepted and squeezed)."""
    if features.dim() == 3 and features.shape[0] == 1:
        features = features[0]
    if features.dim() != 2 or features.shape[1] != in_dim:
        raise ValueError(f"{name} expects features of shape (N, {in_dim}), got {tuple(features.shape)}")
    return features


def embedding(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """The instance embedding ``Dropout(ReLU(W x + b))`` used by most models."""
    return nn.Sequential(nn.Linear(int(in_dim), int(hidden_dim)), nn.ReLU(), nn.Dropout(float(dropout)))


class GatedAttention(nn.Module):
    """Attention scores ``w^T (tanh(V h) ⊙ sigmoid(U h))`` (gated) or ``w^T tanh(V h)``, ``n_out`` maps.

    Returns unnormalised scores ``(N, n_out)``; callers softmax them over the instances.
    """

    def __init__(self, dim: int, attn_dim: int, n_out: int = 1, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.v = nn.Linear(int(dim), int(attn_dim))
        self.u = nn.Linear(int(dim), int(attn_dim)) if gated else None
        self.drop = nn.Dropout(float(dropout))
        self.w = nn.Linear(int(attn_dim), int(n_out), bias=False)  # a bias would cancel in the softmax

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.drop(torch.tanh(self.v(h)))
        if self.u is not None:
            a = a * self.drop(torch.sigmoid(self.u(h)))
        return self.w(a)


def reference_logits(scores: torch.Tensor) -> torch.Tensor:
    """Prepend a constant 0 logit (class 0 = "nothing present") to scores ``(..., C-1)``."""
    zero = scores.new_zeros(*scores.shape[:-1], 1)
    return torch.cat([zero, scores], dim=-1)
