"""Inference with the fold models of a training run: fold-ensemble predictions, per-patch scores.

Output CSV: ``slide_id,prob`` (binary; ``prob`` = P(classes[1])), ``slide_id,pred,prob_<class>...``
(multi-class), ``slide_id,risk`` (survival; higher = shorter expected survival) or ``slide_id,pred``
(regression); every value is the mean over the fold models. Then ``in_training`` (1 when any fold model
trained on the slide, its training or validation part included, so the prediction is not a test result; 0
for a slide no fold model saw) and ``in_training_fold_<k>`` per fold model (1/0). For evaluation use the
training run's out-of-fold ``predictions.csv``, never the rows of this file with ``in_training`` 1. With an
attention folder: one
``{slide_id}.csv`` per slide with ``x,y`` (the bag's coords, in its order) and, averaged over the folds,
``attention`` (models with attention: the softmax weight of each patch) and the instance scores of models
that have them (``score``; ``score_<class>`` for multi-class): the instance classifier's log-odds, or the
patch's share of the bag logit for the pooling models, or the risk / prediction of the patch alone for
survival and regression.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..store import read_bag
from . import MILError, call_model, create_model
from .data import check_compatible, open_bags
from .tasks import ClassificationTask, task_from_config
from .train import _autocast, pick_device, write_csv_atomic

log = logging.getLogger("pipeline.mil")


def load_models(model_dir: str | os.PathLike, device: Any = None) -> tuple[dict[str, Any], list[Any]]:
    """The training config (``model_config.json``) and the fold models, in eval mode on ``device``.

    Each model carries its fold's task (``net.mil_task``), feature standardisation (``net.mil_norm``,
    ``(mean, std)`` tensors or None) and the slides it trained on (``net.mil_seen``: training + validation
    part; None for checkpoints that do not record them).
    """
    import torch

    model_dir = Path(model_dir)
    cfg_path = model_dir / "model_config.json"
    if not model_dir.is_dir():
        raise MILError(f"{model_dir}: no such model directory")
    if not (model_dir / "metrics.json").is_file():
        raise MILError(f"{model_dir}: no metrics.json, so training did not finish here")
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise MILError(f"{cfg_path}: not found (not a MIL training output)") from None
    except ValueError as exc:
        raise MILError(f"{cfg_path}: unreadable ({exc})") from None
    dev = device if device is not None else pick_device()
    models = []
    for f in cfg.get("folds", []):
        p = model_dir / f["path"]
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise MILError(f"{p}: fold model not found") from None
        fcfg = ckpt.get("config", {})
        task_cfg = fcfg.get("task_config") or {"task": "classification", "classes": cfg["classes"]}
        task = task_from_config(task_cfg)
        n_out = int(fcfg.get("n_outputs") or cfg.get("n_outputs") or cfg["n_classes"])
        net = create_model(cfg["model"], cfg["in_dim"], n_out, task=task_cfg.get("task", "classification"),
                           **cfg.get("model_kwargs", {}))
        try:
            net.load_state_dict(ckpt["state_dict"])
        except (RuntimeError, KeyError) as exc:
            raise MILError(f"{p}: checkpoint does not match model {cfg['model']!r} ({exc})") from None
        net = net.to(dev).eval()
        norm = ckpt.get("norm")
        net.mil_task = task
        net.mil_norm = None if not norm else (norm["mean"].to(dev), norm["std"].to(dev))
        seen = fcfg.get("train_slides")
        net.mil_seen = None if seen is None else set(seen) | set(fcfg.get("val_slides") or [])
        models.append(net)
    if not models:
        raise MILError(f"{cfg_path}: lists no fold models")
    return cfg, models


def predict_features(models: list[Any], features: np.ndarray, device: Any = None, with_scores: bool = False,
                     coords: np.ndarray | None = None):
    """Fold-mean prediction and attention ``(N,)`` (None if a model has none) for one bag; with
    ``with_scores`` also the fold-mean instance scores ``(N,)`` or ``(N, C)`` (None if a model has none).
    ``coords`` ``(N, 2)``: the bag's patch coordinates, passed to models that use them.

    The prediction is the class probabilities ``(C,)`` for classification, ``(1,)`` risk for survival,
    ``(1,)`` value for regression.
    """
    import torch

    dev = device if device is not None else next(models[0].parameters()).device
    x0 = torch.from_numpy(np.asarray(features, dtype=np.float32)).to(dev)
    c0 = None if coords is None else torch.from_numpy(np.asarray(coords, dtype=np.float32)).to(dev)
    preds, atts, scores = [], [], []
    with torch.inference_mode():
        for net in models:
            task = getattr(net, "mil_task", None)
            if task is None:
                task = ClassificationTask(list(range(int(getattr(net, "n_classes", 2)))))
            norm = getattr(net, "mil_norm", None)
            x = x0 if norm is None else (x0 - norm[0]) / norm[1]
            with _autocast(dev):
                out = call_model(net, x, coords=c0)
            logits = out["logits"].float().cpu().numpy()[None].astype(np.float64)
            preds.append(task.predict(logits)[0])
            a = out.get("attention")
            atts.append(None if a is None else a.float().cpu().numpy())
            il = out.get("instance_logits")
            scores.append(None if il is None else task.score(il.float().cpu().numpy().astype(np.float64)))
    pred = np.mean(preds, axis=0).astype(np.float64)
    att = None if any(a is None for a in atts) else np.mean(atts, axis=0).astype(np.float64)
    if not with_scores:
        return pred, att
    sc = None if any(s is None for s in scores) else np.mean(scores, axis=0).astype(np.float64)
    return pred, att, sc


def _score_columns(models: list[Any]) -> list[str]:
    task = getattr(models[0], "mil_task", None)
    return task.score_columns() if task is not None else ["score"]


def predict(model_dir: str | os.PathLike, bags: Iterable[str | os.PathLike], out_csv: str | os.PathLike,
            attention_dir: str | os.PathLike | None = None, device: str | None = None,
            threads: int | None = None) -> pd.DataFrame:
    """Predict every bag in ``bags`` (bag paths or folders) with the fold models in ``model_dir``;
    ``threads``: torch CPU threads (restored afterwards)."""
    from .train import torch_threads

    if threads is not None and int(threads) < 1:
        raise MILError(f"--threads must be >= 1 (got {threads})")
    with torch_threads(threads):
        return _predict(model_dir, bags, out_csv, attention_dir, device)


def _predict(model_dir, bags, out_csv, attention_dir, device) -> pd.DataFrame:
    dev = pick_device(device)
    cfg, models = load_models(model_dir, dev)
    opened = open_bags(bags)
    if not opened:
        raise MILError(f"no bags found in {', '.join(str(b) for b in bags)}")
    # Refuse before computing or writing anything.
    check_compatible([(str(b.path), b.attrs) for b in opened.values()], expected=cfg["feature_attrs"],
                     expected_from=f"the models in {model_dir}")
    task_name = cfg.get("task", "classification")
    classes = cfg.get("classes") or []
    rows = []
    att_dir = Path(attention_dir) if attention_dir is not None else None
    if att_dir is not None:
        att_dir.mkdir(parents=True, exist_ok=True)
    score_cols = _score_columns(models)
    warned = False
    for sid in sorted(opened):
        bag = read_bag(opened[sid].path)
        if bag.n == 0:
            log.warning("%s: empty bag (no patches); prediction is the models' prior", bag.path)
        pred, att, sc = predict_features(models, bag.features, dev, with_scores=True, coords=bag.coords)
        if not np.all(np.isfinite(pred)):
            raise MILError(f"{bag.path}: non-finite prediction")
        row: dict[str, Any] = {"slide_id": sid}
        if task_name == "survival":
            row["risk"] = float(pred[0])
        elif task_name == "regression":
            row["pred"] = float(pred[0])
        elif len(classes) == 2:
            row["prob"] = float(pred[1])
        else:
            row["pred"] = classes[int(np.argmax(pred))]
            for c, name in enumerate(classes):
                row[f"prob_{name}"] = float(pred[c])
        seen = [None if net.mil_seen is None else int(sid in net.mil_seen) for net in models]
        row["in_training"] = None if any(v is None for v in seen) else int(any(seen))
        for k, v in enumerate(seen):
            row[f"in_training_fold_{k}"] = v
        rows.append(row)
        if att_dir is not None:
            if att is None and sc is None:
                if not warned:
                    log.warning("model %r gives no attention or instance scores; no attention CSVs written",
                                cfg["model"])
                    warned = True
                continue
            cols: dict[str, Any] = {"x": bag.coords[:, 0].astype(np.int64), "y": bag.coords[:, 1].astype(np.int64)}
            if att is not None:
                cols["attention"] = att
            if sc is not None:
                sc2 = sc[:, None] if sc.ndim == 1 else sc
                for j, name in enumerate(score_cols[:sc2.shape[1]]):
                    cols[name] = sc2[:, j]
            write_csv_atomic(pd.DataFrame(cols), att_dir / f"{sid}.csv")
    if task_name == "survival":
        cols_out = ["slide_id", "risk"]
    elif task_name == "regression" or len(classes) != 2:
        cols_out = ["slide_id", "pred"] + ([f"prob_{c}" for c in classes] if task_name == "classification" else [])
    else:
        cols_out = ["slide_id", "prob"]
    cols_out += ["in_training"] + [f"in_training_fold_{k}" for k in range(len(models))]
    out = pd.DataFrame(rows, columns=cols_out)
    n_seen = int(out["in_training"].fillna(0).sum())
    if n_seen:
        log.info("%d of %d slide(s) were in the training data of at least one fold model (in_training = 1): "
                 "not test predictions; use the training run's out-of-fold predictions.csv to evaluate",
                 n_seen, len(out))
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out, out_csv)
    log.info("%d slide(s) predicted with %d model(s) -> %s", len(out), len(models), out_csv)
    return out
