"""Cross-validated MIL training and evaluation.

k-fold CV stratified by label (survival: by event; regression: by target quantile bin) and grouped by patient
(when the labels CSV has ``patient_id``; without it a warning, in the log and in metrics.json), or the fixed
train/val/test split of a ``split`` column; inside each training fold a validation split (stratified,
grouped; the split column's ``val`` rows when it has them) selects the checkpoint (lowest validation loss,
or highest validation AUC + F1) and drives early stopping. Each model trains with its paper's recipe from
the registry (optimiser, betas, learning rate, weight decay, schedule, epoch budget, patience, minimum
epochs, selection, batch size; :func:`resolve_recipe`), each setting overridable; class imbalance handled
by a class-weighted loss or a class-balanced sampler, an optional random cap on the instances per bag
during training, optional feature standardisation fitted on the training bags of each fold (out of core,
:mod:`pipeline.mil.cohort`), the optional attention-entropy term of AEM, fixed seeds, a torch thread count,
the GPU when there is one (bf16 autocast on CUDA). Everything fitted on data (class weights, survival time
bins, regression scaling, standardisation) comes from the training part of the fold only. ``folds=1``
trains a single model on all bags; its metrics and predictions then come from the internal validation split
(``"mode": "single"`` in metrics.json).

Outputs in ``out_dir`` (each written atomically; ``metrics.json`` last, so its presence means training
finished): ``fold_{k}/model.pt``, ``predictions.csv`` (out-of-fold, with the ``fold`` each row was tested
in), ``model_config.json``, ``metrics.json`` (per-fold and mean metrics, the slide lists of every fold and
their hash, warnings, parameters, provenance).
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
from ..files import atomic_path, sha256_file, write_json_atomic
from ..provenance import provenance
from . import MILError, call_model, create_model, model_defaults, resolve_model_kwargs
from .data import MILDataset, load_dataset
from .tasks import (METRIC_KEYS, PRIMARY_METRIC, REGRESSION_LOSSES, SURVIVAL_LOSSES, ClassificationTask,
                    RegressionTask, SurvivalTask, Task, check_bounds, class_weights, compute_metrics, time_bins)

log = logging.getLogger("pipeline.mil")

STAGE = "mil"


# ----------------------------------------------------------------------------------------------- utils

def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def pick_device(device: str | None = None):
    """``torch.device(device)``; ``None`` or ``"auto"``: the GPU when CUDA is available, else the CPU."""
    import torch

    if device and device != "auto":
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

_SPLIT_TRIES = 32  # seeded group orders compared for the best-stratified grouped split


def _imbalance(y: np.ndarray, tests: Sequence[np.ndarray]) -> float:
    """How far the class counts of the test parts are from proportional (0 = perfectly stratified); a part
    missing a class that it could hold costs extra."""
    classes, totals = np.unique(y, return_counts=True)
    k = len(tests)
    cost = 0.0
    for te in tests:
        counts = np.array([(y[te] == c).sum() for c in classes], dtype=np.float64)
        expected = totals * len(te) / len(y)
        cost += float(((counts - expected) ** 2).sum())
        cost += 10.0 * float(((counts == 0) & (totals >= k)).sum())
    return cost


def grouped_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``StratifiedGroupKFold`` (no shuffle) over the groups relabelled in a seeded random order.

    scikit-learn's own ``shuffle=True`` permutes the per-group class counts without the group ids (so it
    either changes nothing, when groups have the same class mix, or stratifies with the wrong counts; seen
    in scikit-learn 1.6); its greedy assignment visits groups in id order among ties, so a random relabelling
    is the shuffle that keeps the counts right.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    codes = np.random.default_rng(seed).permutation(int(inv.max()) + 1)[inv]
    return list(StratifiedGroupKFold(n_splits=n_splits).split(np.zeros((len(y), 1)), y, codes))


def cv_splits(y: Sequence[int], groups: Sequence[Any] | None = None, n_folds: int = 5,
              seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` (train_idx, test_idx) pairs, stratified by ``y`` and grouped by ``groups`` if given.

    With groups: ``StratifiedGroupKFold`` (no group is split across train and test) over seeded random
    orders of the groups (:func:`grouped_folds`); its greedy assignment can stratify poorly on small
    cohorts, so several seeded orders are compared and the best-stratified one is kept (deterministic for a
    given ``seed``). Without groups: ``StratifiedKFold`` shuffled with
    ``seed``.
    """
    from sklearn.model_selection import StratifiedKFold

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
                g = np.asarray(groups)
                best, best_cost = None, math.inf
                for t in range(_SPLIT_TRIES):
                    cand = grouped_folds(y, g, n_folds, seed * 7919 + t)
                    if any(len(te) == 0 for _, te in cand):
                        continue
                    cost = _imbalance(y, [te for _, te in cand])
                    if cost < best_cost - 1e-9:
                        best, best_cost = cand, cost
                splits = best if best is not None else grouped_folds(y, g, n_folds, seed)
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

    Stratified by ``y`` and grouped by ``groups`` (both indexed by dataset index, like ``idx``); among
    several seeded candidates the one closest to ``val_fraction`` with the best class balance is kept.
    """
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
        yy = y[idx]
        best_cost = math.inf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for t in range(_SPLIT_TRIES if groups is not None else 1):
                try:
                    cands = grouped_folds(yy, g, n_splits, seed * 7919 + t)
                except ValueError:
                    continue
                for ctr, cva in cands:  # any fold can be the validation part
                    if len(ctr) == 0 or len(cva) == 0:
                        continue
                    cost = _imbalance(yy, [cva]) + (len(cva) - val_fraction * len(idx)) ** 2
                    if cost < best_cost - 1e-9:
                        tr, va, best_cost = ctr, cva, cost
    if tr is None or len(tr) == 0 or len(va) == 0:
        units = np.array(sorted(set(g.tolist())), dtype=object)
        rng = np.random.default_rng(seed)
        n_val = min(max(1, int(round(val_fraction * n_units))), n_units - 1)
        val_units = set(rng.permutation(units)[:n_val].tolist())
        is_val = np.array([u in val_units for u in g.tolist()])
        tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    return np.sort(idx[tr]), np.sort(idx[va])


# ----------------------------------------------------------------------------------------------- settings

BALANCE = ("loss", "sampler", "none")
__all__ = ["cv_splits", "holdout_split", "fit", "evaluate", "train", "train_dataset", "compute_metrics",
           "class_weights", "make_task", "fold_feature_stats", "resolve_recipe", "split_record", "torch_threads",
           "pick_device", "AEM_LAMBDA"]


def make_task(ds: MILDataset, fit_idx: Sequence[int], *, balance: str = "loss", survival_loss: str = "nll",
              n_bins: int = 4, regression_loss: str = "mse", regression_bounds: Sequence[float] | None = None,
              regression_threshold: float | None = None) -> Task:
    """The task of one training fold (class weights, survival intervals, target scaling from ``fit_idx``)."""
    fit_idx = np.asarray(fit_idx, dtype=np.int64)
    if ds.task == "classification":
        w = class_weights(ds.y[fit_idx], ds.n_classes).tolist() if balance == "loss" else None
        return ClassificationTask(ds.classes, ds.y, weights=w)
    if ds.task == "survival":
        edges = time_bins(ds.time[fit_idx], ds.event[fit_idx], n_bins) if survival_loss == "nll" else []
        return SurvivalTask(survival_loss, bin_edges=edges, time=ds.time, event=ds.event)
    if ds.task == "regression":
        return RegressionTask(regression_loss, target=ds.target, fit_idx=fit_idx, bounds=regression_bounds,
                              threshold=regression_threshold)
    raise MILError(f"unknown task {ds.task!r}")


def fold_feature_stats(ds: MILDataset, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation over the patches of bags ``idx``.

    Computed out of core from the bags on disk through the dask cohort view when the dataset knows its bag
    paths; for an in-memory dataset without paths, accumulated bag by bag.
    """
    idx = [int(i) for i in idx]
    if ds.paths and len(ds.paths) == len(ds):
        from .cohort import cohort_view, feature_stats

        view = cohort_view([ds.paths[i] for i in idx])
        return feature_stats(view)
    d = ds.in_dim
    s1, s2, n = np.zeros(d), np.zeros(d), 0
    for i in idx:
        x = ds.features[i].astype(np.float64)
        s1 += x.sum(axis=0)
        s2 += (x ** 2).sum(axis=0)
        n += x.shape[0]
    if n == 0:
        raise MILError("feature statistics need at least one patch; the training bags are all empty")
    from .cohort import safe_std

    mean = s1 / n
    std = safe_std(np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0)))
    return mean.astype(np.float32), std.astype(np.float32)


