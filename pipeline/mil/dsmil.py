"""DSMIL: dual-stream MIL, Li, Li & Eliceiri, CVPR 2021.

Stream 1 (max-pooling): a linear instance classifier scores every instance, ``c_k = W_0 h_k``; the bag score of
this stream is the score of the highest-scoring ("critical") instance ``m``, ``c_m``.
Stream 2 (critical-instance attention): every instance is projected to a query ``q_k = W_q h_k`` (128-d); its
attention is its similarity to the critical instance, ``U_k = softmax_k(<q_k, q_m> / √128)``; the bag
embedding is ``b = Σ_k U_k v_k`` (``v_k = h_k``, or ``W_v h_k`` with ``v_dim``); a linear layer (the paper's
1-D convolution over the class embeddings) gives the bag score ``c_b``.
Prediction ``(c_m + c_b) / 2``; loss ``0.5 L(c_m) + 0.5 L(c_b)``. With several outputs every output has its
own critical instance and embedding. Binary classification uses a single stream score ``s`` with logits
``[0, s]`` as in the paper's binary setting (one sigmoid output). ``h_k`` are the input features (the paper
trains on frozen self-supervised features without an extra embedding). Defaults: q 128-d, ``v = h``,
dropout on ``v`` 0; Adam lr 2e-4, weight decay 5e-3 (the paper's settings).

``attention``: ``U`` of the positive class (binary) or of the predicted class; ``instance_logits``: the
instance classifier (stream 1).
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model
from ._layers import as_bag, reference_logits


class DSMIL(nn.Module):
    uses_label = False

    def __init__(self, in_dim: int, n_classes: int, q_dim: int = 128, v_dim: int | None = None,
                 dropout_v: float = 0.0, task: str = "classification"):
        super().__init__()
        self.in_dim, self.n_classes = int(in_dim), int(n_classes)
        self.reference = task == "classification" and self.n_classes == 2
        self.k = 1 if self.reference else self.n_classes
        self.instance_classifier = nn.Linear(self.in_dim, self.k)
        self.q = nn.Linear(self.in_dim, int(q_dim))
        self.q_scale = float(q_dim) ** -0.5
        if v_dim:
            self.v = nn.Sequential(nn.Dropout(float(dropout_v)), nn.Linear(self.in_dim, int(v_dim)))
            self.v_dim = int(v_dim)
        else:
            self.v = nn.Dropout(float(dropout_v))
            self.v_dim = self.in_dim
        self.bag_classifier = nn.Linear(self.k * self.v_dim, self.k)  # == Conv1d(k, k, kernel_size=v_dim)

    def _out(self, s: torch.Tensor) -> torch.Tensor:
        return reference_logits(s) if self.reference else s

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
        logits_m, logits_b = self._out(c_m), self._out(c_b)
        logits = 0.5 * (logits_m + logits_b)
        if self.reference:
            attention = U[:, 0]
        else:
            attention = U[:, int(torch.argmax(logits.detach()))]
        return {"logits": logits, "attention": attention, "instance_logits": self._out(c),
                "loss_logits": [(logits_m, 0.5), (logits_b, 0.5)], "attention_branches": U.T}


@register_model(lr=2e-4, weight_decay=5e-3)
def dsmil(in_dim: int, n_classes: int, q_dim: int = 128, v_dim: int | None = None, dropout_v: float = 0.0, *,
          task: str = "classification") -> DSMIL:
    """DSMIL: max-instance stream + critical-instance attention stream (Li et al. 2021)."""
    return DSMIL(in_dim, n_classes, q_dim=q_dim, v_dim=v_dim, dropout_v=dropout_v, task=task)
