"""Optimisers and learning-rate schedules of the MIL papers, selected by name (configuration as data).

* ``adam``: ``torch.optim.Adam`` with L2 weight decay (the gradient gets ``weight_decay * w``), as ABMIL,
  CLAM and DSMIL use it; ``betas`` as registered (DSMIL: (0.5, 0.9)).
* ``adamw``: ``torch.optim.AdamW``, decoupled weight decay (ACMIL).
* ``radam_lookahead``: Lookahead (Zhang et al., NeurIPS 2019; ``k = 6`` fast steps, slow-weight step
  ``alpha = 0.5``) around RAdam (Liu et al., ICLR 2020) with decoupled weight decay that spares biases and
  normalisation weights (every parameter with fewer than two dimensions): what TransMIL trained with
  (timm's ``lookahead_radam``).
* ``sgd``: SGD with momentum 0.9 and L2 weight decay.

Schedules: ``constant``, or ``cosine`` annealing from ``lr`` to ``min_lr`` over the epoch budget, stepped
once per epoch (:func:`set_epoch_lr`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from . import OPTIMIZERS, SCHEDULES, MILError

__all__ = ["Lookahead", "build_optimizer", "epoch_lr", "set_epoch_lr"]


class Lookahead:
    """Lookahead around an inner optimiser: every ``k`` inner steps the slow weights move ``alpha`` of the
    way towards the fast weights, and the fast weights restart from them.

    Exposes the inner optimiser's ``param_groups`` (so learning-rate changes reach it), ``zero_grad`` and
    ``step``.
    """

    def __init__(self, inner, k: int = 6, alpha: float = 0.5):
        if int(k) < 1:
            raise ValueError(f"Lookahead k must be >= 1 (got {k})")
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"Lookahead alpha must be in (0, 1] (got {alpha})")
        self.inner, self.k, self.alpha = inner, int(k), float(alpha)
        self.param_groups = inner.param_groups
        self._slow = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]
        self._count = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        import torch

        self.inner.step()
        self._count += 1
        if self._count % self.k:
            return
        with torch.no_grad():
            for group, slow in zip(self.param_groups, self._slow):
                for p, s in zip(group["params"], slow):
                    s.add_(p.detach() - s, alpha=self.alpha)
                    p.copy_(s)


def build_optimizer(params: Iterable[Any], name: str, lr: float, weight_decay: float,
                    betas: Sequence[float] | None = None):
    """The optimiser ``name`` (see the module docstring) over ``params`` (an iterable of parameters)."""
    import torch

    params = [p for p in params if p.requires_grad]
    kw: dict[str, Any] = {}
    if betas is not None:
        kw["betas"] = tuple(float(b) for b in betas)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kw)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)
    if name == "radam_lookahead":
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        inner = torch.optim.RAdam(groups, lr=lr, decoupled_weight_decay=True, **kw)
        return Lookahead(inner, k=6, alpha=0.5)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise MILError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


def epoch_lr(schedule: str, lr: float, epoch: int, epochs: int, min_lr: float = 0.0) -> float:
    """Learning rate of 1-based ``epoch`` out of ``epochs`` under ``schedule``."""
    if schedule == "constant":
        return float(lr)
    if schedule == "cosine":
        t = (int(epoch) - 1) / max(1, int(epochs))
        return float(min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t)))
    raise MILError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")


def set_epoch_lr(optimizer, schedule: str, lr: float, epoch: int, epochs: int, min_lr: float = 0.0) -> float:
    value = epoch_lr(schedule, lr, epoch, epochs, min_lr)
    for g in optimizer.param_groups:
        g["lr"] = value
    return value