# ----------------------------------------------------------------------------------------------- loops

def _bag(ds: MILDataset, i: int, device, norm=None, max_instances: int | None = None, rng=None,
         with_coords: bool = False):
    """Features of bag ``i`` (optionally a random subset, standardised); with ``with_coords`` also its patch
    coordinates ``(N, 2)`` (float32, the same subset) or None when the dataset has none."""
    import torch

    x = ds.tensor(int(i), device)
    c = None
    if with_coords and ds.coords is not None and len(ds.coords) > int(i):
        c = torch.as_tensor(np.asarray(ds.coords[int(i)], dtype=np.float32), device=device)
    if max_instances is not None and x.shape[0] > max_instances:
        keep = np.sort(rng.choice(x.shape[0], int(max_instances), replace=False))
        x = x[torch_index(keep, x.device)]
        c = None if c is None else c[torch_index(keep, c.device)]
    if norm is not None:
        x = (x - norm[0]) / norm[1]
    return (x, c) if with_coords else x


def torch_index(idx: np.ndarray, device):
    import torch

    return torch.as_tensor(idx, dtype=torch.long, device=device)


def _entropy(out: dict[str, Any]):
    """Mean Shannon entropy of the model's attention map(s) (0 where there is no attention)."""
    a = out.get("attention_branches")
    if a is None:
        a = out.get("attention")
        if a is None:
            return None
        a = a.unsqueeze(0)
    a = a.float()
    if a.shape[-1] < 2:
        return a.sum() * 0.0
    return -(a * a.clamp_min(1e-12).log()).sum(dim=-1).mean()


def evaluate(model, ds: MILDataset, idx: Sequence[int], device, task: Task | None = None,
             norm=None) -> tuple[np.ndarray, float | None]:
    """Raw model outputs ``(len(idx), n_outputs)`` and (with ``task``) the task loss over the bags."""
    import torch

    model.eval()
    outs = []
    with torch.inference_mode():
        for i in idx:
            x, c = _bag(ds, i, device, norm, with_coords=True)
            with _autocast(device):
                out = call_model(model, x, coords=c)
            outs.append(out["logits"].float())
        if not outs:
            return np.zeros((0, 0)), None
        logits = torch.stack(outs)
        loss = float(task.loss(logits, list(idx), **_bce(model, task))) if task is not None else None
    return logits.cpu().numpy().astype(np.float64), loss


