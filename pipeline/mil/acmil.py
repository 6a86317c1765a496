"""ACMIL: attention-challenging MIL, Zhang et al., ECCV 2024.

Instances are embedded without a bias, ``h_k = Dropout(ReLU(W x_k))``, to a hidden size that follows the
feature size as in the paper's configurations (128 for 384-d features, 256 for 512-d, 384 for 768-d; half
the feature size otherwise), and a gated attention network (attention size 128) produces ``M`` attention
maps (multiple-branch attention, MBA). Each branch ``m`` softmax-normalises its scores over the bag, pools
``z_m = Σ_k a_mk h_k`` and has its own linear classifier; a diversity loss, the mean pairwise cosine
similarity between the branches' attention maps, pushes the branches to attend to different instances.
The bag prediction comes from a separate classifier on ``z = Σ_k ā_k h_k`` with ``ā`` the mean of the
branches' attention maps.

Stochastic top-K instance masking (STKIM, training only): in every branch, of the ``K' = min(n_masked, N)``
instances with the highest attention score exactly ``floor(K' * mask_ratio)``, drawn at random, are masked
(removed from that branch's softmax), so the model cannot rely on a few dominant instances (paper: 6 of the
top 10).

Loss: ``L(bag) + mean_m L(branch m) + div_weight * L_div``. Defaults (the paper's): 5 branches,
``n_masked=10``, ``mask_ratio=0.6``, attention 128, dropout 0; AdamW lr 1e-4, weight decay 1e-5, cosine
schedule, 100 epochs, the checkpoint with the best validation AUC + F1 (no early stopping).
``attention``: the mean attention map ``ā``; ``attention_branches``: all ``M`` maps.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import register_model
from ._layers import GatedAttention, as_bag

#: Hidden size of the paper's configurations by feature size (ResNet-18 512-d, ViT-S 384-d, ViT-B 768-d).
PAPER_HIDDEN = {384: 128, 512: 256, 768: 384}


def hidden_for(in_dim: int) -> int:
    """ACMIL's hidden size for ``in_dim``-dimensional features (the paper's table, else ``in_dim // 2``)."""
    return PAPER_HIDDEN.get(int(in_dim), max(1, int(in_dim) // 2))


class ACMIL(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int | None = None, attn_dim: int = 128,
                 dropout: float = 0.0, n_branches: int = 5, n_masked: int = 10, mask_ratio: float = 0.6,
                 div_weight: float = 1.0):
        super().__init__()
        self.in_dim, self.n_classes = int(in_dim), int(n_classes)
        self.hidden_dim = int(hidden_dim) if hidden_dim else hidden_for(self.in_dim)
        self.n_branches, self.n_masked, self.mask_ratio = int(n_branches), int(n_masked), float(mask_ratio)
        self.div_weight = float(div_weight)
        if self.n_branches < 1:
            raise ValueError("n_branches must be >= 1")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1) (got {mask_ratio})")
        self.embed = nn.Sequential(nn.Linear(self.in_dim, self.hidden_dim, bias=False), nn.ReLU(),
                                   nn.Dropout(float(dropout)))
        self.attn = GatedAttention(self.hidden_dim, attn_dim, self.n_branches, gated=True)
        self.branch_classifiers = nn.ModuleList(nn.Linear(self.hidden_dim, self.n_classes)
                                                for _ in range(self.n_branches))
        self.classifier = nn.Linear(self.hidden_dim, self.n_classes)

    def masked_count(self, n: int) -> tuple[int, int]:
        """``(K', masked)``: the top instances considered and how many of them are masked, for a bag of ``n``."""
        k = min(self.n_masked, int(n))
        return k, int(k * self.mask_ratio)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor | None]:
        features = as_bag(features, self.in_dim, "ACMIL")
        h = self.embed(features)
        n = h.shape[0]
        if n == 0:
            z = h.new_zeros(self.hidden_dim)
            return {"logits": self.classifier(z), "attention": h.new_zeros(0, dtype=torch.float32)}
        S = self.attn(h).float().T  # (M, N)
        k, n_drop = self.masked_count(n)
        if self.training and n_drop > 0:
            top = torch.topk(S.detach(), k, dim=1).indices  # (M, K')
            pick = torch.argsort(torch.rand(top.shape, device=S.device), dim=1)[:, :n_drop]  # random n_drop of K'
            drop = torch.gather(top, 1, pick)
            mask = torch.zeros_like(S, dtype=torch.bool).scatter(1, drop, True)
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


@register_model(lr=1e-4, weight_decay=1e-5, optimizer="adamw", schedule="cosine", epochs=100, patience=0,
                select="auc_f1")
def acmil(in_dim: int, n_classes: int, hidden_dim: int | None = None, attn_dim: int = 128, dropout: float = 0.0,
          n_branches: int = 5, n_masked: int = 10, mask_ratio: float = 0.6, div_weight: float = 1.0) -> ACMIL:
    """ACMIL: multiple-branch attention + stochastic top-K instance masking (Zhang et al. 2024)."""
    return ACMIL(in_dim, n_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout,
                 n_branches=n_branches, n_masked=n_masked, mask_ratio=mask_ratio, div_weight=div_weight)
