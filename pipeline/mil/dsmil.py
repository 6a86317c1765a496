"""DSMIL: dual-stream MIL, Li, Li & Eliceiri, CVPR 2021.

Stream 1 (max-pooling): a linear instance classifier scores every instance, ``c_k = W_0 h_k``; the bag score of
this stream is the score of the highest-scoring ("critical") instance ``m``, ``c_m``.
Stream 2 (critical-instance attention): every instance is mapped to a query by the query network
``q_k = tanh(W_2 ReLU(W_1 h_k))`` (Linear-ReLU-Linear-Tanh, 128-d); its attention is its similarity to the
critical instance, ``U_k = softmax_k(<q_k, q_m> / √128)``; the bag embedding is ``b = Σ_k U_k v_k``
(``v_k = h_k``, or ``W_v h_k`` with ``v_dim``); a linear layer (the paper's 1-D convolution over the class
embeddings) gives the bag score ``c_b``. Every class is an independent (sigmoid) output with its own
critical instance and embedding.

Classification: the loss is ``0.5 BCE(c_m) + 0.5 BCE(c_b)``, one binary cross-entropy per class against the
one-hot label, and the prediction averages the two streams' probabilities, ``p_c = (σ(c_m) + σ(c_b)) / 2``.
Binary classification uses a single class score (the paper's binary setting; ``logits = [0, logit p]``, so
the softmax of the logits is ``p`` and the cross-entropy is the BCE); with more classes ``logits`` are
``logit p_c`` per class (class probabilities for metrics are ``p_c`` normalised to sum 1; the model declares
``bag_loss = "bce"`` so the trainer uses the per-class BCE). Survival and regression: one output per model
output, loss ``0.5 L(c_m) + 0.5 L(c_b)`` with the task's loss, prediction ``(c_m + c_b) / 2``. ``h_k`` are
the input features (the paper trains on frozen self-supervised features without an extra embedding).
Defaults: q 128-d, ``v = h``, dropout on ``v`` 0; Adam (betas 0.5, 0.9) lr 2e-4, weight decay 5e-3 (L2),
cosine schedule to 5e-6 (the authors' settings).

``attention``: ``U`` of the positive class (binary) or of the predicted class; ``instance_logits``: the
instance classifier (stream 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import register_model
from ._layers import as_bag, reference_logits


def mean_prob_logit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``logit((σ(a) + σ(b)) / 2)``, computed in log space (stable for large scores)."""
    a, b = a.float(), b.float()
    log_p = torch.logaddexp(F.logsigmoid(a), F.logsigmoid(b))  # log(2p)
    log_q = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(-b))  # log(2(1 - p))
    return log_p - log_q


class DSMIL(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, q_dim: int = 128, v_dim: int | None = None,
                 dropout_v: float = 0.0, task: str = "classification"):
        super().__init__()
        self.in_dim, self.n_classes = int(in_dim), int(n_classes)
        self.classification = task == "classification"
        self.reference = self.classification and self.n_classes == 2
        self.bag_loss = "bce" if self.classification and not self.reference else "ce"
        self.k = 1 if self.reference else self.n_classes
        self.instance_classifier = nn.Linear(self.in_dim, self.k)
        self.q = nn.Sequential(nn.Linear(self.in_dim, int(q_dim)), nn.ReLU(), nn.Linear(int(q_dim), int(q_dim)),
                               nn.Tanh())
        self.q_scale = 1.0 / math.sqrt(float(q_dim))
        if v_dim:
            self.v = nn.Sequential(nn.Dropout(float(dropout_v)), nn.Linear(self.in_dim, int(v_dim)))
            self.v_dim = int(v_dim)
        else:
            self.v = nn.Dropout(float(dropout_v))
            self.v_dim = self.in_dim
        self.bag_classifier = nn.Linear(self.k * self.v_dim, self.k)  # == Conv1d(k, k, kernel_size=v_dim)

    def _out(self, s: torch.Tensor) -> torch.Tensor:
        return reference_logits(s) if self.reference else s

    def _combine(self, c_m: torch.Tensor, c_b: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return self._out(mean_prob_logit(c_m, c_b))
        return 0.5 * (c_m + c_b)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor | None]:
        x = as_bag(features, self.in_dim, "DSMIL")
        n = x.shape[0]
        c = self.instance_classifier(x)  # (N, k)
        if n == 0:
            z = x.new_zeros(self.k)
            return {"logits": self._out(z), "attention": x.new_zeros(0, dtype=torch.float32),
                    "instance_logits": self._out(c)}
        crit = torch.argmax(c.detach(), dim=0)  # (k,)
        c_m = c[crit, torch.arange(self.k, device=x.device)]
        Q = self.q(x)  # (N, q)
        U = torch.softmax(((Q @ Q[crit].T) * self.q_scale).float(), dim=0)  # (N, k)
        B = U.T.to(x.dtype) @ self.v(x)  # (k, v_dim)
        c_b = self.bag_classifier(B.reshape(-1))
        logits = self._combine(c_m, c_b)
        if self.reference:
            attention = U[:, 0]
        else:
            attention = U[:, int(torch.argmax(logits.detach()))]
        return {"logits": logits, "attention": attention, "instance_logits": self._out(c),
                "loss_logits": [(self._out(c_m), 0.5), (self._out(c_b), 0.5)], "attention_branches": U.T}


@register_model(lr=2e-4, weight_decay=5e-3, optimizer="adam", betas=(0.5, 0.9), schedule="cosine", min_lr=5e-6)
def dsmil(in_dim: int, n_classes: int, q_dim: int = 128, v_dim: int | None = None, dropout_v: float = 0.0, *,
          task: str = "classification") -> DSMIL:
    """DSMIL: max-instance stream + critical-instance attention stream (Li et al. 2021)."""
    return DSMIL(in_dim, n_classes, q_dim=q_dim, v_dim=v_dim, dropout_v=dropout_v, task=task)