def _bce(model, task: Task) -> dict[str, Any]:
    """Loss options of ``task`` for ``model`` (one BCE per class for models that declare ``bag_loss = "bce"``)."""
    if task.name == "classification" and getattr(model, "bag_loss", "ce") == "bce":
        return {"bce": True}
    return {}


def _selection_score(task: Task, ds: MILDataset, idx: Sequence[int], logits: np.ndarray) -> float | None:
    """Validation AUC + F1 (classification; an undefined AUC counts 0), the ``auc_f1`` selection."""
    if not len(idx):
        return None
    m = task.metrics(idx, task.predict(logits))
    return float((m.get("auc") or 0.0) + (m.get("f1") or 0.0))


def fit(model, ds: MILDataset, train_idx: Sequence[int], val_idx: Sequence[int], *, epochs: int, lr: float,
        weight_decay: float, patience: int, seed: int, device, tag: str = "", task: Task | None = None,
        batch_size: int = 1, balance: str = "loss", max_instances: int | None = None, norm=None,
        aem_lambda: float = 0.0, optimizer: str = "adamw", betas: Sequence[float] | None = None,
        schedule: str = "cosine", min_lr: float = 0.0, min_epochs: int = 0, select: str = "loss") -> dict[str, Any]:
    """Train ``model`` in place; restores the weights of the selected epoch.

    ``optimizer``/``betas``/``schedule``/``min_lr``: see :mod:`pipeline.mil.optim`. Selection (``select``):
    the epoch with the lowest validation loss, or with the highest validation AUC + F1 (``auc_f1``,
    classification only; ties, common on small validation parts, go to the lower validation loss). Early stopping after ``patience`` epochs without a better selected epoch, but not
    before ``min_epochs`` epochs; ``patience=0`` never stops early. ``task`` defaults to class-weighted
    classification. ``balance="sampler"`` draws the bags of an epoch with replacement, inversely to their
    class (stratum) frequency, instead of weighting the loss. A Cox batch without an observed event carries
    no information and takes no optimiser step.
    """
    import torch

    from .optim import build_optimizer, set_epoch_lr

    train_idx = [int(i) for i in train_idx]
    empty = [ds.slide_ids[i] for i in train_idx if ds.n_instances(i) == 0]
    if empty:
        log.info("%sskipping %d empty bag(s) in training: %s", tag, len(empty), ", ".join(empty[:10]))
    steps = np.array([i for i in train_idx if ds.n_instances(i) > 0], dtype=np.int64)
    if not len(steps):
        raise MILError(f"{tag}no non-empty bags to train on")
    if task is None:
        task = make_task(ds, train_idx, balance=balance)
    model.to(device)
    opt = build_optimizer(model.parameters(), optimizer, lr, weight_decay, betas)
    rng = np.random.default_rng(seed)
    uses_label = bool(getattr(model, "uses_label", False)) and task.name == "classification"
    cox = task.name == "survival" and getattr(task, "loss_name", "") == "cox"
    by_score = select == "auc_f1" and task.name == "classification"
    loss_kw = _bce(model, task)
    sample_p = None
    if balance == "sampler":
        strata = ds.y[steps]
        counts = np.bincount(strata)
        sample_p = 1.0 / counts[strata]
        sample_p /= sample_p.sum()
    best = {"loss": math.inf, "score": -math.inf, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    history = []
    since = 0
    skipped = 0
    bs = max(1, int(batch_size))
    # Optional model hooks (see the interface in pipeline/mil/__init__.py).
    set_progress = getattr(model, "set_progress", None)
    batch_loss = getattr(model, "batch_loss", None)
    after_step = getattr(model, "after_step", None)
    step, total_steps = 0, epochs * math.ceil(len(steps) / bs)
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.monotonic()
        set_epoch_lr(opt, schedule, lr, epoch, epochs, min_lr)
        total, n_batches = 0.0, 0
        order = rng.choice(steps, len(steps), replace=True, p=sample_p) if sample_p is not None \
            else rng.permutation(steps)
        for b0 in range(0, len(order), bs):
            batch = [int(i) for i in order[b0:b0 + bs]]
            if cox and not ds.event[batch].any():
                skipped += 1  # no observed event: the partial likelihood is empty, nothing to learn
                continue
            if set_progress is not None:
                set_progress(step, total_steps)
            step += 1
            outs = []
            for i in batch:
                x, c = _bag(ds, i, device, norm, max_instances, rng, with_coords=True)
                with _autocast(device):
                    out = call_model(model, x, coords=c,
                                     label=torch.tensor(int(ds.y[i]), device=device) if uses_label else None)
                outs.append(out)
            terms = [o.get("loss_logits") or [(o["logits"], 1.0)] for o in outs]
            if cox:
                if len({len(t) for t in terms}) == 1:
                    loss = sum(w * task.loss(torch.stack([t[j][0].float() for t in terms]), batch)
                               for j, (_, w) in enumerate(terms[0]))
                else:
                    loss = task.loss(torch.stack([o["logits"].float() for o in outs]), batch)
            else:
                loss = sum(sum(w * task.loss(lg.float().unsqueeze(0), [i], **loss_kw) for lg, w in t)
                           for t, i in zip(terms, batch)) / len(batch)
            aux = [o["aux_loss"].float() for o in outs if o.get("aux_loss") is not None]
            if aux:
                loss = loss + sum(aux) / len(batch)
            if batch_loss is not None:
                extra = batch_loss(outs, torch.as_tensor(ds.y[batch], dtype=torch.long, device=device))
                if extra is not None:
                    loss = loss + extra.float()
            if aem_lambda:
                ents = [e for e in (_entropy(o) for o in outs) if e is not None]
                if ents:
                    loss = loss - float(aem_lambda) * sum(ents) / len(ents)
            if not loss.requires_grad:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach())
            n_batches += 1
        train_loss = total / max(1, n_batches)
        val_logits, val_loss = evaluate(model, ds, val_idx, device, task, norm)
        if val_loss is None or not math.isfinite(val_loss):
            val_loss = math.inf
        rec = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
        if by_score:
            score = _selection_score(task, ds, val_idx, val_logits)
            score = -math.inf if score is None else score
            rec["val_auc_f1"] = score
            improved = (score > best["score"] or best["epoch"] == 0
                        or (score == best["score"] and val_loss < best["loss"]))  # ties: lower val loss
        else:
            score = None
            improved = val_loss < best["loss"] or best["epoch"] == 0
        if improved:
            best = {"loss": val_loss, "score": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            since = 0
        else:
            since += 1
        history.append(rec)
        log.info("%sepoch %d/%d train_loss %.4f val_loss %.4f%s%s (%.1fs)", tag, epoch, epochs, train_loss,
                 val_loss, f" val_auc+f1 {score:.4f}" if by_score else "", " *" if improved else "",
                 time.monotonic() - t0)
        if patience and since >= patience and epoch >= min_epochs:
            log.info("%searly stop at epoch %d (best epoch %d, val_loss %.4f)", tag, epoch, best["epoch"],
                     best["loss"])
            break
    if skipped:
        log.info("%s%d Cox batch(es) without an observed event took no optimiser step", tag, skipped)
    model.load_state_dict(best["state"])
    out = {"best_epoch": best["epoch"], "best_val_loss": best["loss"], "epochs_run": len(history),
           "history": history, "skipped_batches": skipped}
    if by_score:
        out["best_val_auc_f1"] = best["score"]
    return out


# ----------------------------------------------------------------------------------------------- driver

def _pred_frame(ds: MILDataset, idx: Sequence[int], pred: np.ndarray, with_label: bool = True) -> pd.DataFrame:
    idx = [int(i) for i in idx]
    cols: dict[str, Any] = {"slide_id": [ds.slide_ids[i] for i in idx]}
    if ds.task == "survival":
        if with_label:
            cols["time"] = [float(ds.time[i]) for i in idx]
            cols["event"] = [int(ds.event[i]) for i in idx]
        cols["risk"] = pred[:, 0]
        return pd.DataFrame(cols)
    if with_label:
        cols["label"] = [ds.labels[i] for i in idx]
    if ds.task == "regression":
        cols["pred"] = pred[:, 0]
    elif ds.n_classes == 2:
        cols["prob"] = pred[:, 1]
    else:
        cols["pred"] = [ds.classes[k] for k in pred.argmax(axis=1)]
        for c, name in enumerate(ds.classes):
            cols[f"prob_{name}"] = pred[:, c]
    return pd.DataFrame(cols)


def write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


#: AEM's weight of the attention-entropy term when AEM is on and no weight is given (the authors' code).
AEM_LAMBDA = 0.1


def train(bags: Iterable[str | os.PathLike], labels: str | os.PathLike, out_dir: str | os.PathLike, *,
          model: str = "abmil", folds: int = 5, seed: int = 0, epochs: int | None = None, lr: float | None = None,
          weight_decay: float | None = None, patience: int | None = None, val_fraction: float = 0.2,
          model_kwargs: dict[str, Any] | None = None, device: str | None = "auto", task: str | None = "auto",
          threads: int | None = None, allow_unknown_encoder: bool = False, **settings: Any) -> dict[str, Any]:
    """Load bags + labels and run :func:`train_dataset`; returns the metrics dict (also in metrics.json).

    ``allow_unknown_encoder``: mix imported bags whose encoder is unknown with other bags
    (:func:`pipeline.mil.data.check_compatible`).

    ``task``: ``None``/``"auto"`` (decided by the labels CSV), ``"classification"``, ``"survival"`` or
    ``"regression"``; ``threads``: torch CPU threads for loading and training (``None``: torch's default);
    ``settings``: the other keyword options of :func:`train_dataset`.
    """
    bags = [Path(b) for b in bags]
    # Validate the settings before the (possibly slow) bag loading.
    model_kwargs = resolve_model_kwargs(model, **(model_kwargs or {}))
    _check_settings(folds, epochs, lr, weight_decay, patience, val_fraction, threads=threads, **settings)
    pick_device(device)
    with torch_threads(threads):
        ds = load_dataset(bags, labels, task, allow_unknown_encoder=allow_unknown_encoder)
        inputs = {"labels": str(labels), "labels_sha256": sha256_file(labels), "bags": [str(b) for b in bags]}
        return train_dataset(ds, out_dir, model=model, folds=folds, seed=seed, epochs=epochs, lr=lr,
                             weight_decay=weight_decay, patience=patience, val_fraction=val_fraction,
                             model_kwargs=model_kwargs, device=device, inputs=inputs, threads=threads, **settings)


class torch_threads:
    """Context manager: ``torch.set_num_threads(n)`` inside (nothing when ``n`` is None), restored after."""

    def __init__(self, n: int | None):
        self.n = None if n is None else int(n)
        self.old: int | None = None

    def __enter__(self):
        if self.n:
            import torch

            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            import torch

            torch.set_num_threads(self.old)
        return False


def _check_settings(folds, epochs, lr, weight_decay, patience, val_fraction, batch_size=None, balance="loss",
                    max_instances=None, standardize=False, aem=False, aem_lambda=None, survival_loss="nll",
                    n_bins=4, regression_loss="mse", optimizer=None, betas=None, schedule=None, min_lr=None,
                    min_epochs=None, select=None, threads=None, regression_bounds=None,
                    regression_threshold=None) -> None:
    from . import OPTIMIZERS, SCHEDULES, SELECT

    if regression_bounds is not None:
        if len(regression_bounds) != 2:
            raise MILError(f"--regression-bounds needs two numbers LO HI (got {list(regression_bounds)})")
        check_bounds(regression_bounds)
    if regression_threshold is not None and not math.isfinite(float(regression_threshold)):
        raise MILError(f"--regression-threshold must be a finite number (got {regression_threshold})")
    if folds < 1:
        raise MILError(f"--folds must be >= 1 (got {folds})")
    if epochs is not None and epochs < 1:
        raise MILError(f"--epochs must be >= 1 (got {epochs})")
    if lr is not None and not lr > 0:
        raise MILError(f"--lr must be > 0 (got {lr})")
    if weight_decay is not None and weight_decay < 0:
        raise MILError(f"--weight-decay must be >= 0 (got {weight_decay})")
    if patience is not None and patience < 0:
        raise MILError(f"--patience must be >= 0 (0 = no early stopping; got {patience})")
    if min_epochs is not None and min_epochs < 0:
        raise MILError(f"--min-epochs must be >= 0 (got {min_epochs})")
    if min_lr is not None and min_lr < 0:
        raise MILError(f"--min-lr must be >= 0 (got {min_lr})")
    if not 0 < val_fraction < 1:
        raise MILError(f"--val-fraction must be in (0, 1) (got {val_fraction})")
    if batch_size is not None and batch_size < 1:
        raise MILError(f"--batch-size must be >= 1 (got {batch_size})")
    if balance not in BALANCE:
        raise MILError(f"--balance must be one of {', '.join(BALANCE)} (got {balance!r})")
    if max_instances is not None and max_instances < 1:
        raise MILError(f"--max-instances must be >= 1 (got {max_instances})")
    if aem_lambda is not None and aem_lambda < 0:
        raise MILError(f"--aem-lambda must be >= 0 (got {aem_lambda})")
    if survival_loss not in SURVIVAL_LOSSES:
        raise MILError(f"--survival-loss must be one of {', '.join(SURVIVAL_LOSSES)} (got {survival_loss!r})")
    if regression_loss not in REGRESSION_LOSSES:
        raise MILError(f"--regression-loss must be one of {', '.join(REGRESSION_LOSSES)} (got {regression_loss!r})")
    if n_bins < 1:
        raise MILError(f"--n-bins must be >= 1 (got {n_bins})")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise MILError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {optimizer!r})")
    if schedule is not None and schedule not in SCHEDULES:
        raise MILError(f"--schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")
    if select is not None and select not in SELECT:
        raise MILError(f"--select must be one of {', '.join(SELECT)} (got {select!r})")
    if betas is not None:
        try:
            b = [float(v) for v in betas]
        except (TypeError, ValueError):
            b = []
        if len(b) != 2 or not all(0.0 <= v < 1.0 for v in b):
            raise MILError(f"--betas must be two numbers in [0, 1) (got {betas!r})")
    if threads is not None and threads < 1:
        raise MILError(f"--threads must be >= 1 (got {threads})")


