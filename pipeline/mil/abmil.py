"""Attention-based deep MIL (ABMIL), Ilse, Tomczak & Welling, ICML 2018.

Each instance (patch feature) ``x_k`` is embedded, ``h_k = Dropout(ReLU(W x_k + b))``; an attention network
scores it, ``s_k = w^T tanh(V h_k)`` (``abmil``, the paper's "attention") or
``s_k = w^T (tanh(V h_k) ⊙ sigmoid(U h_k))`` (``abmil_gated``, the paper's "gated attention"); the scores
are softmax-normalised over the bag, ``a_k = exp(s_k) / Σ_j exp(s_j)``; the bag embedding ``z = Σ_k a_k h_k``
goes through a linear classifier. Paper defaults: embedding size M = 500, attention size L = 128, no
dropout; Adam (betas 0.9, 0.999, L2 weight decay) with lr 5e-4 and weight decay 1e-4 at a constant learning
rate (the MNIST-bags settings). An empty bag (N = 0) gets the zero embedding (so its
logits are the classifier bias) and an empty attention vector.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model
from ._layers import GatedAttention, as_bag, embedding


#: Ilse et al.'s optimiser (MNIST-bags): Adam with L2 weight decay, betas (0.9, 0.999), constant learning rate.
ILSE_RECIPE = dict(lr=5e-4, weight_decay=1e-4, optimizer="adam", betas=(0.9, 0.999), schedule="constant")


class ABMIL(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 500, attn_dim: int = 128,
                 dropout: float = 0.0, gated: bool = False):
        super().__init__()
        self.in_dim, self.n_classes, self.hidden_dim = int(in_dim), int(n_classes), int(hidden_dim)
        self.gated = bool(gated)
        self.embed = embedding(self.in_dim, self.hidden_dim, dropout)
        self.attn = GatedAttention(self.hidden_dim, attn_dim, 1, gated=self.gated)
        self.classifier = nn.Linear(self.hidden_dim, self.n_classes)

    @property
    def attn_u(self):  # the gate (None for plain attention)
        return self.attn.u

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores ``(N,)`` for embedded instances ``h`` ``(N, hidden)``."""
        return self.attn(h).squeeze(-1)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        features = as_bag(features, self.in_dim, "ABMIL")
        h = self.embed(features)
        if h.shape[0] == 0:
            attention = h.new_zeros(0, dtype=torch.float32)
            z = h.new_zeros(self.hidden_dim)
        else:
            attention = torch.softmax(self.attention_scores(h).float(), dim=0)
            z = attention.to(h.dtype) @ h
        return {"logits": self.classifier(z), "attention": attention, "embedding": z}


@register_model(**ILSE_RECIPE)
def abmil(in_dim: int, n_classes: int, hidden_dim: int = 500, attn_dim: int = 128, dropout: float = 0.0) -> ABMIL:
    """ABMIL with the plain (tanh) attention (Ilse et al. 2018)."""
    return ABMIL(in_dim, n_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=False)


@register_model(**ILSE_RECIPE)
def abmil_gated(in_dim: int, n_classes: int, hidden_dim: int = 500, attn_dim: int = 128,
                dropout: float = 0.0) -> ABMIL:
    """ABMIL with gated attention (Ilse et al. 2018)."""
    return ABMIL(in_dim, n_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=True)


@register_model(**ILSE_RECIPE)
def abmil_plain(in_dim: int, n_classes: int, hidden_dim: int = 500, attn_dim: int = 128,
                dropout: float = 0.0) -> ABMIL:
    """Alias of ``abmil`` (plain tanh attention), kept for older configs and runs."""
    return ABMIL(in_dim, n_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=False)
