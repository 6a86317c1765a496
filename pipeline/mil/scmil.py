"""SC-MIL: supervised contrastive MIL for imbalanced classification (Juyal et al., WACV 2024), on ABMIL.

An attention MIL model (ABMIL, Ilse et al. 2018: ``h_k = ReLU(W x_k)``, gated attention, ``z = Σ a_k h_k``)
gives each bag an embedding ``z``; a projection head ``g`` (``Linear-ReLU-Linear``, L2-normalised output)
maps it to ``p = g(z) / ‖g(z)‖`` for a *supervised contrastive* loss over the bags of each mini-batch
(Khosla et al. 2020, the ``L_out`` form): for every anchor ``i`` with at least one other bag of its class,

    L_SC(i) = -1/|P(i)| Σ_{p ∈ P(i)} log( exp(p_i·p_p / τ) / Σ_{a ≠ i} exp(p_i·p_a / τ) ),

averaged over those anchors. The linear classifier on ``z`` is trained with cross-entropy. SC-MIL trains both
jointly and moves step by step from representation learning to classifier learning:

    L = α(t) · L_SC + (1 - α(t)) · L_CE,    t = step / total steps,

with ``α`` falling from 1 to 0 (``schedule``): ``parabolic`` ``α = 1 - t²`` (the cumulative-learning
schedule of BBN that SC-MIL builds on; default), ``linear`` ``α = 1 - t``, ``cosine`` ``α = (1 + cos πt)/2``,
or ``constant`` (``α = alpha``). The trainer calls ``set_progress(step, total)`` before each step; the
contrastive term comes through the ``batch_loss`` hook, the weighted cross-entropy through ``loss_logits``.
The loss needs several bags per optimiser step: the registered default mini-batch is 16 bags.

Defaults: ABMIL (gated attention) with hidden size 512 and attention size 128, projection 128-d, τ = 0.1,
parabolic schedule, AdamW lr 2e-4, weight decay 1e-4, 16 bags per step (the temperature, sizes and
optimiser are our choices). Classification only. ``attention``: the ABMIL attention.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import MILError, register_model
from .abmil import ABMIL

SCHEDULES = ("parabolic", "linear", "cosine", "constant")


def sc_weight(progress: float, schedule: str = "parabolic", alpha: float = 1.0) -> float:
    """The contrastive weight ``α`` at training progress ``t`` in [0, 1] (module docstring)."""
    t = min(1.0, max(0.0, float(progress)))
    if schedule == "parabolic":
        return 1.0 - t * t
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "constant":
        return float(alpha)
    raise ValueError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")


def supcon_loss(p: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor | None:
    """Supervised contrastive loss (``L_out``) of L2-normalised embeddings ``p`` ``(B, d)``; None when no bag
    has a positive partner."""
    b = p.shape[0]
    if b < 2:
        return None
    sim = (p @ p.T).float() / float(temperature)
    eye = torch.eye(b, dtype=torch.bool, device=p.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return None
    per = -(log_prob.masked_fill(~pos, 0.0).sum(dim=1)[has] / n_pos[has])
    return per.mean()


class SCMIL(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 512, attn_dim: int = 128,
                 dropout: float = 0.0, proj_dim: int = 128, temperature: float = 0.1, schedule: str = "parabolic",
                 alpha: float = 1.0, task: str = "classification"):
        super().__init__()
        if task != "classification":
            raise MILError(f"scmil is a classification model (supervised contrastive over classes); task {task!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
        self.in_dim, self.n_classes = int(in_dim), int(n_classes)
        self.net = ABMIL(in_dim, n_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, gated=True)
        self.head = nn.Sequential(nn.Linear(int(hidden_dim), int(hidden_dim)), nn.ReLU(),
                                  nn.Linear(int(hidden_dim), int(proj_dim)))
        self.temperature, self.schedule, self.alpha0 = float(temperature), schedule, float(alpha)
        self.alpha = sc_weight(0.0, schedule, alpha)

    def set_progress(self, step: int, total: int) -> None:
        self.alpha = sc_weight(step / max(1, total), self.schedule, self.alpha0)

    def forward(self, features: torch.Tensor) -> dict[str, Any]:
        out = dict(self.net(features))
        out["projection"] = F.normalize(self.head(out["embedding"]).float(), dim=-1)
        if self.training:
            out["loss_logits"] = [(out["logits"], 1.0 - self.alpha)]
        return out

    def batch_loss(self, outs: Sequence[dict[str, Any]], labels: torch.Tensor) -> torch.Tensor | None:
        if self.alpha <= 0:
            return None
        loss = supcon_loss(torch.stack([o["projection"] for o in outs]), labels, self.temperature)
        return None if loss is None else self.alpha * loss


@register_model(lr=2e-4, weight_decay=1e-4, batch_size=16)
def scmil(in_dim: int, n_classes: int, hidden_dim: int = 512, attn_dim: int = 128, dropout: float = 0.0,
          proj_dim: int = 128, temperature: float = 0.1, schedule: str = "parabolic", alpha: float = 1.0, *,
          task: str = "classification") -> SCMIL:
    """SC-MIL: ABMIL + supervised contrastive loss on bag embeddings, weight moving to cross-entropy (Juyal et al.)."""
    return SCMIL(in_dim, n_classes, hidden_dim=hidden_dim, attn_dim=attn_dim, dropout=dropout, proj_dim=proj_dim,
                 temperature=temperature, schedule=schedule, alpha=alpha, task=task)