def resolve_recipe(model: str, *, cox: bool = False, **given: Any) -> dict[str, Any]:
    """The training recipe of one run: each value the user gave (not ``None``), else the model's paper
    recipe (registry), else the trainer's default; ``batch_size`` defaults to 32 for the Cox loss."""
    from . import RECIPE_KEYS, model_recipe

    bad = sorted(set(given) - set(RECIPE_KEYS))
    if bad:
        raise MILError(f"unknown training setting(s) {bad}")
    paper = model_recipe(model)
    out = {k: (given[k] if given.get(k) is not None else paper[k]) for k in RECIPE_KEYS}
    if given.get("batch_size") is None:
        out["batch_size"] = 32 if cox else (paper["batch_size"] or 1)
    out["lr"], out["weight_decay"], out["min_lr"] = float(out["lr"]), float(out["weight_decay"]), float(out["min_lr"])
    out["epochs"], out["patience"], out["min_epochs"] = int(out["epochs"]), int(out["patience"]), int(out["min_epochs"])
    out["batch_size"] = int(out["batch_size"])
    if out["betas"] is not None:
        out["betas"] = [float(b) for b in out["betas"]]
    out["source"] = {k: ("user" if given.get(k) is not None else
                         "paper" if model_defaults(model).get(k) is not None else "trainer")
                     for k in RECIPE_KEYS}
    return out


