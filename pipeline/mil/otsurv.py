"""OTSurv: survival MIL as heterogeneity-aware optimal transport (Ren et al., MICCAI 2025).

The patches of a slide are transported onto ``K`` learned *morphological prototypes*; the transport plan
decides how each patch contributes to each prototype's summary, and the summaries feed the survival head.
OTSurv constrains the plan in two ways and solves the resulting unbalanced OT problem by matrix scaling:

* **global long-tail constraint**: the mass that reaches the prototypes follows a long-tailed prior ``b``
  (a few common morphologies, many rare ones; here ``b_k ∝ k^(-gamma)``, ``k = 1..K``), enforced softly by a
  KL penalty of weight ``lam`` (``lam = inf``: exactly). This avoids both collapse onto one prototype and a
  uniform spread;
* **local uncertainty constraint**: only a share ``ρ`` of the patch mass is transported (each patch sends at
  most its own mass ``1/N``); the rest goes to a *virtual* sink, so uncertain patches (far from every
  prototype) can stay out of the summary. ``ρ`` rises over training, from ``rho_start`` to ``rho_end``
  (linearly in the training progress from ``set_progress``), so the model first relies on confident
  patches and gradually takes in more (curriculum); inference uses the last training value (a buffer).

Problem (entropic, ``ε = epsilon``): with cost ``C_ik = 1 - cos(h_i, p_k)`` and a virtual column of cost 0,

    min_{Q ≥ 0}  <Q, C> - ε H(Q) + lam · KL(Q_{:,1..K}ᵀ 1 ‖ ρ b)
    s.t.  Q 1 = a = 1/N,   Q_{:,K+1}ᵀ 1 = 1 - ρ,

solved by the generalised Sinkhorn (matrix-scaling) iterations of Chizat et al. 2018 (float64; in the log
domain when the kernel could underflow):
``u = a / (K v)``, ``v_k = (ρ b_k / (Kᵀ u)_k)^(lam / (lam + ε))`` for the prototypes, ``v_{K+1} = (1 - ρ) /
(Kᵀ u)_{K+1}``; ``Q = diag(u) K diag(v)``, ``K = exp(-C / ε)``. The iterations are unrolled, so gradients
reach the embedding and the prototypes. The transported part ``Q_{:,1..K}`` (total mass ``ρ``) gives each
prototype's summary ``t_k = Σ_i Q_ik h_i / Σ_i Q_ik``; the concatenated summaries go through ``Linear-ReLU``
and the output layer (``n_classes`` outputs: discrete-time hazards for ``--survival-loss nll``, one log-risk
for Cox). ``attention``: each patch's transported mass ``Σ_k Q_ik``, normalised to sum 1 (patches left in the
sink get 0-ish weight) — the heatmap.

Defaults (ours where the paper's text we could read does not fix them): 256-d embedding (dropout 0.25),
``K = 16`` prototypes, ``gamma = 1``, ``lam = 1``, ``ε = 0.1``, at most 200 scaling iterations (3 of them
differentiable), ``ρ`` from 0.5 to 0.9;
AdamW lr 2e-4, weight decay 1e-5. Built for survival (the paper's task); it also accepts classification and
regression (same OT pooling, a different output layer), which our benchmarks use.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import register_model
from ._layers import as_bag, embedding


def long_tail_prior(k: int, gamma: float = 1.0) -> torch.Tensor:
    """``b_k ∝ k^(-gamma)``, ``k = 1..K``, summing to 1."""
    b = torch.arange(1, int(k) + 1, dtype=torch.float64) ** (-float(gamma))
    return (b / b.sum()).float()


def uot_plan(cost: torch.Tensor, rho: float, prior: torch.Tensor, epsilon: float = 0.1, lam: float = 1.0,
             n_iter: int = 200, tol: float = 1e-6, grad_iter: int = 3) -> torch.Tensor:
    """Transport plan ``(N, K + 1)`` of the OTSurv problem (module docstring): rows sum to ``1/N``, the last
    (virtual) column to ``1 - rho``, the prototype columns to ``rho`` in total, distributed like ``prior``
    (exactly for ``lam = inf``; pulled towards it by the KL term otherwise).

    ``cost``: ``(N, K)`` patch-to-prototype cost; the virtual column costs 0. Matrix-scaling iterations: up
    to ``n_iter`` without gradient until the scalings change by less than ``tol`` (relative), then
    ``grad_iter`` differentiable iterations from there (gradients through the last iterations of the fixed
    point). In float64 with the Gibbs kernel ``exp(-C/ε)`` itself while it cannot underflow
    (``max C / ε < 500``), else in the log domain.
    """
    n, k = cost.shape
    rho = float(min(max(rho, 1e-6), 1.0))
    dev = cost.device
    fi = 1.0 if math.isinf(lam) else lam / (lam + epsilon)
    expo = torch.cat([torch.full((k,), fi, device=dev, dtype=torch.float64),
                      torch.ones(1, device=dev, dtype=torch.float64)])
    b = torch.cat([rho * prior.to(dev, torch.float64).clamp_min(1e-30),
                   torch.tensor([max(1.0 - rho, 1e-12)], device=dev, dtype=torch.float64)])
    c = torch.cat([cost.to(torch.float64), cost.new_zeros(n, 1, dtype=torch.float64)], dim=1)
    a = 1.0 / n
    if n and float(c.detach().max()) / epsilon < 500:
        kern = torch.exp(-c / epsilon)

        def step(kk, u):
            v = (b / (kk.T @ u)) ** expo
            return v, a / (kk @ v)

        u = torch.ones(n, dtype=torch.float64, device=dev)
        v = torch.ones(k + 1, dtype=torch.float64, device=dev)
        with torch.no_grad():
            kd = kern.detach()
            for it in range(max(0, int(n_iter))):
                new_v, u = step(kd, u)
                if it % 10 == 9 and float(((new_v - v).abs() / v.abs().clamp_min(1e-300)).max()) < tol:
                    v = new_v
                    break
                v = new_v
        for _ in range(max(1, int(grad_iter))):
            v, u = step(kern, u)
        return (u[:, None] * kern * v[None, :]).float()
    log_k = -c / epsilon
    log_b = torch.log(b)
    log_u = torch.zeros(n, device=dev, dtype=torch.float64)
    log_v = torch.zeros(k + 1, device=dev, dtype=torch.float64)

    def lstep(lk, lu):
        lv = expo * (log_b - torch.logsumexp(lk + lu[:, None], dim=0))
        return lv, math.log(a) - torch.logsumexp(lk + lv[None, :], dim=1)

    with torch.no_grad():
        lk = log_k.detach()
        for it in range(max(0, int(n_iter))):
            new_v, log_u = lstep(lk, log_u)
            if it % 10 == 9 and float((new_v - log_v).abs().max()) < tol:
                log_v = new_v
                break
            log_v = new_v
    for _ in range(max(1, int(grad_iter))):
        log_v, log_u = lstep(log_k, log_u)
    return torch.exp(log_u[:, None] + log_k + log_v[None, :]).float()


class OTSurv(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25,
                 n_prototypes: int = 16, gamma: float = 1.0, lam: float = 1.0, epsilon: float = 0.1,
                 n_iter: int = 200, rho_start: float = 0.5, rho_end: float = 0.9):
        super().__init__()
        if not 0.0 < float(rho_start) <= 1.0 or not 0.0 < float(rho_end) <= 1.0:
            raise ValueError(f"rho_start and rho_end must be in (0, 1] (got {rho_start}, {rho_end})")
        if int(n_prototypes) < 1:
            raise ValueError("n_prototypes must be >= 1")
        self.in_dim, self.n_classes, self.hidden_dim = int(in_dim), int(n_classes), int(hidden_dim)
        self.k = int(n_prototypes)
        self.lam, self.epsilon, self.n_iter = float(lam), float(epsilon), int(n_iter)
        self.rho_start, self.rho_end = float(rho_start), float(rho_end)
        self.embed = embedding(self.in_dim, self.hidden_dim, dropout)
        self.prototypes = nn.Parameter(torch.randn(self.k, self.hidden_dim))
        self.register_buffer("prior", long_tail_prior(self.k, gamma))
        self.register_buffer("rho", torch.tensor(float(rho_start)))
        self.head = nn.Sequential(nn.Linear(self.k * self.hidden_dim, self.hidden_dim), nn.ReLU())
        self.classifier = nn.Linear(self.hidden_dim, self.n_classes)

    def set_progress(self, step: int, total: int) -> None:
        t = min(1.0, step / max(1, total))
        self.rho.fill_(self.rho_start + (self.rho_end - self.rho_start) * t)

    def plan(self, h: torch.Tensor) -> torch.Tensor:
        cost = 1.0 - F.normalize(h.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T
        return uot_plan(cost, float(self.rho), self.prior, self.epsilon, self.lam, self.n_iter)

    def forward(self, features: torch.Tensor) -> dict[str, Any]:
        features = as_bag(features, self.in_dim, "OTSurv")
        h = self.embed(features)
        if h.shape[0] == 0:
            z = self.head(h.new_zeros(self.k * self.hidden_dim))
            return {"logits": self.classifier(z), "attention": h.new_zeros(0, dtype=torch.float32)}
        Q = self.plan(h)[:, :self.k]  # (N, K): the transported part
        mass = Q.sum(dim=0)  # (K,)
        t = (Q.T @ h.float()) / mass[:, None].clamp_min(1e-12)  # prototype summaries (K, hidden)
        z = self.head(t.reshape(-1).to(h.dtype))
        patch = Q.sum(dim=1)
        return {"logits": self.classifier(z), "attention": patch / patch.sum().clamp_min(1e-12), "embedding": z,
                "transport_plan": Q.detach()}


@register_model(lr=2e-4, weight_decay=1e-5)
def otsurv(in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25, n_prototypes: int = 16,
           gamma: float = 1.0, lam: float = 1.0, epsilon: float = 0.1, n_iter: int = 200, rho_start: float = 0.5,
           rho_end: float = 0.9) -> OTSurv:
    """OTSurv: patches -> prototypes by unbalanced OT (long-tail prior, rising transported mass) (Ren et al. 2025)."""
    return OTSurv(in_dim, n_classes, hidden_dim=hidden_dim, dropout=dropout, n_prototypes=n_prototypes, gamma=gamma,
                  lam=lam, epsilon=epsilon, n_iter=n_iter, rho_start=rho_start, rho_end=rho_end)
