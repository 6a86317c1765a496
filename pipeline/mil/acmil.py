"""ACMIL: attention-challenging MIL, Zhang et al., ECCV 2024.

Instances are embedded, ``h_k = Dropout(ReLU(W x_k + b))`` (512-d), and a gated attention network produces
``M`` attention maps (multiple-branch attention, MBA). Each branch ``m`` softmax-normalises its scores over
the bag, pools ``z_m = Σ_k a_mk h_k`` and has its own linear classifier; a diversity loss, the mean pairwise
cosine similarity between the branches' attention maps, pushes the branches to attend to different
instances. The bag prediction comes from a separate classifier on ``z = Σ_k ā_k h_k`` with ``ā`` the mean
of the branches' attention maps.

Stochastic top-K instance masking (STKIM, training only): in every branch, each of the ``n_masked``
instances with the highest attention score is masked (removed from that branch's softmax) with
probability ``mask_prob``, so the model cannot rely on a few dominant instances.

Loss: ``L(bag) + mean_m L(branch m) + div_weight * L_div``. Defaults (the paper's): 5 branches,
``n_masked=10``, ``mask_prob=0.6``, hidden 512, attention 128, dropout 0; AdamW lr 1e-4, weight decay 1e-4.
``attention``: the mean attention map ``ā``; ``attention_branches``: all ``M`` maps.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import register_model
from ._layers import GatedAttention, as_bag, embedding


class ACMIL(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 512, attn_dim: int = 128,
                 dropout: float = 0.0, n_branches: int = 5, n_masked: int = 10, mask_prob: float = 0.6,
                 div_weight: float = 1.0):
        super().__init__()
        self.in_dim, self.n_classes, self.hidden_dim = int(in_dim), int(n_classes), int(hidden_dim)
        self.n_branches, self.n_masked, self.mask_prob = int(n_branches), int(n_masked), float(mask_prob)
        self.div_weight = float(div_weight)
        if self.n_branches < 1:
            raise ValueError("n_branches must be >= 1")
        self.embed = embedding(self.in_dim, self.hidden_dim, dropout)
        self.attn = GatedAttention(self.hidden_dim, attn_dim, self.n_branches, gated=True)
        self.branch_classifiers = nn.ModuleList(nn.Linear(self.hidden_dim, self.n_classes)
                                                for _ in range(self.n_branches))
        self.classifier = nn.Linear(self.hidden_dim, self.n_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor | None]:
        features = as_bag(features, self.in_dim, "ACMIL")
        h = self.embed(features)
        n = h.shape[0]
        if n == 0:
            z = h.new_zeros(self.hidden_dim)
            return {"logits": self.classifier(z), "attention": h.new_zeros(0, dtype=torch.float32)}
        S = self.attn(h).float().T  # (M, N)
        if self.training and self.n_masked > 0 and self.mask_prob > 0 and n > self.n_masked:
            top = torch.topk(S.detach(), self.n_masked, dim=1).indices  # (M, K)
            drop = torch.rand(top.shape, device=S.device) < self.mask_prob
            mask = torch.zeros_like(S, dtype=torch.bool).scatter(1, top, drop)
            S = S.masked_fill(mask, float("-inf"))
        A = torch.softmax(S, dim=1)  # (M, N)
        Z = A.to(h.dtype) @ h  # (M, hidden)
        branch_logits = [clf(Z[m]) for m, clf in enumerate(self.branch_classifiers)]
        a = A.mean(dim=0)
        logits = self.classifier(a.to(h.dtype) @ h)
        out: dict[str, torch.Tensor | None] = {
            "logits": logits, "attention": a, "attention_branches": A,
            "loss_logits": [(logits, 1.0)] + [(bl, 1.0 / self.n_branches) for bl in branch_logits]}
        if self.n_branches > 1 and self.div_weight > 0:
            An = F.normalize(A, dim=1)
            sim = An @ An.T
            off = sim.sum() - sim.diagonal().sum()
            out["aux_loss"] = self.div_weight * off / (self.n_branches * (self.n_branches - 1))
        return out


@register_model(lr=1e-4, weight_decay=1e-4)
def acmil(in_dim: int, n_classes: int, hidden_dim: int = 512, attn_dim: int = 128, dropout: float = 0.0,
          n_branches: int = 5, n_masked: int = 10, mask_prob: float = 0.6, div_weight: float = 1.0) -> ACMIL:
    """ACMIL: multiple-branch attention + stochastic top-K instance masking (Zhang et al. 2024)."""
    return ACMIL(in_dim, n_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout,
                 n_branches=n_branches, n_masked=n_masked, mask_prob=mask_prob, div_weight=div_weight)