SplitList = list[tuple[np.ndarray, np.ndarray, "np.ndarray | None"]]


def _cv_strata(ds: MILDataset, folds: int) -> tuple[np.ndarray, list[str]]:
    """What CV stratifies on, and a name for each stratum (for messages)."""
    if ds.task == "classification":
        return ds.y, [f"class {c!r}" for c in ds.classes]
    if ds.task == "survival":
        return ds.y, ["censored slides (event 0)", "slides with an observed event (event 1)"]
    # Regression: target quantile bins, coarsened until every bin can be spread over the folds.
    from .data import regression_strata

    for k in (4, 3, 2):
        y = regression_strata(ds.target, max_bins=k)
        if np.bincount(y).min() >= folds:
            return y, [f"target quantile bin {i + 1}" for i in range(int(y.max()) + 1)]
    return np.zeros(len(ds), dtype=np.int64), ["all slides"]


def _check_strata(y: np.ndarray, names: Sequence[str], folds: int) -> None:
    counts = np.bincount(np.asarray(y), minlength=len(names))
    short = [(names[c], int(n)) for c, n in enumerate(counts) if 0 < n < folds]
    if short:
        what = "; ".join(f"{name} has {n} slide(s)" for name, n in short)
        raise MILError(f"cannot make {folds} stratified folds: {what}, fewer than the {folds} folds. Use fewer "
                       f"folds (--folds {max(2, min(n for _, n in short))} or less), --folds 1 (one model, "
                       "evaluated on its validation split), or label more slides of that class")


