"""Attention-based deep MIL (ABMIL), Ilse, Tomczak & Welling, ICML 2018.

Each instance (patch feature) ``x_k`` is embedded, ``h_k = Dropout(ReLU(W x_k + b))``; an attention network
scores it, ``s_k = w^T (tanh(V h_k) ⊙ sigmoid(U h_k))`` (gated) or ``w^T tanh(V h_k)`` (plain); the scores
are softmax-normalised over the bag, ``a_k = exp(s_k) / Σ_j exp(s_j)``; the bag embedding ``z = Σ_k a_k h_k``
goes through a linear classifier. An empty bag (N = 0) gets the zero embedding (so its logits are the
classifier bias) and an empty attention vector.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model


class ABMIL(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, attn_dim: int = 128,
                 dropout: float = 0.25, gated: bool = True):
        super().__init__()
        self.in_dim, self.n_classes, self.hidden_dim = int(in_dim), int(n_classes), int(hidden_dim)
        self.gated = bool(gated)
        self.embed = nn.Sequential(nn.Linear(self.in_dim, self.hidden_dim), nn.ReLU(), nn.Dropout(float(dropout)))
        self.attn_v = nn.Linear(self.hidden_dim, int(attn_dim))
        self.attn_u = nn.Linear(self.hidden_dim, int(attn_dim)) if self.gated else None
        self.attn_w = nn.Linear(int(attn_dim), 1, bias=False)  # a bias would cancel in the softmax
        self.classifier = nn.Linear(self.hidden_dim, self.n_classes)

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores ``(N,)`` for embedded instances ``h`` ``(N, hidden)``."""
        a = torch.tanh(self.attn_v(h))
        if self.attn_u is not None:
            a = a * torch.sigmoid(self.attn_u(h))
        return self.attn_w(a).squeeze(-1)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        if features.dim() == 3 and features.shape[0] == 1:  # tolerate a (1, N, D) batch of one bag
            features = features[0]
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"ABMIL expects features of shape (N, {self.in_dim}), got {tuple(features.shape)}")
        h = self.embed(features)
        if h.shape[0] == 0:
            attention = h.new_zeros(0, dtype=torch.float32)
            z = h.new_zeros(self.hidden_dim)
        else:
            attention = torch.softmax(self.attention_scores(h).float(), dim=0)
            z = attention.to(h.dtype) @ h
        return {"logits": self.classifier(z), "attention": attention, "embedding": z}


@register_model
def abmil(in_dim: int, n_classes: int, hidden_dim: int = 256, attn_dim: int = 128, dropout: float = 0.25) -> ABMIL:
    """ABMIL with gated attention (the default MIL model)."""
    return ABMIL(in_dim, n_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=True)


@register_model
def abmil_plain(in_dim: int, n_classes: int, hidden_dim: int = 256, attn_dim: int = 128,
                dropout: float = 0.25) -> ABMIL:
    """ABMIL with the plain (non-gated, tanh) attention."""
    return ABMIL(in_dim, n_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=False)
