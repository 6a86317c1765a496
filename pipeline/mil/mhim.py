"""MHIM-MIL: masked hard instance mining (Tang et al., ICCV 2023; extended version, Tang et al. 2025,
"Multiple Instance Learning Framework with Masked Hard Instance Mining for Gigapixel Histopathology Image
Analysis"), as a wrapper around any attention model (``base``).

A Siamese teacher-student pair of the same MIL model. The *teacher* (a copy of the student whose weights
follow the student's by an exponential moving average, ``θ_t ← m θ_t + (1 - m) θ_s`` after every optimiser
step; never trained by gradients) sees the whole bag and scores every instance by its attention. The most
salient instances are masked: the ``floor(mask_ratio_high · N)`` instances with the highest score (and, if
``mask_ratio_low > 0``, the ``floor(mask_ratio_low · N)`` with the lowest), then ``floor(mask_ratio_random · M)``
of the ``M`` remaining instances are dropped at random (the large random masking of the extended version,
which makes the mined hard instances diverse). The *student* is trained on what is left, the hard
instances, with the task loss plus a consistency loss to the teacher's view of the full bag:
``consistency_weight · H(softmax(z_t / τ), softmax(z_s / τ))`` (cross-entropy between the teacher's and the
student's bag embedding, or bag logits for a base without an ``embedding`` output), returned as
``aux_loss``. At inference the student (``infer_with="student"``, default) or the teacher sees every
instance and no masking happens.

Options of the extended version:

* ``class_aware=True``: the instance score is the *class-aware instance probability*
  ``a_k · softmax(ℓ_k)[y]``, the teacher's attention times its instance classifier's probability of the bag's
  class ``y`` (the label during training), instead of the attention alone. It needs a base that outputs
  ``instance_logits`` (e.g. ``clam_sb``, ``clam_mb``, ``dsmil``); other bases are refused;
* ``recycle_tokens=K > 0``: the *global recycle network* (GRN): ``K`` learned global queries attend (one
  softmax cross-attention) over the masked instances and produce ``K`` recycled tokens in the input feature
  space, appended to the student's input, so that key features removed by masking are not lost entirely.
  Not available with bases that use patch coordinates (the tokens have no position).

Paper facts kept: EMA momentum 0.9999, the teacher only scores (no gradient), the student is the trained
model, masking only during training. Our choices (documented in docs/mil.md): the masking counts are
floors (bags too small for one masked instance are not masked), the default ratios (high 0.01, random 0.5,
low 0), consistency weight 0.1 and temperature 1, the reading of the class-aware probability and of the GRN
above. During training ``attention`` is the student's attention scattered back over the full bag (0 on
masked instances); at inference it is the model's own attention.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import call_model, create_model, register_model
from ._layers import as_bag


class GlobalRecycleNetwork(nn.Module):
    """``K`` learned global queries cross-attend over the masked instances -> ``K`` recycled tokens."""

    def __init__(self, in_dim: int, n_tokens: int, dim: int = 128):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(int(n_tokens), int(dim)) / math.sqrt(dim))
        self.k = nn.Linear(in_dim, dim, bias=False)
        self.v = nn.Linear(in_dim, dim, bias=False)
        self.out = nn.Linear(dim, in_dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, masked: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.scale * self.queries @ self.k(masked).T, dim=-1)  # (K, M)
        return self.out(a @ self.v(masked))


class MHIM(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, base: str = "abmil", base_kwargs: dict[str, Any] | None = None,
                 mask_ratio_high: float = 0.01, mask_ratio_random: float = 0.5, mask_ratio_low: float = 0.0,
                 momentum: float = 0.9999, consistency_weight: float = 0.1, temperature: float = 1.0,
                 class_aware: bool = False, recycle_tokens: int = 0, infer_with: str = "student",
                 task: str = "classification"):
        super().__init__()
        if base in ("mhim",):
            raise ValueError("mhim cannot wrap itself")
        for name, r in (("mask_ratio_high", mask_ratio_high), ("mask_ratio_random", mask_ratio_random),
                        ("mask_ratio_low", mask_ratio_low)):
            if not 0.0 <= float(r) < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (got {r})")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (got {momentum})")
        if infer_with not in ("student", "teacher"):
            raise ValueError(f"infer_with must be 'student' or 'teacher' (got {infer_with!r})")
        self.in_dim, self.n_classes = int(in_dim), int(n_classes)
        self.r_high, self.r_random, self.r_low = float(mask_ratio_high), float(mask_ratio_random), float(mask_ratio_low)
        self.momentum, self.cons_w, self.tau = float(momentum), float(consistency_weight), float(temperature)
        self.class_aware, self.infer_with = bool(class_aware), infer_with
        self.student = create_model(base, in_dim, n_classes, task=task, **(base_kwargs or {}))
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.uses_coords = bool(getattr(self.student, "uses_coords", False))
        self.uses_label = bool(getattr(self.student, "uses_label", False)) or self.class_aware
        self.classification = task == "classification"
        with torch.no_grad():
            probe = call_model(self.teacher.eval(), torch.zeros(3, self.in_dim))
        if probe.get("attention") is None:
            raise ValueError(f"mhim needs an attention model as base; {base!r} has no attention")
        if self.class_aware and probe.get("instance_logits") is None:
            raise ValueError(f"mhim class_aware needs a base with instance_logits (e.g. clam_sb, dsmil); "
                             f"{base!r} has none")
        if int(recycle_tokens) > 0 and self.uses_coords:
            raise ValueError("mhim recycle_tokens (global recycle network) cannot be used with a base that uses "
                             "patch coordinates")
        self.grn = GlobalRecycleNetwork(self.in_dim, int(recycle_tokens)) if int(recycle_tokens) > 0 else None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher only scores
        return self

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA update of the teacher from the student (called by the trainer after each optimiser step)."""
        m = self.momentum
        for pt, ps in zip(self.teacher.parameters(), self.student.parameters()):
            pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
        for bt, bs in zip(self.teacher.buffers(), self.student.buffers()):
            bt.copy_(bs)

    def scores(self, t_out: dict[str, Any], label: Any = None) -> torch.Tensor:
        """The teacher's per-instance score that decides the masking (attention, or class-aware probability)."""
        a = t_out["attention"].float()
        if not self.class_aware:
            return a
        il = t_out["instance_logits"].float()
        y = int(label) if label is not None else int(torch.argmax(t_out["logits"]))
        return a * torch.softmax(il, dim=-1)[:, min(y, il.shape[1] - 1)]

    def masks(self, scores: torch.Tensor, generator: torch.Generator | None = None):
        """Indices ``(kept, masked_high, masked_low, masked_random)`` for one bag's teacher scores ``(N,)``."""
        n = scores.shape[0]
        order = torch.argsort(scores, descending=True)
        n_high = int(math.floor(self.r_high * n))
        n_low = int(math.floor(self.r_low * n))
        n_high = min(n_high, n - 1)
        n_low = min(n_low, n - 1 - n_high)
        high = order[:n_high]
        low = order[n - n_low:] if n_low else order[:0]
        rest = order[n_high:n - n_low]
        n_rand = min(int(math.floor(self.r_random * rest.shape[0])), rest.shape[0] - 1)
        perm = torch.randperm(rest.shape[0], generator=generator, device="cpu").to(rest.device)
        rand = rest[perm[:n_rand]]
        kept = torch.sort(rest[perm[n_rand:]]).values
        return kept, high, low, rand

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None,
                label: torch.Tensor | int | None = None) -> dict[str, Any]:
        features = as_bag(features, self.in_dim, "MHIM")
        n = features.shape[0]
        if not self.training or n < 2:
            net = self.teacher if (self.infer_with == "teacher" and not self.training) else self.student
            return call_model(net, features, coords, label if self.training else None)
        with torch.no_grad():
            t_out = call_model(self.teacher, features, coords)
        kept, high, low, rand = self.masks(self.scores(t_out, label))
        x = features[kept]
        c = None if coords is None else coords[kept]
        if self.grn is not None:
            masked = torch.cat([high, low, rand])
            if masked.numel():
                x = torch.cat([x, self.grn(features[masked]).to(x.dtype)])
        out = dict(call_model(self.student, x, c, label))
        a = out.get("attention")
        if a is not None:
            full = a.new_zeros(n)
            full[kept] = a[:kept.shape[0]]
            out["attention"] = full / full.sum().clamp_min(1e-12)
            out.pop("attention_branches", None)
        if out.get("instance_logits") is not None:
            il = out["instance_logits"]
            full_il = il.new_zeros(n, il.shape[1])
            full_il[kept] = il[:kept.shape[0]]
            out["instance_logits"] = full_il
        if self.cons_w > 0:
            key = "embedding" if (out.get("embedding") is not None and t_out.get("embedding") is not None) else "logits"
            zt, zs = t_out[key].float(), out[key].float()
            cons = -(torch.softmax(zt / self.tau, dim=-1) * F.log_softmax(zs / self.tau, dim=-1)).sum()
            prev = out.get("aux_loss")
            out["aux_loss"] = self.cons_w * cons + (prev if prev is not None else 0.0)
            out["consistency_loss"] = cons.detach()
        out["masked_high"], out["masked_low"], out["masked_random"] = high, low, rand
        return out


@register_model(lr=2e-4, weight_decay=1e-5)
def mhim(in_dim: int, n_classes: int, base: str = "abmil", base_kwargs: dict[str, Any] | None = None,
         mask_ratio_high: float = 0.01, mask_ratio_random: float = 0.5, mask_ratio_low: float = 0.0,
         momentum: float = 0.9999, consistency_weight: float = 0.1, temperature: float = 1.0,
         class_aware: bool = False, recycle_tokens: int = 0, infer_with: str = "student", *,
         task: str = "classification") -> MHIM:
    """MHIM-MIL: EMA teacher masks the most salient instances, student trains on hard ones (Tang et al. 2023/25)."""
    return MHIM(in_dim, n_classes, base=base, base_kwargs=base_kwargs, mask_ratio_high=mask_ratio_high,
                mask_ratio_random=mask_ratio_random, mask_ratio_low=mask_ratio_low, momentum=momentum,
                consistency_weight=consistency_weight, temperature=temperature, class_aware=class_aware,
                recycle_tokens=recycle_tokens, infer_with=infer_with, task=task)