def _splits(ds: MILDataset, folds: int, seed: int) -> tuple[str, SplitList]:
    """``(mode, [(train_or_trainval, test, val_or_None), ...])``; ``val`` is given only by a split column."""
    if ds.split is not None:
        tr = np.flatnonzero(ds.split == "train")
        va = np.flatnonzero(ds.split == "val")
        te = np.flatnonzero(ds.split == "test")
        if not len(tr) or not len(te):
            raise MILError(f"the labels CSV's split column needs both train and test slides "
                           f"(has {len(tr)} train, {len(va)} val, {len(te)} test)")
        if ds.groups is not None:
            parts = {"train": tr, "val": va, "test": te}
            for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
                shared = sorted(set(ds.groups[parts[a]]) & set(ds.groups[parts[b]]))
                if shared:
                    raise MILError(f"patient(s) in both the {a} and the {b} rows of the split column: "
                                   f"{', '.join(shared[:10])}")
        return "split", [(tr, te, va if len(va) else None)]
    if folds == 1:
        return "single", [(np.arange(len(ds)), np.array([], dtype=np.int64), None)]
    y, names = _cv_strata(ds, folds)
    _check_strata(y, names, folds)
    return "cv", [(tr, te, None) for tr, te in cv_splits(y, ds.groups, folds, seed)]


def split_record(ds: MILDataset, parts: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]
                 ) -> tuple[list[dict[str, Any]], str]:
    """The slide lists of every fold (train, val, test) and their SHA-256: identical for every model trained
    with the same labels, bags, folds and seed, so runs can be checked to share their folds."""
    import hashlib
    import json

    rec = [{"fold": k, "train": [ds.slide_ids[i] for i in tr], "val": [ds.slide_ids[i] for i in va],
            "test": [ds.slide_ids[i] for i in te]} for k, (tr, va, te) in enumerate(parts)]
    digest = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()
    return rec, digest


def train_dataset(ds: MILDataset, out_dir: str | os.PathLike, *, model: str = "abmil", folds: int = 5,
                  seed: int = 0, epochs: int | None = None, lr: float | None = None,
                  weight_decay: float | None = None, patience: int | None = None, val_fraction: float = 0.2,
                  model_kwargs: dict[str, Any] | None = None, device: str | None = None,
                  inputs: dict[str, Any] | None = None, batch_size: int | None = None, balance: str = "loss",
                  max_instances: int | None = None, standardize: bool = False, aem: bool = False,
                  aem_lambda: float | None = None, survival_loss: str = "nll", n_bins: int = 4,
                  regression_loss: str = "mse", optimizer: str | None = None,
                  betas: Sequence[float] | None = None, schedule: str | None = None, min_lr: float | None = None,
                  min_epochs: int | None = None, select: str | None = None,
                  threads: int | None = None, regression_bounds: Sequence[float] | None = None,
                  regression_threshold: float | None = None) -> dict[str, Any]:
    """Cross-validate (or, with ``folds=1``, train one model; or train/test on the labels' ``split`` column)
    on an in-memory dataset; write the outputs.

    Every optimisation setting left ``None`` (``epochs``, ``lr``, ``weight_decay``, ``patience``,
    ``batch_size``, ``optimizer``, ``betas``, ``schedule``, ``min_lr``, ``min_epochs``, ``select``) comes
    from the model's paper recipe in the registry (:func:`resolve_recipe`). AEM: ``aem=True`` adds the
    attention-entropy term with weight ``aem_lambda`` (default :data:`AEM_LAMBDA`); a positive
    ``aem_lambda`` alone turns it on too. ``threads``: torch CPU threads (restored afterwards).
    """
    settings = dict(batch_size=batch_size, balance=balance, max_instances=max_instances, standardize=standardize,
                    aem=aem, aem_lambda=aem_lambda, survival_loss=survival_loss, n_bins=n_bins,
                    regression_loss=regression_loss, optimizer=optimizer, betas=betas, schedule=schedule,
                    min_lr=min_lr, min_epochs=min_epochs, select=select, threads=threads,
                    regression_bounds=regression_bounds, regression_threshold=regression_threshold)
    _check_settings(folds, epochs, lr, weight_decay, patience, val_fraction, **settings)
    with torch_threads(threads):
        return _train_dataset(ds, out_dir, model=model, folds=folds, seed=seed, epochs=epochs, lr=lr,
                              weight_decay=weight_decay, patience=patience, val_fraction=val_fraction,
                              model_kwargs=model_kwargs, device=device, inputs=inputs, **settings)


