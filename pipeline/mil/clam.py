"""CLAM: clustering-constrained attention MIL, Lu et al., Nature Biomedical Engineering 2021.

Instances are embedded, ``h_k = Dropout(ReLU(W x_k + b))`` (512-d), and scored by a gated attention network
(attention size 256, dropout 0.25 inside it). ``clam_sb`` (single branch) softmax-normalises one attention map
and classifies ``z = Σ a_k h_k`` with a linear layer; ``clam_mb`` (multi-branch) has one attention map per
class ``c`` and one scalar classifier per class on ``z_c = Σ a_ck h_k``.

Instance-level clustering (training only, needs the bag label ``y``): every class ``c`` has a two-way
instance classifier. For the true class, the ``k_sample`` instances with the highest attention (of branch
``y`` for ``clam_mb``, of the single branch for ``clam_sb``) are pseudo-labelled positive and the
``k_sample`` lowest negative; with ``subtyping`` (the classes are mutually exclusive subtypes, e.g. LUAD vs
LUSC, where a patch typical of one class is evidence against the others; the paper used it for its binary
NSCLC and three-class RCC tasks) the top ``k_sample`` instances of every other class's attention are
pseudo-labelled negative for that class's classifier. ``subtyping`` defaults to on for more than two classes
and off for two (a binary task is often "tumour vs normal", where the normal class has no positive evidence
of its own); set ``subtyping=True`` for a binary subtyping task. The instance loss is ``inst_loss`` over
these pseudo-labels: ``ce`` (cross-entropy) or ``svm``, the smooth top-1 SVM loss of Berrada et al. (ICLR
2018), ``τ log Σ_j exp((α [j ≠ t] + s_j - s_t) / τ)`` with ``α = τ = 1``, which the CLAM authors used for
their experiments; summed over the evaluated classes, divided by the number of classes when subtyping. The
total loss is ``bag_weight * bag_loss + (1 - bag_weight) * instance_loss`` (paper defaults ``k_sample=8``,
``bag_weight=0.7``). For bags with fewer than ``2 * k_sample`` instances ``k`` shrinks to ``N // 2``. For
survival and regression the instance loss is not used. Training recipe (the paper's): Adam (L2 weight
decay) lr 2e-4, weight decay 1e-5, constant learning rate, up to 200 epochs with early stopping on the
validation loss after 20 epochs without improvement but not before epoch 50; CLAM's class-balanced
("weighted") sampling is the trainer's ``balance="sampler"``.

``instance_logits``: for every class, the log-odds of its instance classifier (the scores CLAM shows in its
instance-level heatmaps). ``attention``: the single branch, or (``clam_mb``) the branch of the predicted
class.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import register_model
from ._layers import GatedAttention, as_bag, embedding


INSTANCE_LOSSES = ("ce", "svm")


def smooth_top1_svm(scores: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """Mean smooth top-1 multi-class SVM loss (Berrada, Zisserman & Kumar, ICLR 2018) of ``scores`` ``(B, C)``:
    ``τ log Σ_j exp((α [j ≠ t] + s_j - s_t) / τ)``; as ``τ -> 0`` it becomes the hinge ``max_j (α [j ≠ t] +
    s_j) - s_t``."""
    margin = alpha * (1.0 - F.one_hot(target, scores.shape[-1]).to(scores.dtype))
    s_t = scores.gather(1, target[:, None])
    return (tau * torch.logsumexp((margin + scores - s_t) / tau, dim=1)).mean()


class CLAM(nn.Module):
    uses_label = True

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, bag_weight: float = 0.7, subtyping: bool | None = None,
                 inst_loss: str = "ce", multi_branch: bool = False, task: str = "classification"):
        super().__init__()
        self.in_dim, self.n_classes, self.hidden_dim = int(in_dim), int(n_classes), int(hidden_dim)
        self.k_sample, self.bag_weight = int(k_sample), float(bag_weight)
        if not 0.0 < self.bag_weight <= 1.0:
            raise ValueError(f"bag_weight must be in (0, 1], got {bag_weight}")
        self.subtyping = (self.n_classes > 2) if subtyping is None else bool(subtyping)
        if inst_loss not in INSTANCE_LOSSES:
            raise ValueError(f"inst_loss must be one of {INSTANCE_LOSSES} (got {inst_loss!r})")
        self.inst_loss = inst_loss
        self.multi_branch = bool(multi_branch)
        self.classification = task == "classification"
        self.embed = embedding(self.in_dim, self.hidden_dim, dropout)
        n_branches = self.n_classes if self.multi_branch else 1
        self.attn = GatedAttention(self.hidden_dim, attn_dim, n_branches, gated=True, dropout=dropout)
        if self.multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(self.hidden_dim, 1) for _ in range(self.n_classes))
        else:
            self.classifier = nn.Linear(self.hidden_dim, self.n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(self.hidden_dim, 2) for _ in range(self.n_classes))

    def _instance_loss(self, A: torch.Tensor, h: torch.Tensor, label: int) -> torch.Tensor | None:
        n = h.shape[0]
        k = min(self.k_sample, n // 2)
        if k < 1:
            return None
        total, evaluated = h.new_zeros(()), 0
        for c, clf in enumerate(self.instance_classifiers):
            a = A[c] if self.multi_branch else A[0]
            if c == label:
                top = torch.topk(a, k).indices
                bottom = torch.topk(-a, k).indices
                idx = torch.cat([top, bottom])
                target = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(h.device)
            elif self.subtyping:
                idx = torch.topk(a, k).indices
                target = torch.zeros(k, dtype=torch.long, device=h.device)
            else:
                continue
            scores = clf(h[idx]).float()
            total = total + (smooth_top1_svm(scores, target) if self.inst_loss == "svm"
                             else F.cross_entropy(scores, target))
            evaluated += 1
        if not evaluated:
            return None
        return total / len(self.instance_classifiers) if self.subtyping else total

    def forward(self, features: torch.Tensor,
                label: torch.Tensor | int | None = None) -> dict[str, torch.Tensor | None]:
        features = as_bag(features, self.in_dim, "CLAM")
        h = self.embed(features)
        n = h.shape[0]
        n_branches = self.n_classes if self.multi_branch else 1
        if n == 0:
            A = h.new_zeros(n_branches, 0, dtype=torch.float32)
            Z = h.new_zeros(n_branches, self.hidden_dim)
        else:
            A = torch.softmax(self.attn(h).float().T, dim=1)  # (branches, N)
            Z = A.to(h.dtype) @ h
        if self.multi_branch:
            logits = torch.cat([clf(Z[c]) for c, clf in enumerate(self.classifiers)])
            attention = A[int(torch.argmax(logits.detach()))] if n else A.new_zeros(0)
        else:
            logits = self.classifier(Z[0])
            attention = A[0]
        inst = torch.stack([(lambda o: o[:, 1] - o[:, 0])(clf(h)) for clf in self.instance_classifiers], dim=1) \
            if n else h.new_zeros(0, self.n_classes)
        out: dict[str, torch.Tensor | None] = {"logits": logits, "attention": attention, "instance_logits": inst,
                                              "attention_branches": A}
        if label is not None and self.classification and n > 0:
            inst_loss = self._instance_loss(A.detach(), h, int(label))
            if inst_loss is not None:
                out["loss_logits"] = [(logits, self.bag_weight)]
                out["aux_loss"] = (1.0 - self.bag_weight) * inst_loss
                out["instance_loss"] = inst_loss.detach()
        return out


CLAM_RECIPE = dict(lr=2e-4, weight_decay=1e-5, optimizer="adam", schedule="constant", epochs=200, patience=20,
                   min_epochs=50)


@register_model(**CLAM_RECIPE)
def clam_sb(in_dim: int, n_classes: int, hidden_dim: int = 512, attn_dim: int = 256, dropout: float = 0.25,
            k_sample: int = 8, bag_weight: float = 0.7, subtyping: bool | None = None, inst_loss: str = "ce", *,
            task: str = "classification") -> CLAM:
    """CLAM single-branch: gated attention + instance-clustering loss (Lu et al. 2021)."""
    return CLAM(in_dim, n_classes, hidden_dim, attn_dim, dropout, k_sample, bag_weight, subtyping, inst_loss,
                multi_branch=False, task=task)


@register_model(**CLAM_RECIPE)
def clam_mb(in_dim: int, n_classes: int, hidden_dim: int = 512, attn_dim: int = 256, dropout: float = 0.25,
            k_sample: int = 8, bag_weight: float = 0.7, subtyping: bool | None = None, inst_loss: str = "ce", *,
            task: str = "classification") -> CLAM:
    """CLAM multi-branch: one attention branch per class + instance-clustering loss (Lu et al. 2021)."""
    return CLAM(in_dim, n_classes, hidden_dim, attn_dim, dropout, k_sample, bag_weight, subtyping, inst_loss,
                multi_branch=True, task=task)
