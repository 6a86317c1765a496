"""Cross-validated MIL training and evaluation.

k-fold CV stratified by label and grouped by patient (when the labels CSV has ``patient_id``); inside each
training fold a validation split (stratified, grouped) drives early stopping on the validation loss and the
best weights are restored. One bag per step, AdamW, cosine learning-rate schedule over the epochs,
class-weighted cross-entropy, fixed seeds. ``folds=1`` trains a single model on all bags; its metrics and
predictions then come from the internal validation split (``"mode": "single"`` in metrics.json).

Outputs in ``out_dir`` (each written atomically; ``metrics.json`` last, so its presence means training
finished): ``fold_{k}/model.pt``, ``predictions.csv``, ``model_config.json``, ``metrics.json``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .. import STAGE_VERSIONS, __version__
from ..provenance import atomic_path, provenance, sha256_file, write_json_atomic
from . import MILError, create_model, resolve_model_kwargs
from .data import MILDataset, load_dataset

log = logging.getLogger("pipeline.mil")

STAGE = "mil"


# ----------------------------------------------------------------------------------------------- utils

def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def pick_device(device: str | None = None):
    import torch

    if device:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise MILError(f"--device {device!r}: {exc}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise MILError(f"--device {device!r}: CUDA is not available on this machine")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device):
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------- splits

def cv_splits(y: Sequence[int], groups: Sequence[Any] | None = None, n_folds: int = 5,
              seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` (train_idx, test_idx) pairs, stratified by ``y`` and grouped by ``groups`` if given.

    Uses ``StratifiedGroupKFold`` with groups (no group is split across train and test), else
    ``StratifiedKFold``; both shuffled with ``seed``.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y)
    n_units = len(set(groups)) if groups is not None else len(y)
    unit = "patients" if groups is not None else "bags"
    if n_folds < 2:
        raise MILError(f"cv_splits needs n_folds >= 2 (got {n_folds})")
    if n_folds > n_units:
        raise MILError(f"cannot make {n_folds} folds from {n_units} {unit}; use --folds <= {n_units}")
    X = np.zeros((len(y), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only k members"
        try:
            if groups is not None:
                splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
                splits = list(splitter.split(X, y, np.asarray(groups)))
            else:
                splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
                splits = list(splitter.split(X, y))
        except ValueError as exc:
            raise MILError(f"cannot make {n_folds} stratified folds: {exc}") from None
    out = [(np.sort(tr), np.sort(te)) for tr, te in splits]
    for k, (tr, te) in enumerate(out):
        if len(te) == 0 or len(tr) == 0:
            raise MILError(f"fold {k} would be empty with {n_folds} folds; use fewer folds")
    return out


def holdout_split(idx: Sequence[int], y: Sequence[int], groups: Sequence[Any] | None = None,
                  val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split dataset indices ``idx`` into (train, val) with about ``val_fraction`` in val.

    Stratified by ``y`` and grouped by ``groups`` (both indexed by dataset index, like ``idx``).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    idx = np.asarray(idx)
    y = np.asarray(y)
    if not 0 < val_fraction < 1:
        raise MILError(f"val_fraction must be in (0, 1) (got {val_fraction})")
    g = np.asarray(groups)[idx] if groups is not None else idx.copy()
    n_units = len(set(g.tolist()))
    if n_units < 2:
        raise MILError(f"cannot hold out a validation split from {len(idx)} bag(s) of a single "
                       f"{'patient' if groups is not None else 'bag'}")
    # StratifiedGroupKFold's first fold is the validation split; it needs >= n_splits groups and some class
    # with >= n_splits members, so tiny training folds fall back to a seeded random split of the groups.
    counts = np.bincount(y[idx]) if len(idx) else np.array([0])
    n_splits = min(max(2, int(round(1.0 / val_fraction))), n_units, int(counts.max()))
    tr = va = None
    if n_splits >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                tr, va = next(iter(splitter.split(np.zeros((len(idx), 1)), y[idx], g)))
            except ValueError:
                tr = va = None
    if tr is None or len(tr) == 0 or len(va) == 0:
        units = np.array(sorted(set(g.tolist())), dtype=object)
        rng = np.random.default_rng(seed)
        n_val = min(max(1, int(round(val_fraction * n_units))), n_units - 1)
        val_units = set(rng.permutation(units)[:n_val].tolist())
        is_val = np.array([u in val_units for u in g.tolist()])
        tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    return np.sort(idx[tr]), np.sort(idx[va])


# ----------------------------------------------------------------------------------------------- metrics

def compute_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, Any]:
    """AUC (binary; one-vs-rest macro over the classes present for multi-class), balanced accuracy, accuracy."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

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
    out["accuracy"] = float(accuracy_score(y, pred))
    return out


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced class weights ``n / (C * count_c)`` (1 for classes absent from ``y``)."""
    counts = np.bincount(np.asarray(y), minlength=n_classes).astype(np.float64)
    w = np.ones(n_classes)
    nz = counts > 0
    w[nz] = counts[nz].sum() / (nz.sum() * counts[nz])
    return w


# ----------------------------------------------------------------------------------------------- loops

def evaluate(model, ds: MILDataset, idx: Sequence[int], device, loss_fn=None) -> tuple[np.ndarray, float | None]:
    """Class probabilities ``(len(idx), C)`` and (with ``loss_fn``) the mean loss over the bags."""
    import torch

    model.eval()
    probs = np.zeros((len(idx), ds.n_classes), dtype=np.float64)
    total = 0.0
    with torch.inference_mode():
        for j, i in enumerate(idx):
            with _autocast(device):
                out = model(ds.tensor(i, device))
            logits = out["logits"].float()
            probs[j] = torch.softmax(logits, dim=-1).cpu().numpy()
            if loss_fn is not None:
                target = torch.tensor([int(ds.y[i])], device=device)
                total += float(loss_fn(logits.unsqueeze(0), target))
    loss = total / len(idx) if (loss_fn is not None and len(idx)) else None
    return probs, loss


def fit(model, ds: MILDataset, train_idx: Sequence[int], val_idx: Sequence[int], *, epochs: int, lr: float,
        weight_decay: float, patience: int, seed: int, device, tag: str = "") -> dict[str, Any]:
    """Train ``model`` in place with early stopping on the validation loss; restores the best weights."""
    import torch

    train_idx = [int(i) for i in train_idx]
    empty = [ds.slide_ids[i] for i in train_idx if ds.n_instances(i) == 0]
    if empty:
        log.info("%sskipping %d empty bag(s) in training: %s", tag, len(empty), ", ".join(empty[:10]))
    steps = [i for i in train_idx if ds.n_instances(i) > 0]
    if not steps:
        raise MILError(f"{tag}no non-empty bags to train on")
    weights = torch.tensor(class_weights(ds.y[train_idx], ds.n_classes), dtype=torch.float32, device=device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    rng = np.random.default_rng(seed)
    uses_label = bool(getattr(model, "uses_label", False))
    best = {"loss": math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    history = []
    since = 0
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.monotonic()
        total = 0.0
        for i in rng.permutation(steps):
            x = ds.tensor(int(i), device)
            target = torch.tensor([int(ds.y[i])], device=device)
            with _autocast(device):
                out = model(x, label=target[0]) if uses_label else model(x)
            loss = loss_fn(out["logits"].float().unsqueeze(0), target)
            if out.get("aux_loss") is not None:
                loss = loss + out["aux_loss"].float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        sched.step()
        train_loss = total / len(steps)
        _, val_loss = evaluate(model, ds, val_idx, device, loss_fn)
        improved = val_loss < best["loss"]
        if improved:
            best = {"loss": val_loss, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            since = 0
        else:
            since += 1
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        log.info("%sepoch %d/%d train_loss %.4f val_loss %.4f%s (%.1fs)", tag, epoch, epochs, train_loss,
                 val_loss, " *" if improved else "", time.monotonic() - t0)
        if since >= patience:
            log.info("%searly stop at epoch %d (best epoch %d, val_loss %.4f)", tag, epoch, best["epoch"],
                     best["loss"])
            break
    model.load_state_dict(best["state"])
    return {"best_epoch": best["epoch"], "best_val_loss": best["loss"], "epochs_run": len(history),
            "history": history}


# ----------------------------------------------------------------------------------------------- driver

def _pred_frame(ds: MILDataset, idx: Sequence[int], probs: np.ndarray, with_label: bool = True) -> pd.DataFrame:
    cols: dict[str, Any] = {"slide_id": [ds.slide_ids[i] for i in idx]}
    if with_label:
        cols["label"] = [ds.labels[i] for i in idx]
    if ds.n_classes == 2:
        cols["prob"] = probs[:, 1]
    else:
        cols["pred"] = [ds.classes[k] for k in probs.argmax(axis=1)]
        for c, name in enumerate(ds.classes):
            cols[f"prob_{name}"] = probs[:, c]
    return pd.DataFrame(cols)


def write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def train(bags: Iterable[str | os.PathLike], labels: str | os.PathLike, out_dir: str | os.PathLike, *,
          model: str = "abmil", folds: int = 5, seed: int = 0, epochs: int = 50, lr: float = 2e-4,
          weight_decay: float = 1e-4, patience: int = 10, val_fraction: float = 0.2,
          model_kwargs: dict[str, Any] | None = None, device: str | None = None) -> dict[str, Any]:
    """Load bags + labels and run :func:`train_dataset`; returns the metrics dict (also in metrics.json)."""
    bags = [Path(b) for b in bags]
    # Validate the settings before the (possibly slow) bag loading.
    model_kwargs = resolve_model_kwargs(model, **(model_kwargs or {}))
    _check_settings(folds, epochs, lr, weight_decay, patience, val_fraction)
    ds = load_dataset(bags, labels)
    inputs = {"labels": str(labels), "labels_sha256": sha256_file(labels), "bags": [str(b) for b in bags]}
    return train_dataset(ds, out_dir, model=model, folds=folds, seed=seed, epochs=epochs, lr=lr,
                         weight_decay=weight_decay, patience=patience, val_fraction=val_fraction,
                         model_kwargs=model_kwargs, device=device, inputs=inputs)


def _check_settings(folds, epochs, lr, weight_decay, patience, val_fraction) -> None:
    if folds < 1:
        raise MILError(f"--folds must be >= 1 (got {folds})")
    if epochs < 1:
        raise MILError(f"--epochs must be >= 1 (got {epochs})")
    if not lr > 0:
        raise MILError(f"--lr must be > 0 (got {lr})")
    if weight_decay < 0:
        raise MILError(f"--weight-decay must be >= 0 (got {weight_decay})")
    if patience < 1:
        raise MILError(f"--patience must be >= 1 (got {patience})")
    if not 0 < val_fraction < 1:
        raise MILError(f"--val-fraction must be in (0, 1) (got {val_fraction})")


def train_dataset(ds: MILDataset, out_dir: str | os.PathLike, *, model: str = "abmil", folds: int = 5,
                  seed: int = 0, epochs: int = 50, lr: float = 2e-4, weight_decay: float = 1e-4,
                  patience: int = 10, val_fraction: float = 0.2, model_kwargs: dict[str, Any] | None = None,
                  device: str | None = None, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cross-validate (or, with ``folds=1``, train one model) on an in-memory dataset; write the outputs."""
    import torch

    _check_settings(folds, epochs, lr, weight_decay, patience, val_fraction)
    model_kwargs = resolve_model_kwargs(model, **(model_kwargs or {}))
    dev = pick_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)  # its presence must mean "this run finished"
    single = folds == 1
    if single:
        splits = [(np.arange(len(ds)), np.array([], dtype=np.int64))]
    else:
        splits = cv_splits(ds.y, ds.groups, folds, seed)
    params = {"model": model, "model_kwargs": model_kwargs, "folds": folds, "seed": seed, "epochs": epochs,
              "lr": lr, "weight_decay": weight_decay, "patience": patience, "val_fraction": val_fraction,
              "batch_size": 1, "optimizer": "AdamW", "schedule": "cosine", "loss": "class-weighted cross-entropy",
              "split": "StratifiedGroupKFold by patient_id" if ds.groups is not None else "StratifiedKFold",
              "device": str(dev)}
    base = {"model": model, "model_kwargs": model_kwargs, "in_dim": ds.in_dim, "n_classes": ds.n_classes,
            "classes": ds.classes, "task": "classification", "feature_attrs": ds.feature_attrs}
    log.info("%d bags, classes %s (counts %s), %s, device %s", len(ds), ds.classes,
             np.bincount(ds.y, minlength=ds.n_classes).tolist(),
             "single model" if single else f"{folds}-fold CV", dev)
    empty = [s for i, s in enumerate(ds.slide_ids) if ds.n_instances(i) == 0]
    if empty:
        log.warning("%d empty bag(s) (no patches) are skipped in training and predicted from the model's prior "
                    "when evaluated: %s", len(empty), ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
    fold_rows, oof_idx, oof_probs = [], [], []
    for k, (trval, test) in enumerate(splits):
        tag = f"fold {k + 1}/{len(splits)} "
        fold_seed = seed * 1000 + k
        tr, va = holdout_split(trval, ds.y, ds.groups, val_fraction, fold_seed)
        set_seed(fold_seed)
        net = create_model(model, ds.in_dim, ds.n_classes, **model_kwargs)
        info = fit(net, ds, tr, va, epochs=epochs, lr=lr, weight_decay=weight_decay, patience=patience,
                   seed=fold_seed, device=dev, tag=tag)
        eval_idx = va if single else test
        probs, _ = evaluate(net, ds, eval_idx, dev)
        m = compute_metrics(ds.y[eval_idx], probs, ds.n_classes)
        row = {"fold": k, "n_train": int(len(tr)), "n_val": int(len(va)), "n_test": int(len(test)),
               "auc": m["auc"], "balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"],
               "best_epoch": info["best_epoch"], "best_val_loss": info["best_val_loss"],
               "epochs_run": info["epochs_run"]}
        if "auc_note" in m:
            row["auc_note"] = m["auc_note"]
        if single:
            row["evaluated_on"] = "validation"
        fold_rows.append(row)
        oof_idx.extend(int(i) for i in eval_idx)
        oof_probs.append(probs)
        auc_s = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
        log.info("%sAUC %s balanced_accuracy %.3f accuracy %.3f (best epoch %d)", tag, auc_s,
                 m["balanced_accuracy"], m["accuracy"], info["best_epoch"])
        ckpt = {"state_dict": {n: t.detach().cpu() for n, t in net.state_dict().items()},
                "config": {**base, "fold": k, "best_epoch": info["best_epoch"],
                           "train_slides": [ds.slide_ids[i] for i in tr],
                           "val_slides": [ds.slide_ids[i] for i in va],
                           "test_slides": [ds.slide_ids[i] for i in test]}}
        path = out_dir / f"fold_{k}" / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)

    order = np.argsort(np.asarray(oof_idx), kind="stable")
    idx = np.asarray(oof_idx)[order]
    probs = np.concatenate(oof_probs, axis=0)[order]
    write_csv_atomic(_pred_frame(ds, idx, probs), out_dir / "predictions.csv")

    config = {**base, "mode": "single" if single else "cv",
              "folds": [{"fold": r["fold"], "path": f"fold_{r['fold']}/model.pt"} for r in fold_rows],
              "pipeline_version": __version__, "stage_version": STAGE_VERSIONS.get(STAGE)}
    write_json_atomic(out_dir / "model_config.json", config)

    def _mean(key):
        vals = [r[key] for r in fold_rows if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    metrics = {"folds": fold_rows,
               "mean": {"auc": _mean("auc"), "balanced_accuracy": _mean("balanced_accuracy"),
                        "accuracy": _mean("accuracy")},
               "classes": ds.classes, "task": "classification", "model": model,
               "mode": "single" if single else "cv"}
    if single:
        metrics["note"] = ("--folds 1: one model trained on all bags; metrics and predictions.csv come from its "
                           "internal validation split (also used for early stopping, so they are optimistic)")
    n_null = sum(r["auc"] is None for r in fold_rows)
    if n_null:
        metrics["mean"]["auc_note"] = f"mean over {len(fold_rows) - n_null} of {len(fold_rows)} folds (AUC undefined in the others)"
    if ds.n_classes == 2:
        metrics["positive_class"] = ds.classes[1]
    metrics["n_bags"] = len(ds)
    metrics["params"] = params
    metrics["provenance"] = provenance(STAGE, params, inputs=inputs or {},
                                       feature_attrs=ds.feature_attrs, n_bags=len(ds))
    write_json_atomic(out_dir / "metrics.json", metrics)
    mean = metrics["mean"]
    log.info("mean AUC %s balanced_accuracy %.3f accuracy %.3f -> %s",
             "n/a" if mean["auc"] is None else f"{mean['auc']:.3f}", mean["balanced_accuracy"], mean["accuracy"],
             out_dir / "metrics.json")
    return metrics
