"""``instance_cls``: "Rethinking Multiple Instance Learning for Whole Slide Image Classification: A Good
Instance Classifier is All You Need" (INS; Qu et al., 2023), on frozen patch features.

INS is an instance-level MIL framework: an instance classifier is trained jointly with instance-level weakly
supervised contrastive learning (IWSCL) and prototype-based pseudo-label generation (PPLG), and the bag
prediction comes from the instance predictions. Components, as we implement them:

* **Encoder** ``f`` (``in_dim -> hidden -> feat_dim``, ReLU) and a projection head for the contrastive space
  (``feat_dim -> feat_dim -> proj_dim``, L2-normalised); a *momentum* (key) copy of both, updated by an
  exponential moving average after every optimiser step (MoCo; ``key_momentum``), and a queue of the last
  ``queue_size`` key embeddings with their pseudo-labels.
* **Instance classifier** on ``f(x)``: ``n_classes`` logits per instance. Bag logits (as mi-Net /
  ``instance_max``): class 0 is the "nothing present" reference, ``logit_c = max_k (ℓ_kc - ℓ_k0)`` for the other
  classes, so a bag is as positive as its most positive instance.
* **Pseudo-labels** (training, needs the bag label ``y``): every instance of a negative bag (``y = 0``) is a
  true negative (label 0). An instance of a bag of class ``y > 0`` is labelled ``y`` if its embedding is closer
  (cosine) to the class-``y`` prototype than to the negative prototype, else 0 (PPLG); the bag's
  top-scoring instance (by the instance classifier) is always labelled ``y``, since a positive bag holds at
  least one positive instance. During the warm-up (the first ``warmup`` share of training, via
  ``set_progress``) every instance of a positive bag takes the bag label.
* **Prototypes**, one per class in the contrastive space, updated after each bag by a moving average
  (``proto_momentum``) of the query embeddings pseudo-labelled with that class (the negative prototype only from
  true negatives) and re-normalised.
* **Losses** on up to ``sample`` random instances of the bag: cross-entropy of the instance classifier on the
  pseudo-labels, plus IWSCL, a supervised contrastive loss (temperature ``temperature``) of each query against
  the current keys and the queue, positives being keys with the same pseudo-label. Both come back as
  ``aux_loss``; the bag loss has weight ``bag_weight`` (0 = the paper: only instance-level training).

Departures (docs/mil.md): the paper fine-tunes the patch encoder (a ResNet-18) end to end on image
augmentations; here the encoder is a small MLP on frozen features, and the two contrastive views are
feature-level augmentations (Gaussian noise of ``noise`` × the bag's feature s.d., and dropout 0.1) instead of
image augmentations; the queue and the number of instances per step are sized for bags, not for the paper's
instance mini-batches. Defaults: hidden 512, feature 128, projection 64, τ 0.07, key momentum 0.999,
prototype momentum 0.9, queue 4096, warm-up 10 % of training, 512 instances per step, AdamW lr 1e-4, weight
decay 1e-4 (our choices where the paper's setting does not carry over). Classification only.
``instance_logits``: the instance classifier's logits (heatmap score = log-odds of the class vs "nothing").
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import MILError, register_model
from ._layers import as_bag, reference_logits


class InstanceClassifierMIL(nn.Module):
    uses_label = True

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 512, feat_dim: int = 128, proj_dim: int = 64,
                 temperature: float = 0.07, key_momentum: float = 0.999, proto_momentum: float = 0.9,
                 queue_size: int = 4096, warmup: float = 0.1, sample: int = 512, noise: float = 0.1,
                 cls_weight: float = 1.0, con_weight: float = 1.0, bag_weight: float = 0.0,
                 task: str = "classification"):
        super().__init__()
        if task != "classification":
            raise MILError(f"instance_cls is a classification model (instance pseudo-labels); task {task!r}")
        self.in_dim, self.n_classes = int(in_dim), int(n_classes)
        self.encoder = nn.Sequential(nn.Linear(self.in_dim, int(hidden_dim)), nn.ReLU(),
                                     nn.Linear(int(hidden_dim), int(feat_dim)), nn.ReLU())
        self.proj = nn.Sequential(nn.Linear(int(feat_dim), int(feat_dim)), nn.ReLU(),
                                  nn.Linear(int(feat_dim), int(proj_dim)))
        self.classifier = nn.Linear(int(feat_dim), self.n_classes)
        self.key_encoder = copy.deepcopy(self.encoder)
        self.key_proj = copy.deepcopy(self.proj)
        for p in list(self.key_encoder.parameters()) + list(self.key_proj.parameters()):
            p.requires_grad_(False)
        self.tau, self.key_m, self.proto_m = float(temperature), float(key_momentum), float(proto_momentum)
        self.warmup, self.sample, self.noise = float(warmup), int(sample), float(noise)
        self.cls_w, self.con_w, self.bag_w = float(cls_weight), float(con_weight), float(bag_weight)
        self.register_buffer("queue", torch.zeros(int(queue_size), int(proj_dim)))
        self.register_buffer("queue_labels", torch.full((int(queue_size),), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("prototypes", torch.zeros(self.n_classes, int(proj_dim)))
        self.register_buffer("proto_ready", torch.zeros(self.n_classes, dtype=torch.bool))
        self.progress = 1.0  # outside the trainer: no warm-up

    # ---------------------------------------------------------------------------------------------- hooks
    def set_progress(self, step: int, total: int) -> None:
        self.progress = step / max(1, total)

    @torch.no_grad()
    def after_step(self) -> None:
        m = self.key_m
        for src, dst in ((self.encoder, self.key_encoder), (self.proj, self.key_proj)):
            for ps, pk in zip(src.parameters(), dst.parameters()):
                pk.mul_(m).add_(ps.detach(), alpha=1.0 - m)

    def train(self, mode: bool = True):
        super().train(mode)
        self.key_encoder.eval()
        self.key_proj.eval()
        return self

    # ---------------------------------------------------------------------------------------------- parts
    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        s = x.std(dim=0, keepdim=True).clamp_min(1e-6) if x.shape[0] > 1 else x.abs().clamp_min(1e-6)
        return F.dropout(x + self.noise * s * torch.randn_like(x), 0.1, training=True)

    @torch.no_grad()
    def pseudo_labels(self, q: torch.Tensor, scores: torch.Tensor, y: int, warm: bool) -> torch.Tensor:
        """Pseudo-labels of a bag's sampled instances (module docstring); ``scores``: classifier log-odds."""
        n = q.shape[0]
        if y == 0:
            return torch.zeros(n, dtype=torch.long, device=q.device)
        if warm or not bool(self.proto_ready[y]) or not bool(self.proto_ready[0]):
            return torch.full((n,), y, dtype=torch.long, device=q.device)
        pos = (q @ self.prototypes[y]) > (q @ self.prototypes[0])
        pos[int(torch.argmax(scores))] = True
        return torch.where(pos, torch.full_like(pos, y, dtype=torch.long), torch.zeros(n, dtype=torch.long,
                                                                                          device=q.device))

    @torch.no_grad()
    def _update(self, q: torch.Tensor, k: torch.Tensor, pl: torch.Tensor, y: int) -> None:
        for c in pl.unique().tolist():
            if c == 0 and y != 0:
                continue  # the negative prototype learns from true negatives only
            mean = F.normalize(q[pl == c].mean(dim=0), dim=0)
            if bool(self.proto_ready[c]):
                mean = F.normalize(self.proto_m * self.prototypes[c] + (1 - self.proto_m) * mean, dim=0)
            self.prototypes[c] = mean
            self.proto_ready[c] = True
        size = self.queue.shape[0]
        kk, ll = k[-size:], pl[-size:]
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(kk.shape[0], device=k.device)) % size
        self.queue[idx] = kk
        self.queue_labels[idx] = ll
        self.queue_ptr.fill_((ptr + kk.shape[0]) % size)

    def _contrastive(self, q: torch.Tensor, k: torch.Tensor, pl: torch.Tensor) -> torch.Tensor:
        have = self.queue_labels >= 0
        keys = torch.cat([k, self.queue[have]])
        klab = torch.cat([pl, self.queue_labels[have]])
        logits = (q @ keys.T).float() / self.tau  # (n, n + Q)
        pos = pl[:, None] == klab[None, :]
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        return -(log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1).clamp_min(1)).mean()

    def _bag_logits(self, inst: torch.Tensor) -> torch.Tensor:
        if inst.shape[0] == 0:
            return reference_logits(inst.new_full((self.n_classes - 1,), -30.0))
        rel = inst[:, 1:] - inst[:, :1]
        return reference_logits(rel.max(dim=0).values)

    def forward(self, features: torch.Tensor, label: torch.Tensor | int | None = None) -> dict[str, Any]:
        features = as_bag(features, self.in_dim, "instance_cls")
        f = self.encoder(features)
        inst = self.classifier(f)
        logits = self._bag_logits(inst)
        out: dict[str, Any] = {"logits": logits, "attention": None, "instance_logits": inst}
        if not (self.training and label is not None and features.shape[0] > 0):
            return out
        y = int(label)
        n = features.shape[0]
        sel = torch.randperm(n, device=features.device)[:self.sample] if n > self.sample \
            else torch.arange(n, device=features.device)
        xs = features[sel]
        q = F.normalize(self.proj(self.encoder(self._augment(xs))).float(), dim=-1)
        with torch.no_grad():
            k = F.normalize(self.key_proj(self.key_encoder(self._augment(xs))).float(), dim=-1)
        scores = (inst[sel, y] - inst[sel, 0]).detach() if y > 0 else inst[sel, 0].detach()
        pl = self.pseudo_labels(q.detach(), scores, y, warm=self.progress < self.warmup)
        l_cls = F.cross_entropy(inst[sel].float(), pl)
        l_con = self._contrastive(q, k, pl)
        self._update(q.detach(), k, pl, y)
        out["aux_loss"] = self.cls_w * l_cls + self.con_w * l_con
        out["loss_logits"] = [(logits, self.bag_w)]
        out["pseudo_positive_share"] = (pl > 0).float().mean().detach()
        return out


@register_model(lr=1e-4, weight_decay=1e-4)
def instance_cls(in_dim: int, n_classes: int, hidden_dim: int = 512, feat_dim: int = 128, proj_dim: int = 64,
                 temperature: float = 0.07, key_momentum: float = 0.999, proto_momentum: float = 0.9,
                 queue_size: int = 4096, warmup: float = 0.1, sample: int = 512, noise: float = 0.1,
                 cls_weight: float = 1.0, con_weight: float = 1.0, bag_weight: float = 0.0, *,
                 task: str = "classification") -> InstanceClassifierMIL:
    """INS: instance classifier, prototype pseudo-labels, instance contrastive learning; frozen features (Qu et al.)."""
    return InstanceClassifierMIL(in_dim, n_classes, hidden_dim=hidden_dim, feat_dim=feat_dim, proj_dim=proj_dim,
                                 temperature=temperature, key_momentum=key_momentum, proto_momentum=proto_momentum,
                                 queue_size=queue_size, warmup=warmup, sample=sample, noise=noise,
                                 cls_weight=cls_weight, con_weight=con_weight, bag_weight=bag_weight, task=task)
