"""Pooling baselines and the instance-level max model.

``mean`` / ``max`` (the "embedding-based" mean and max operators that Ilse et al. 2018 compare against,
after Wang et al. 2018's MI-Net): instances are embedded, ``h_k = Dropout(ReLU(W x_k + b))``, pooled over the
bag (element-wise mean or max) and classified by a linear layer. Each instance's exact share of the bag
logits is returned as ``instance_logits``: for the mean, ``classifier(h_k)`` (the bag logits are their
mean); for the max, ``W[:, d] * z_d`` summed over the dimensions ``d`` where instance ``k`` is the arg-max
(the bag logits are their sum plus the bias).

``instance_max`` (mi-Net, Wang et al. 2018; the "instance + max" baseline of Ilse et al.): an instance
classifier (mi-Net's fully connected layers 256-128-64, ReLU, dropout 0.5) scores every instance and the bag
score is the maximum over the instances. For binary
classification the instance classifier has a single output ``s_k`` and the bag logits are ``[0, max_k s_k]``:
a bag is positive exactly when some instance is, and no instance can argue for "negative", so the model
respects the standard MIL assumption (Dietterich et al. 1997; Raff & Holt 2023). With more classes, class 0
is the "nothing present" reference and the logit of every other class is the max of its instance logits.
For survival and regression every output is the max of the instance outputs. Defaults: ``mean`` / ``max``
as in Ilse et al. (hidden size 500, no dropout, lr 5e-4, weight decay 1e-4); ``instance_max`` as in Wang et
al. (layers 256-128-64, dropout 0.5, lr 5e-4, weight decay 5e-4); all three train with Ilse et al.'s optimiser
(Adam, betas 0.9 / 0.999, L2 weight decay, constant learning rate), as in their comparison.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import register_model
from .abmil import ILSE_RECIPE
from ._layers import as_bag, embedding, reference_logits

_EMPTY_SCORE = -30.0  # bag score of an empty bag under the MIL assumption ("nothing present")


class PoolMIL(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 500, dropout: float = 0.0,
                 pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', not {pool!r}")
        self.in_dim, self.n_classes, self.hidden_dim, self.pool = int(in_dim), int(n_classes), int(hidden_dim), pool
        self.embed = embedding(self.in_dim, self.hidden_dim, dropout)
        self.classifier = nn.Linear(self.hidden_dim, self.n_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor | None]:
        features = as_bag(features, self.in_dim, f"{self.pool} pooling")
        h = self.embed(features)
        n = h.shape[0]
        if n == 0:
            z = h.new_zeros(self.hidden_dim)
            inst = h.new_zeros(0, self.n_classes)
        elif self.pool == "mean":
            z = h.mean(dim=0)
            inst = self.classifier(h)
        else:
            z, arg = h.max(dim=0)
            owner = torch.nn.functional.one_hot(arg, n).T.to(h.dtype)  # (N, hidden): 1 where k is the arg-max
            inst = (owner * z) @ self.classifier.weight.T
        return {"logits": self.classifier(z), "attention": None, "instance_logits": inst, "embedding": z}


class InstanceMax(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, hidden_dims: Sequence[int] | int = (256, 128, 64),
                 dropout: float = 0.5, task: str = "classification"):
        super().__init__()
        self.in_dim, self.n_classes = int(in_dim), int(n_classes)
        self.reference = task == "classification"
        n_scores = self.n_classes - 1 if self.reference else self.n_classes
        dims = [int(hidden_dims)] if isinstance(hidden_dims, int) else [int(h) for h in hidden_dims]
        layers, prev = [], self.in_dim
        for h in dims:
            layers.append(embedding(prev, h, dropout))
            prev = h
        self.instance_classifier = nn.Sequential(*layers, nn.Linear(prev, n_scores))
        self.n_scores = n_scores

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor | None]:
        features = as_bag(features, self.in_dim, "instance_max")
        s = self.instance_classifier(features)  # (N, n_scores)
        if s.shape[0] == 0:
            bag = s.new_full((self.n_scores,), _EMPTY_SCORE if self.reference else 0.0)
        else:
            bag = s.max(dim=0).values
        if self.reference:
            return {"logits": reference_logits(bag), "attention": None, "instance_logits": reference_logits(s)}
        return {"logits": bag, "attention": None, "instance_logits": s}


@register_model(**ILSE_RECIPE)
def mean(in_dim: int, n_classes: int, hidden_dim: int = 500, dropout: float = 0.0) -> PoolMIL:
    """Embedding + mean pooling + linear classifier (baseline)."""
    return PoolMIL(in_dim, n_classes, hidden_dim=hidden_dim, dropout=dropout, pool="mean")


@register_model(name="max", **ILSE_RECIPE)
def max_(in_dim: int, n_classes: int, hidden_dim: int = 500, dropout: float = 0.0) -> PoolMIL:
    """Embedding + element-wise max pooling + linear classifier (baseline)."""
    return PoolMIL(in_dim, n_classes, hidden_dim=hidden_dim, dropout=dropout, pool="max")


@register_model(**{**ILSE_RECIPE, "weight_decay": 5e-4})
def instance_max(in_dim: int, n_classes: int, hidden_dims: Sequence[int] | int = (256, 128, 64),
                 dropout: float = 0.5, *, task: str = "classification") -> InstanceMax:
    """Instance classifier + max over instances (mi-Net); respects the standard MIL assumption."""
    return InstanceMax(in_dim, n_classes, hidden_dims=hidden_dims, dropout=dropout, task=task)
