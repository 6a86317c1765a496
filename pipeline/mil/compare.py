"""Comparing finished MIL training runs: a table of every metric (mean ± s.d. over folds, per model) and
the curve data a report draws side by side, as plain Python data (lists, dicts, floats).

* :func:`comparison_rows` / :func:`write_comparison_csv`: one row per run with ``<metric>_mean``,
  ``<metric>_sd`` (sample standard deviation over the folds, ``ddof=1``; empty with one fold) and
  ``<metric>_n`` (folds where the metric is defined) for every metric of the task, plus whether the run
  used the same folds as the first run (``same_folds``, from the fold slide lists' SHA-256 in metrics.json).
* :func:`roc_curve_data`: ROC curves of a classification run from its out-of-fold ``predictions.csv``
  (binary: the positive class; multi-class: one-vs-rest per class), the predictions of all folds pooled.
* :func:`km_curve_data`: Kaplan-Meier curves of a survival run for a high- and a low-risk group, split at
  the median out-of-fold risk of each fold (each fold model's risks are on their own scale), with the
  log-rank test between the groups.
* :func:`comparison_curves`: the above for several runs, of one kind (ROC or Kaplan-Meier).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from . import MILError

__all__ = ["load_run", "comparison_rows", "write_comparison_csv", "markdown_table", "roc_curve_data",
           "kaplan_meier", "logrank_test", "km_curve_data", "comparison_curves"]


def load_run(run: str | os.PathLike) -> dict[str, Any]:
    """metrics.json of a finished training run (MILError naming the file otherwise)."""
    path = Path(run) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MILError(f"{path}: not found (training did not finish here)") from None
    except ValueError as exc:
        raise MILError(f"{path}: unreadable ({exc})") from None


def _metric_keys(metrics: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for m in metrics:
        for k in m.get("mean", {}):
            if not k.endswith("_note") and k not in keys:
                keys.append(k)
    return keys


def comparison_rows(runs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """One dict per run: run, model, task, mode, n_bags, n_folds, same_folds and, per metric, mean / sd / n."""
    ms = [load_run(r) for r in runs]
    keys = _metric_keys(ms)
    ref = ms[0].get("splits_sha256") if ms else None
    rows = []
    for r, m in zip(runs, ms):
        folds = m.get("folds", [])
        row: dict[str, Any] = {"run": str(r), "model": m.get("model"), "task": m.get("task"),
                               "mode": m.get("mode"), "n_bags": m.get("n_bags"), "n_folds": len(folds),
                               "same_folds": (None if ref is None or m.get("splits_sha256") is None
                                              else m.get("splits_sha256") == ref)}
        for k in keys:
            vals = np.array([f[k] for f in folds if f.get(k) is not None], dtype=np.float64)
            row[f"{k}_mean"] = float(vals.mean()) if len(vals) else None
            row[f"{k}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else None
            row[f"{k}_n"] = int(len(vals))
        rows.append(row)
    return rows


def write_comparison_csv(runs: Sequence[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """Write :func:`comparison_rows` as CSV (atomically); returns the table."""
    from .train import write_csv_atomic

    df = pd.DataFrame(comparison_rows(runs))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(df, out)
    return df


def markdown_table(runs: Sequence[str | os.PathLike]) -> str:
    """Markdown table: one row per run (model, task, mode, bags, mean ± s.d. over folds of every metric)."""
    rows = comparison_rows(runs)
    keys = [c[:-len("_mean")] for c in rows[0] if c.endswith("_mean")] if rows else []
    out = ["| run | model | task | mode | bags | " + " | ".join(keys) + " |", "|---" * (5 + len(keys)) + "|"]
    for row in rows:
        cells = []
        for k in keys:
            mean, sd = row[f"{k}_mean"], row[f"{k}_sd"]
            cells.append("n/a" if mean is None else f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}")
        out.append(f"| {row['run']} | {row['model']} | {row['task']} | {row['mode']} | {row['n_bags']} | "
                   + " | ".join(cells) + " |")
    if any(r["same_folds"] is False for r in rows):
        out.append("")
        out.append("Warning: not every run used the folds of the first run ("
                   + ", ".join(r["run"] for r in rows if r["same_folds"] is False) + "); their metrics are not "
                   "paired fold by fold.")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ curves

def _predictions(run: str | os.PathLike) -> pd.DataFrame:
    path = Path(run) / "predictions.csv"
    try:
        return pd.read_csv(path, dtype={"slide_id": str})
    except FileNotFoundError:
        raise MILError(f"{path}: not found (training did not finish here)") from None
    except (ValueError, pd.errors.ParserError) as exc:
        raise MILError(f"{path}: unreadable ({exc})") from None


def _same(label: Any, cls: Any) -> bool:
    if str(label) == str(cls):
        return True
    try:
        return float(label) == float(cls)
    except (TypeError, ValueError):
        return False


def roc_curve_data(run: str | os.PathLike) -> list[dict[str, Any]]:
    """ROC curves ``[{"name", "fpr", "tpr", "auc", "n_pos", "n_neg"}]`` from a classification run's
    out-of-fold predictions (binary: one curve; multi-class: one-vs-rest per class with both present)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    m = load_run(run)
    if m.get("task", "classification") != "classification":
        raise MILError(f"{run}: a {m.get('task')} run has no ROC curve")
    df = _predictions(run)
    classes = list(m.get("classes") or [])
    if "prob" in df.columns:
        pos = m.get("positive_class", classes[1] if len(classes) == 2 else 1)
        pairs = [(f"{pos}", [_same(v, pos) for v in df["label"]], df["prob"].to_numpy(dtype=np.float64))]
    else:
        pairs = [(f"{c} vs rest", [_same(v, c) for v in df["label"]], df[f"prob_{c}"].to_numpy(dtype=np.float64))
                 for c in classes if f"prob_{c}" in df.columns]
    out = []
    for name, y, p in pairs:
        y = np.asarray(y, dtype=bool)
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, p)
        out.append({"name": name, "fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(roc_auc_score(y, p)),
                    "n_pos": int(y.sum()), "n_neg": int((~y).sum())})
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


def km_curve_data(run: str | os.PathLike) -> dict[str, Any]:
    """Kaplan-Meier curves of a survival run's slides split into a high- and a low-risk group at the median
    out-of-fold risk of each fold (risk above the median = high), with the log-rank test."""
    m = load_run(run)
    if m.get("task") != "survival":
        raise MILError(f"{run}: Kaplan-Meier curves need a survival run (this one is {m.get('task')})")
    df = _predictions(run)
    for c in ("time", "event", "risk"):
        if c not in df.columns:
            raise MILError(f"{Path(run) / 'predictions.csv'}: no {c!r} column")
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


def comparison_curves(runs: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """``{"kind": "roc" | "km", "runs": [{"run", "model", "curves"}]}``: ROC curves (classification) or
    Kaplan-Meier curves by predicted risk group (survival) of every run; regression runs have none
    (``kind`` None). Runs of different tasks are refused."""
    ms = [load_run(r) for r in runs]
    tasks = {m.get("task") for m in ms}
    if len(tasks) > 1:
        raise MILError(f"cannot compare runs of different tasks: {', '.join(sorted(map(str, tasks)))}")
    task = tasks.pop() if tasks else None
    kind = {"classification": "roc", "survival": "km"}.get(task)
    out = []
    for r, m in zip(runs, ms):
        curves: Any = roc_curve_data(r) if kind == "roc" else km_curve_data(r) if kind == "km" else None
        out.append({"run": str(r), "model": m.get("model"), "curves": curves})
    return {"kind": kind, "task": task, "runs": out}
