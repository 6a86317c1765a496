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
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..curves import CurveError, kaplan_meier, km_groups, logrank_test, read_predictions, roc_curves
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
    try:
        return read_predictions(Path(run) / "predictions.csv")
    except CurveError as exc:
        raise MILError(str(exc)) from None


def roc_curve_data(run: str | os.PathLike) -> list[dict[str, Any]]:
    """ROC curves ``[{"name", "fpr", "tpr", "auc", "n_pos", "n_neg"}]`` from a classification run's
    out-of-fold predictions (binary: one curve; multi-class: one-vs-rest per class with both present)."""
    m = load_run(run)
    if m.get("task", "classification") != "classification":
        raise MILError(f"{run}: a {m.get('task')} run has no ROC curve")
    return roc_curves(_predictions(run), m)


def km_curve_data(run: str | os.PathLike) -> dict[str, Any]:
    """Kaplan-Meier curves of a survival run's slides split into a high- and a low-risk group at the median
    out-of-fold risk of each fold (risk above the median = high), with the log-rank test."""
    m = load_run(run)
    if m.get("task") != "survival":
        raise MILError(f"{run}: Kaplan-Meier curves need a survival run (this one is {m.get('task')})")
    try:
        return km_groups(_predictions(run), str(Path(run) / "predictions.csv"))
    except CurveError as exc:
        raise MILError(str(exc)) from None


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
