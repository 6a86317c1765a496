"""Learning tasks: what the model outputs mean, the loss, the predictions and the metrics.

* ``classification`` (``label`` column: integers or strings): ``n_classes`` logits, cross-entropy (optionally
  class-weighted), softmax probabilities; metrics AUC (binary; one-vs-rest macro for more classes), balanced
  accuracy, accuracy, F1 (binary: of the positive class ``classes[1]``; macro for more classes).
* ``survival`` (``time`` and ``event`` columns; ``event`` 1 = death/progression observed, 0 = censored):

  - ``nll`` (default; discrete-time, Zadeh & Schmid 2021 as used by PORPOISE): the follow-up time is cut into
    ``n_bins`` intervals at the quantiles of the observed event times of the training fold; the model outputs
    one logit per interval, the hazard ``h_j = sigmoid(logit_j)`` is the probability of the event in interval
    ``j`` given survival up to it, ``S_j = Π_{i<=j} (1 - h_i)``; loss for an event in interval ``j``:
    ``-log S_{j-1} - log h_j``, for censoring in interval ``j``: ``-log S_j``; risk ``= -Σ_j S_j``;
  - ``cox``: one output, the log-risk; loss the negative Cox partial log-likelihood (Breslow ties) over a
    mini-batch of bags (``--batch-size``, default 32 for Cox).

  Metric: Harrell's concordance index (C-index) of the risk.
* ``regression`` (numeric ``label``): one output, the standardised target (mean and standard deviation of the
  training fold); loss MSE or MAE; metrics MSE, MAE, Pearson's r and R² (``1 - SS_res / SS_tot``) on the
  original scale. WeakSTIL-style bounded regression (``bounds=(lo, hi)``, e.g. a percentage in [0, 100];
  Schirris et al. 2022): the output goes through a sigmoid, ``pred = lo + (hi - lo) · sigmoid(output)``, and
  the loss compares ``sigmoid(output)`` with the target rescaled to [0, 1]. With a ``threshold`` the metrics
  add the AUC of the prediction for "target >= threshold" (e.g. a clinical cut-off on a score).

A task object is built per training fold (the survival intervals and the regression scaling come from that
fold's training bags), stored in the fold checkpoint with :meth:`Task.config` and rebuilt by
:func:`task_from_config` for inference.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

from ..config import CHOICES
from . import MILError

SURVIVAL_LOSSES = CHOICES[("mil", "survival_loss")]
REGRESSION_LOSSES = CHOICES[("mil", "regression_loss")]


def _torch():
    import torch

    return torch


class Task:
    name = "task"
    n_outputs = 1

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, logits, idx: Sequence[int]):
        """Mean loss of bags ``idx`` (dataset indices) with stacked outputs ``logits`` ``(B, n_outputs)``."""
        raise NotImplementedError

    def predict(self, logits: np.ndarray) -> np.ndarray:
        """Bag predictions ``(B, k)`` from outputs ``(B, n_outputs)`` (averaged over folds at inference)."""
        raise NotImplementedError

    def score(self, logits: np.ndarray) -> np.ndarray:
        """One score per row of ``(M, n_outputs)`` outputs (instance scores, heatmaps): ``(M,)`` or ``(M, k)``."""
        raise NotImplementedError

    def score_columns(self) -> list[str]:
        return ["score"]

    def prediction_columns(self) -> list[str]:
        raise NotImplementedError

    def metrics(self, idx: Sequence[int], pred: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- classification

def compute_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, Any]:
    """AUC (binary; one-vs-rest macro over the classes present for multi-class), balanced accuracy, accuracy,
    F1 (binary: positive class; multi-class: macro)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    out: dict[str, Any] = {"auc": None}
    present = np.unique(y)
    if len(present) < 2:
        out["auc_note"] = f"test set has a single class ({len(y)} bag(s)); AUC undefined"
    elif n_classes == 2:
        out["auc"] = float(roc_auc_score(y == 1, probs[:, 1]))
    else:
        aucs = [roc_auc_score(y == c, probs[:, c]) for c in present]
        out["auc"] = float(np.mean(aucs))
        if len(present) < n_classes:
            out["auc_note"] = (f"one-vs-rest macro AUC over the {len(present)} of {n_classes} classes "
                               "present in the test set")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # y_pred contains classes not in y_true
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        if n_classes == 2:
            out["f1"] = float(f1_score(y, pred, pos_label=1, average="binary", zero_division=0))
        else:
            out["f1"] = float(f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0))
    out["accuracy"] = float(accuracy_score(y, pred))
    return out


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced class weights ``n / (C * count_c)`` (1 for classes absent from ``y``)."""
    counts = np.bincount(np.asarray(y), minlength=n_classes).astype(np.float64)
    w = np.ones(n_classes)
    nz = counts > 0
    w[nz] = counts[nz].sum() / (nz.sum() * counts[nz])
    return w


class ClassificationTask(Task):
    name = "classification"

    def __init__(self, classes: Sequence[Any], y: np.ndarray | None = None, weights: Sequence[float] | None = None):
        self.classes = list(classes)
        self.n_outputs = len(self.classes)
        self.y = None if y is None else np.asarray(y)
        self.weights = None if weights is None else [float(w) for w in weights]

    def config(self) -> dict[str, Any]:
        return {"task": self.name, "classes": self.classes, "class_weights": self.weights}

    def loss(self, logits, idx, bce: bool = False):
        """Cross-entropy, or with ``bce`` one binary cross-entropy per class against the one-hot label
        (averaged over the classes, as torch's BCEWithLogitsLoss; DSMIL's multi-class loss); weighted by
        the bag's class weight if set."""
        torch = _torch()
        target = torch.as_tensor(self.y[np.asarray(idx)], dtype=torch.long, device=logits.device)
        if bce:
            onehot = torch.nn.functional.one_hot(target, logits.shape[-1]).to(torch.float32)
            per = torch.nn.functional.binary_cross_entropy_with_logits(
                logits.float(), onehot, reduction="none").mean(dim=-1)
        else:
            per = torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
        if self.weights is not None:
            per = per * torch.as_tensor(self.weights, dtype=per.dtype, device=per.device)[target]
        return per.mean()

    def predict(self, logits):
        z = np.asarray(logits, dtype=np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def score(self, logits):
        z = np.asarray(logits, dtype=np.float64)
        return z[:, 1] - z[:, 0] if self.n_outputs == 2 else z

    def score_columns(self):
        return ["score"] if self.n_outputs == 2 else [f"score_{c}" for c in self.classes]

    def prediction_columns(self):
        return ["prob"] if self.n_outputs == 2 else [f"prob_{c}" for c in self.classes]

    def metrics(self, idx, pred):
        return compute_metrics(self.y[np.asarray(idx, dtype=np.int64)], pred, self.n_outputs)


# ------------------------------------------------------------------------------------------- survival

def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float | None:
    """Harrell's C-index: among comparable pairs (the shorter time is an observed event), the share where the
    shorter-lived bag has the higher risk; risk ties count 1/2, time ties with both events are not compared.
    ``None`` when no pair is comparable."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    r = np.asarray(risk, dtype=np.float64)
    conc = ties = total = 0.0
    for i in np.flatnonzero(e):
        comp = t > t[i]  # j outlived i, whose event was observed
        n = int(comp.sum())
        if not n:
            continue
        total += n
        conc += float((r[i] > r[comp]).sum())
        ties += float((r[i] == r[comp]).sum())
    return None if total == 0 else (conc + 0.5 * ties) / total


def time_bins(time: np.ndarray, event: np.ndarray, n_bins: int) -> list[float]:
    """Inner interval edges ``(n_bins - 1,)``: quantiles of the observed event times (all times if none)."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    src = t[e] if e.sum() >= n_bins else t
    if n_bins < 2 or len(src) == 0:
        return []
    return [float(v) for v in np.quantile(src, np.arange(1, n_bins) / n_bins)]


class SurvivalTask(Task):
    name = "survival"

    def __init__(self, loss: str = "nll", bin_edges: Sequence[float] | None = None, n_bins: int = 4,
                 time: np.ndarray | None = None, event: np.ndarray | None = None):
        if loss not in SURVIVAL_LOSSES:
            raise MILError(f"unknown survival loss {loss!r} (known: {', '.join(SURVIVAL_LOSSES)})")
        self.loss_name = loss
        self.time = None if time is None else np.asarray(time, dtype=np.float64)
        self.event = None if event is None else np.asarray(event, dtype=np.int64)
        if loss == "nll":
            if bin_edges is None:
                if self.time is None:
                    raise MILError("discrete-time survival needs bin edges or training times")
                bin_edges = time_bins(self.time, self.event, n_bins)
            self.bin_edges = [float(b) for b in bin_edges]
            self.n_outputs = len(self.bin_edges) + 1
        else:
            self.bin_edges = []
            self.n_outputs = 1

    def config(self) -> dict[str, Any]:
        return {"task": self.name, "loss": self.loss_name, "bin_edges": self.bin_edges}

    def bins(self, t: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.bin_edges), np.asarray(t, dtype=np.float64), side="right")

    def loss(self, logits, idx):
        torch = _torch()
        idx = np.asarray(idx, dtype=np.int64)
        logits = logits.float()
        ev = torch.as_tensor(self.event[idx], dtype=logits.dtype, device=logits.device)
        if self.loss_name == "cox":
            if ev.sum() == 0:
                return logits.sum() * 0.0  # no event in this batch: no information
            t = torch.as_tensor(self.time[idx], dtype=torch.float64, device=logits.device)
            r = logits[:, 0]
            order = torch.argsort(t, descending=True)  # risk sets are suffixes in descending time
            r, ev_o, t_o = r[order], ev[order], t[order]
            lse = torch.logcumsumexp(r, dim=0)
            # Breslow ties: every bag tied in time shares the risk set of the last tied bag.
            last = torch.searchsorted(-t_o, -t_o, right=True) - 1
            return -((r - lse[last]) * ev_o).sum() / ev_o.sum()
        b = torch.as_tensor(self.bins(self.time[idx]), dtype=torch.long, device=logits.device)
        log_h = torch.nn.functional.logsigmoid(logits)  # log hazard
        log_1mh = torch.nn.functional.logsigmoid(-logits)  # log (1 - hazard)
        cum = torch.cumsum(log_1mh, dim=1)  # log S_j
        log_s = torch.cat([torch.zeros_like(cum[:, :1]), cum], dim=1)  # log S_{j-1}, S_{-1} = 1
        rows = torch.arange(len(idx), device=logits.device)
        uncensored = -(log_s[rows, b] + log_h[rows, b])
        censored = -log_s[rows, b + 1]
        return (ev * uncensored + (1 - ev) * censored).mean()

    def predict(self, logits):
        z = np.asarray(logits, dtype=np.float64)
        if self.loss_name == "cox":
            return z[:, :1]
        s = np.cumprod(1.0 / (1.0 + np.exp(z)), axis=-1)  # S_j = Π (1 - sigmoid)
        return -s.sum(axis=-1, keepdims=True)

    def score(self, logits):
        return self.predict(logits)[:, 0]

    def score_columns(self):
        return ["score"]

    def prediction_columns(self):
        return ["risk"]

    def metrics(self, idx, pred):
        idx = np.asarray(idx, dtype=np.int64)
        c = concordance_index(self.time[idx], self.event[idx], np.asarray(pred)[:, 0])
        out: dict[str, Any] = {"c_index": c, "n_events": int(self.event[idx].sum())}
        if c is None:
            out["c_index_note"] = "no comparable pair (no observed event before another bag's time)"
        return out


