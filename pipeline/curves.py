"""Curves of a MIL run's out-of-fold predictions, as plain data: ROC (classification) and Kaplan-Meier by
predicted risk group with the log-rank test (survival). One home for the MIL comparison
(:mod:`pipeline.mil.compare`) and the QC report (:mod:`pipeline.report`); numpy, pandas and scikit-learn
only (no torch), so the report does not pay for the models.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["same_label", "roc", "roc_curves", "kaplan_meier", "logrank_test", "km_groups", "read_predictions"]


class CurveError(ValueError):
    """Predictions that cannot give a curve (missing file or columns); the message names the file."""


def read_predictions(path: str | os.PathLike):
    """An out-of-fold ``predictions.csv`` as a DataFrame (``slide_id`` kept as text)."""
    import pandas as pd

    path = Path(path)
    try:
        return pd.read_csv(path, dtype={"slide_id": str})
    except FileNotFoundError:
        raise CurveError(f"{path}: not found (training did not finish here)") from None
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CurveError(f"{path}: unreadable ({exc})") from None


def same_label(label: Any, cls: Any) -> bool:
    """A label equals a class, as text or as a number (``1`` == ``1.0``)."""
    if str(label) == str(cls):
        return True
    try:
        return float(label) == float(cls)
    except (TypeError, ValueError):
        return False


def roc(y_true: Sequence[Any], score: Sequence[float]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(fpr, tpr, auc) of binary labels (truthy = positive) and scores, every threshold kept (tied scores
    form one diagonal step, so the area is the Mann-Whitney AUC); None when a class is absent."""
    from sklearn.metrics import auc, roc_curve

    y = np.asarray(list(y_true), dtype=bool)
    s = np.asarray(list(score), dtype=np.float64)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, float(auc(fpr, tpr))


def roc_curves(df, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """ROC curves ``[{"name", "fpr", "tpr", "auc", "n_pos", "n_neg"}]`` of a classification run's pooled
    out-of-fold predictions: binary (``prob``: the positive class, named by it) or one-vs-rest per class
    (``prob_<class>``, named ``<class> vs rest``). A curve needs both positives and negatives; scikit-learn's
    ``roc_curve`` with every threshold kept (tied scores are one diagonal step, so the area is the AUC)."""
    classes = list(metrics.get("classes") or [])
    if "prob" in df.columns:
        pos = metrics.get("positive_class", classes[1] if len(classes) == 2 else 1)
        pairs = [(f"{pos}", [same_label(v, pos) for v in df["label"]], df["prob"])]
    else:
        cols = [c for c in df.columns if str(c).startswith("prob_")]
        pairs = [(f"{c[len('prob_'):]} vs rest", [same_label(v, c[len("prob_"):]) for v in df["label"]], df[c])
                 for c in cols]
    out = []
    for name, y, p in pairs:
        res = roc(y, p)
        if res is None:
            continue
        yy = np.asarray(y, dtype=bool)
        out.append({"name": name, "fpr": res[0].tolist(), "tpr": res[1].tolist(), "auc": res[2],
                    "n_pos": int(yy.sum()), "n_neg": int((~yy).sum())})
    return out


def kaplan_meier(time: Sequence[float], event: Sequence[int]) -> dict[str, Any]:
    """Product-limit estimate: step function ``time`` / ``survival`` (starting at (0, 1)), the number at
    risk before each step, and the censoring times."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    times, surv, at_risk = [0.0], [1.0], [int(len(t))]
    s = 1.0
    for u in np.unique(t[e]):
        n = int((t >= u).sum())
        d = int(((t == u) & e).sum())
        s *= 1.0 - d / n
        times.append(float(u))
        surv.append(float(s))
        at_risk.append(n)
    return {"time": times, "survival": surv, "at_risk": at_risk, "censored": sorted(float(v) for v in t[~e]),
            "n": int(len(t)), "events": int(e.sum())}


def logrank_test(time: Sequence[float], event: Sequence[int], group: Sequence[bool]) -> dict[str, float | None]:
    """Two-group log-rank test: chi-square statistic (1 degree of freedom) and its p-value."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    g = np.asarray(group).astype(bool)
    o_minus_e, var = 0.0, 0.0
    for u in np.unique(t[e]):
        at = t >= u
        n, n1 = int(at.sum()), int((at & g).sum())
        d = int(((t == u) & e).sum())
        d1 = int(((t == u) & e & g).sum())
        if n < 2:
            continue
        o_minus_e += d1 - d * n1 / n
        var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    if var <= 0:
        return {"chi2": None, "p": None}
    chi2 = o_minus_e ** 2 / var
    return {"chi2": float(chi2), "p": float(math.erfc(math.sqrt(chi2 / 2.0)))}


def km_groups(df, source: str = "predictions.csv") -> dict[str, Any]:
    """Kaplan-Meier curves of a survival run's slides split into a high- and a low-risk group at the median
    out-of-fold risk of each fold (each fold model's risks are on their own scale), with the log-rank test."""
    for c in ("time", "event", "risk"):
        if c not in df.columns:
            raise CurveError(f"{source}: no {c!r} column")
    risk = df["risk"].to_numpy(dtype=np.float64)
    high = np.zeros(len(df), dtype=bool)
    if "fold" in df.columns:
        for _, idx in df.groupby("fold").indices.items():
            high[idx] = risk[idx] > np.median(risk[idx])
        how = "median of each fold's out-of-fold risk"
    else:
        high = risk > np.median(risk)
        how = "median of the pooled out-of-fold risk"
    t, e = df["time"].to_numpy(dtype=np.float64), df["event"].to_numpy(dtype=np.int64)
    groups = [{"name": "high risk", **kaplan_meier(t[high], e[high])},
              {"name": "low risk", **kaplan_meier(t[~high], e[~high])}]
    return {"groups": groups, "split": how, "logrank": logrank_test(t, e, high)}
