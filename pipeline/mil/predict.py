"""Inference with the fold models of a training run: mean probability over folds, optional attention maps.

Output CSV: ``slide_id,prob`` (binary; ``prob`` = P(classes[1])) or ``slide_id,pred,prob_<class>...``
(multi-class). With an attention folder: one ``{slide_id}.csv`` per slide with ``x,y,attention`` (the
fold-mean attention weight of each patch, rows in the bag's coords order).
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
from . import MILError, create_model
from .data import check_compatible, open_bags
from .train import _autocast, pick_device, write_csv_atomic

log = logging.getLogger("pipeline.mil")


def load_models(model_dir: str | os.PathLike, device: Any = None) -> tuple[dict[str, Any], list[Any]]:
    """The training config (``model_config.json``) and the fold models, in eval mode on ``device``."""
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
        net = create_model(cfg["model"], cfg["in_dim"], cfg["n_classes"], **cfg.get("model_kwargs", {}))
        try:
            net.load_state_dict(ckpt["state_dict"])
        except (RuntimeError, KeyError) as exc:
            raise MILError(f"{p}: checkpoint does not match model {cfg['model']!r} ({exc})") from None
        models.append(net.to(dev).eval())
    if not models:
        raise MILError(f"{cfg_path}: lists no fold models")
    return cfg, models


def predict_features(models: list[Any], features: np.ndarray, device: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Fold-mean class probabilities ``(C,)`` and attention ``(N,)`` (None if a model has none) for one bag."""
    import torch

    dev = device if device is not None else next(models[0].parameters()).device
    x = torch.from_numpy(np.asarray(features, dtype=np.float32)).to(dev)
    probs, atts = [], []
    with torch.inference_mode():
        for net in models:
            with _autocast(dev):
                out = net(x)
            probs.append(torch.softmax(out["logits"].float(), dim=-1).cpu().numpy())
            a = out.get("attention")
            atts.append(None if a is None else a.float().cpu().numpy())
    prob = np.mean(probs, axis=0).astype(np.float64)
    att = None if any(a is None for a in atts) else np.mean(atts, axis=0).astype(np.float64)
    return prob, att


def predict(model_dir: str | os.PathLike, bags: Iterable[str | os.PathLike], out_csv: str | os.PathLike,
            attention_dir: str | os.PathLike | None = None, device: str | None = None) -> pd.DataFrame:
    """Predict every bag in ``bags`` (bag paths or folders) with the fold models in ``model_dir``."""
    dev = pick_device(device)
    cfg, models = load_models(model_dir, dev)
    opened = open_bags(bags)
    if not opened:
        raise MILError(f"no bags found in {', '.join(str(b) for b in bags)}")
    # Refuse before computing or writing anything.
    check_compatible([(str(b.path), b.attrs) for b in opened.values()], expected=cfg["feature_attrs"],
                     expected_from=f"the models in {model_dir}")
    classes = cfg["classes"]
    rows = []
    att_dir = Path(attention_dir) if attention_dir is not None else None
    if att_dir is not None:
        att_dir.mkdir(parents=True, exist_ok=True)
    warned = False
    for sid in sorted(opened):
        bag = read_bag(opened[sid].path)
        if bag.n == 0:
            log.warning("%s: empty bag (no patches); prediction is the models' prior", bag.path)
        prob, att = predict_features(models, bag.features, dev)
        if not np.all(np.isfinite(prob)):
            raise MILError(f"{bag.path}: non-finite prediction")
        row: dict[str, Any] = {"slide_id": sid}
        if len(classes) == 2:
            row["prob"] = float(prob[1])
        else:
            row["pred"] = classes[int(np.argmax(prob))]
            for c, name in enumerate(classes):
                row[f"prob_{name}"] = float(prob[c])
        rows.append(row)
        if att_dir is not None:
            if att is None:
                if not warned:
                    log.warning("model %r gives no attention scores; no attention CSVs written", cfg["model"])
                    warned = True
            else:
                df = pd.DataFrame({"x": bag.coords[:, 0].astype(np.int64), "y": bag.coords[:, 1].astype(np.int64),
                                   "attention": att})
                write_csv_atomic(df, att_dir / f"{sid}.csv")
    cols = ["slide_id", "prob"] if len(classes) == 2 else ["slide_id", "pred"] + [f"prob_{c}" for c in classes]
    out = pd.DataFrame(rows, columns=cols)
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out, out_csv)
    log.info("%d slide(s) predicted with %d model(s) -> %s", len(out), len(models), out_csv)
    return out