# ------------------------------------------------------------------------------------------- regression

def pearson_r(a: np.ndarray, b: np.ndarray) -> float | None:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def r_squared(pred: np.ndarray, y: np.ndarray) -> float | None:
    """Coefficient of determination ``1 - Σ(y - p)² / Σ(y - ȳ)²`` (None for fewer than 2 or constant targets)."""
    p = np.asarray(pred, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ss_tot = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    if len(y) < 2 or ss_tot == 0:
        return None
    return 1.0 - float(((y - p) ** 2).sum()) / ss_tot


def check_bounds(bounds: Sequence[float] | None) -> tuple[float, float] | None:
    if bounds is None:
        return None
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise MILError(f"regression bounds must be two finite numbers LO < HI (got {list(bounds)})")
    return lo, hi


class RegressionTask(Task):
    name = "regression"
    n_outputs = 1

    def __init__(self, loss: str = "mse", mean: float | None = None, std: float | None = None,
                 target: np.ndarray | None = None, fit_idx: Sequence[int] | None = None,
                 bounds: Sequence[float] | None = None, threshold: float | None = None):
        if loss not in REGRESSION_LOSSES:
            raise MILError(f"unknown regression loss {loss!r} (known: {', '.join(REGRESSION_LOSSES)})")
        self.loss_name = loss
        self.target = None if target is None else np.asarray(target, dtype=np.float64)
        self.bounds = check_bounds(bounds)
        self.threshold = None if threshold is None else float(threshold)
        if self.bounds is not None and self.target is not None:
            lo, hi = self.bounds
            t = self.target if fit_idx is None else self.target[np.asarray(fit_idx, dtype=np.int64)]
            bad = int(((t < lo) | (t > hi)).sum())
            if bad:
                raise MILError(f"{bad} regression target(s) outside the bounds [{lo:g}, {hi:g}] "
                               f"(range {t.min():g} to {t.max():g})")
        if mean is None:
            t = self.target if fit_idx is None else self.target[np.asarray(fit_idx, dtype=np.int64)]
            mean, std = float(t.mean()), float(t.std())
        self.mean = float(mean)
        self.std = float(std) if std and math.isfinite(std) and std > 0 else 1.0

    def config(self) -> dict[str, Any]:
        cfg = {"task": self.name, "loss": self.loss_name, "target_mean": self.mean, "target_std": self.std}
        if self.bounds is not None:
            cfg["bounds"] = list(self.bounds)
        if self.threshold is not None:
            cfg["threshold"] = self.threshold
        return cfg

    def loss(self, logits, idx):
        torch = _torch()
        y = self.target[np.asarray(idx)]
        if self.bounds is not None:
            lo, hi = self.bounds
            z = torch.as_tensor((y - lo) / (hi - lo), dtype=torch.float32, device=logits.device)
            p = torch.sigmoid(logits.float()[:, 0])
        else:
            z = torch.as_tensor((y - self.mean) / self.std, dtype=torch.float32, device=logits.device)
            p = logits.float()[:, 0]
        if self.loss_name == "mae":
            return (p - z).abs().mean()
        return ((p - z) ** 2).mean()

    def predict(self, logits):
        z = np.asarray(logits, dtype=np.float64)[:, :1]
        if self.bounds is not None:
            lo, hi = self.bounds
            return lo + (hi - lo) / (1.0 + np.exp(-z))
        return z * self.std + self.mean

    def score(self, logits):
        return self.predict(logits)[:, 0]

    def prediction_columns(self):
        return ["pred"]

    def metrics(self, idx, pred):
        y = self.target[np.asarray(idx, dtype=np.int64)]
        p = np.asarray(pred, dtype=np.float64)[:, 0]
        out: dict[str, Any] = {"mse": float(np.mean((p - y) ** 2)) if len(y) else None,
                               "mae": float(np.mean(np.abs(p - y))) if len(y) else None,
                               "pearson_r": pearson_r(p, y), "r2": r_squared(p, y), "auc": None}
        if self.threshold is None:
            out["auc_note"] = "no --regression-threshold: AUC not computed"
        else:
            pos = y >= self.threshold
            if pos.all() or not pos.any():
                out["auc_note"] = (f"all {len(y)} test target(s) on one side of the threshold "
                                   f"{self.threshold:g}; AUC undefined")
            else:
                from sklearn.metrics import roc_auc_score

                out["auc"] = float(roc_auc_score(pos, p))
        return out


# ------------------------------------------------------------------------------------------- helpers

#: The metric each task reports first (and the key of ``mean`` in metrics.json that summarises a run).
PRIMARY_METRIC = {"classification": "auc", "survival": "c_index", "regression": "pearson_r"}
METRIC_KEYS = {"classification": ("auc", "balanced_accuracy", "accuracy", "f1"),
               "survival": ("c_index",),
               "regression": ("mse", "mae", "pearson_r", "r2", "auc")}


def task_from_config(cfg: dict[str, Any]) -> Task:
    """Rebuild a fold's task (for inference) from :meth:`Task.config`."""
    name = cfg.get("task", "classification")
    if name == "classification":
        return ClassificationTask(cfg["classes"], weights=cfg.get("class_weights"))
    if name == "survival":
        return SurvivalTask(cfg.get("loss", "nll"), bin_edges=cfg.get("bin_edges") or [])
    if name == "regression":
        return RegressionTask(cfg.get("loss", "mse"), mean=cfg["target_mean"], std=cfg["target_std"],
                              bounds=cfg.get("bounds"), threshold=cfg.get("threshold"))
    raise MILError(f"unknown task {name!r} in a model config")