def _train_dataset(ds: MILDataset, out_dir, *, model, folds, seed, epochs, lr, weight_decay, patience, val_fraction,
                   model_kwargs, device, inputs, batch_size, balance, max_instances, standardize, aem, aem_lambda,
                   survival_loss, n_bins, regression_loss, optimizer, betas, schedule, min_lr, min_epochs, select,
                   threads, regression_bounds, regression_threshold) -> dict[str, Any]:
    import torch

    model_kwargs = resolve_model_kwargs(model, **(model_kwargs or {}))
    cox = ds.task == "survival" and survival_loss == "cox"
    recipe = resolve_recipe(model, cox=cox, lr=lr, weight_decay=weight_decay, optimizer=optimizer, betas=betas,
                            schedule=schedule, min_lr=min_lr, epochs=epochs, patience=patience,
                            min_epochs=min_epochs, select=select, batch_size=batch_size)
    aem_w = float(aem_lambda if aem_lambda is not None else (AEM_LAMBDA if aem else 0.0))
    dev = pick_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)  # its presence must mean "this run finished"
    mode, splits = _splits(ds, folds, seed)
    single = mode == "single"
    warnings_out: list[str] = []
    if ds.groups is None:
        msg = ("the labels CSV has no patient_id column: slides are split into folds one by one, so slides of "
               "one patient can land on both sides of a split and inflate the metrics; add patient_id to "
               "group them")
        log.warning("%s", msg)
        warnings_out.append(msg)
    bce = ds.task == "classification" and getattr(
        create_model(model, ds.in_dim, ds.n_classes, task=ds.task, **model_kwargs), "bag_loss", "ce") == "bce"
    loss_desc = {"classification": ("class-weighted " if balance == "loss" else "")
                 + ("per-class binary cross-entropy" if bce else "cross-entropy"),
                 "survival": ("discrete-time NLL" if survival_loss == "nll" else "Cox partial likelihood"),
                 "regression": regression_loss.upper()}[ds.task]
    params = {"model": model, "model_kwargs": model_kwargs, "task": ds.task, "folds": folds, "seed": seed,
              "epochs": recipe["epochs"], "lr": recipe["lr"], "weight_decay": recipe["weight_decay"],
              "patience": recipe["patience"], "min_epochs": recipe["min_epochs"], "val_fraction": val_fraction,
              "batch_size": recipe["batch_size"], "optimizer": recipe["optimizer"], "betas": recipe["betas"],
              "schedule": recipe["schedule"], "min_lr": recipe["min_lr"], "select": recipe["select"],
              "recipe_source": recipe["source"], "loss": loss_desc, "balance": balance,
              "max_instances": max_instances, "standardize": bool(standardize), "aem_lambda": aem_w,
              "split": ("labels CSV split column" if mode == "split" else
                        "StratifiedGroupKFold by patient_id" if ds.groups is not None else "StratifiedKFold"),
              "device": str(dev), "threads": threads}
    if ds.task == "survival":
        params["survival_loss"] = survival_loss
        if survival_loss == "nll":
            params["n_bins"] = int(n_bins)
    if ds.task == "regression":
        params["regression_loss"] = regression_loss
        if regression_bounds is not None:
            lo, hi = check_bounds(regression_bounds)
            params["regression_bounds"] = [lo, hi]
            out_of = [s for s, t in zip(ds.slide_ids, ds.target) if not lo <= t <= hi]
            if out_of:
                raise MILError(f"{len(out_of)} slide(s) have a target outside --regression-bounds {lo:g} {hi:g}: "
                               f"{', '.join(out_of[:10])}")
        if regression_threshold is not None:
            params["regression_threshold"] = float(regression_threshold)
    base = {"model": model, "model_kwargs": model_kwargs, "in_dim": ds.in_dim, "task": ds.task,
            "classes": ds.classes, "n_classes": ds.n_classes, "feature_attrs": ds.feature_attrs,
            "standardize": bool(standardize)}
    counts = (np.bincount(ds.y, minlength=ds.n_classes).tolist() if ds.task == "classification" else None)
    log.info("%d bags, task %s%s, %s, device %s, %s lr %g wd %g, %s schedule, <= %d epochs", len(ds), ds.task,
             f", classes {ds.classes} (counts {counts})" if counts else "",
             {"single": "single model", "split": "train/test split column"}.get(mode, f"{folds}-fold CV"), dev,
             recipe["optimizer"], recipe["lr"], recipe["weight_decay"], recipe["schedule"], recipe["epochs"])
    empty = [s for i, s in enumerate(ds.slide_ids) if ds.n_instances(i) == 0]
    if empty:
        log.warning("%d empty bag(s) (no patches) are skipped in training and predicted from the model's prior "
                    "when evaluated: %s", len(empty), ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
    keys = METRIC_KEYS[ds.task]
    fold_rows, oof_idx, oof_pred, oof_fold, parts = [], [], [], [], []
    for k, (trval, test, fixed_val) in enumerate(splits):
        tag = f"fold {k + 1}/{len(splits)} "
        fold_seed = seed * 1000 + k
        if fixed_val is not None:
            tr, va = np.sort(trval), np.sort(fixed_val)
        else:
            tr, va = holdout_split(trval, ds.y, ds.groups, val_fraction, fold_seed)
        parts.append((tr, va, test))
        task = make_task(ds, tr, balance=balance, survival_loss=survival_loss, n_bins=n_bins,
                         regression_loss=regression_loss, regression_bounds=regression_bounds,
                         regression_threshold=regression_threshold)
        norm_np = fold_feature_stats(ds, tr) if standardize else None
        norm = None if norm_np is None else tuple(torch.from_numpy(a).to(dev) for a in norm_np)
        set_seed(fold_seed)
        net = create_model(model, ds.in_dim, task.n_outputs, task=ds.task, **model_kwargs)
        if aem_w:
            with torch.no_grad():
                probe = net.eval()(torch.zeros(2, ds.in_dim))
            if probe.get("attention") is None:
                raise MILError(f"AEM (--aem / --aem-lambda) needs an attention model; {model!r} has no attention")
            net.train()
        info = fit(net, ds, tr, va, epochs=recipe["epochs"], lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                   patience=recipe["patience"], seed=fold_seed, device=dev, tag=tag, task=task,
                   batch_size=recipe["batch_size"], balance=balance, max_instances=max_instances, norm=norm,
                   aem_lambda=aem_w, optimizer=recipe["optimizer"], betas=recipe["betas"],
                   schedule=recipe["schedule"], min_lr=recipe["min_lr"], min_epochs=recipe["min_epochs"],
                   select=recipe["select"])
        eval_idx = va if single else test
        logits, _ = evaluate(net, ds, eval_idx, dev, None, norm)
        pred = task.predict(logits) if len(eval_idx) else np.zeros((0, len(task.prediction_columns())))
        m = task.metrics(eval_idx, pred)
        row = {"fold": k, "n_train": int(len(tr)), "n_val": int(len(va)), "n_test": int(len(test))}
        row.update({key: m.get(key) for key in keys})
        row.update({"best_epoch": info["best_epoch"], "best_val_loss": info["best_val_loss"],
                    "epochs_run": info["epochs_run"]})
        if "best_val_auc_f1" in info:
            row["best_val_auc_f1"] = info["best_val_auc_f1"]
        if info.get("skipped_batches"):
            row["skipped_batches"] = info["skipped_batches"]
        for note in ("auc_note", "c_index_note"):
            if note in m:
                row[note] = m[note]
        if single:
            row["evaluated_on"] = "validation"
        fold_rows.append(row)
        oof_idx.extend(int(i) for i in eval_idx)
        oof_pred.append(pred)
        oof_fold.extend([k] * len(eval_idx))
        log.info("%s%s (best epoch %d)", tag, " ".join(
            f"{key} {'n/a' if m.get(key) is None else format(m[key], '.3f')}" for key in keys), info["best_epoch"])
        ckpt: dict[str, Any] = {
            "state_dict": {n: t.detach().cpu() for n, t in net.state_dict().items()},
            "config": {**base, "fold": k, "n_outputs": task.n_outputs, "task_config": task.config(),
                       "best_epoch": info["best_epoch"],
                       "train_slides": [ds.slide_ids[i] for i in tr],
                       "val_slides": [ds.slide_ids[i] for i in va],
                       "test_slides": [ds.slide_ids[i] for i in test]}}
        if norm_np is not None:
            ckpt["norm"] = {"mean": torch.from_numpy(norm_np[0]), "std": torch.from_numpy(norm_np[1])}
        path = out_dir / f"fold_{k}" / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)

    order = np.argsort(np.asarray(oof_idx), kind="stable")
    idx = np.asarray(oof_idx, dtype=np.int64)[order]
    pred = np.concatenate(oof_pred, axis=0)[order]
    frame = _pred_frame(ds, idx, pred)
    frame["fold"] = np.asarray(oof_fold, dtype=np.int64)[order]
    write_csv_atomic(frame, out_dir / "predictions.csv")

    config = {**base, "mode": mode, "n_outputs": int(task.n_outputs),
              "folds": [{"fold": r["fold"], "path": f"fold_{r['fold']}/model.pt"} for r in fold_rows],
              "pipeline_version": __version__, "stage_version": STAGE_VERSIONS.get(STAGE)}
    write_json_atomic(out_dir / "model_config.json", config)

    def _mean(key):
        vals = [r[key] for r in fold_rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    split_rec, split_sha = split_record(ds, parts)
    metrics = {"folds": fold_rows, "mean": {key: _mean(key) for key in keys},
               "classes": ds.classes, "task": ds.task, "model": model, "mode": mode,
               "primary_metric": PRIMARY_METRIC[ds.task]}
    if single:
        metrics["note"] = ("--folds 1: one model trained on all bags; metrics and predictions.csv come from its "
                           "internal validation split (also used for early stopping, so they are optimistic)")
    primary = PRIMARY_METRIC[ds.task]
    n_null = sum(r.get(primary) is None for r in fold_rows)
    if n_null:
        metrics["mean"][f"{primary}_note"] = (f"mean over {len(fold_rows) - n_null} of {len(fold_rows)} folds "
                                              f"({primary} undefined in the others)")
    if ds.task == "classification" and ds.n_classes == 2:
        metrics["positive_class"] = ds.classes[1]
    metrics["n_bags"] = len(ds)
    metrics["warnings"] = warnings_out
    metrics["splits"] = split_rec
    metrics["splits_sha256"] = split_sha
    metrics["params"] = params
    metrics["provenance"] = provenance(STAGE, params, inputs=inputs or {},
                                       feature_attrs=ds.feature_attrs, n_bags=len(ds))
    write_json_atomic(out_dir / "metrics.json", metrics)
    log.info("mean %s -> %s", " ".join(f"{key} {'n/a' if v is None else format(v, '.3f')}"
                                       for key, v in metrics["mean"].items() if not key.endswith("_note")),
             out_dir / "metrics.json")
    return metrics
