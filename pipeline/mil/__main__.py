"""Command line: ``python -m pipeline.mil {train,predict,models} ...``.

Expected user errors (missing or malformed files, incompatible bags, bad settings) print one line
``error: ...`` to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..store import BagError
from . import MILError, list_models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.mil", description="MIL training and inference on feature bags")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="cross-validated training; writes metrics.json, predictions.csv, fold models")
    t.add_argument("--bags", nargs="+", required=True, metavar="PATH",
                   help="bag folders and/or single *.zarr bags")
    t.add_argument("--labels", required=True, metavar="CSV", help="slide_id,label[,patient_id] CSV")
    t.add_argument("--model", default="abmil", help=f"registered model (default abmil; {', '.join(list_models())})")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--folds", type=int, default=5, help="CV folds (1 = one model on all bags; default 5)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=50)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--patience", type=int, default=10, help="early-stopping patience in epochs (default 10)")
    t.add_argument("--val-fraction", type=float, default=0.2,
                   help="validation share of each training fold, for early stopping (default 0.2)")
    t.add_argument("--hidden-dim", type=int, default=None, help="model hidden size (model default if unset)")
    t.add_argument("--attn-dim", type=int, default=None, help="attention size (model default if unset)")
    t.add_argument("--dropout", type=float, default=None, help="dropout (model default if unset)")
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    r = sub.add_parser("predict", help="predict bags with the fold models of a training run")
    r.add_argument("--model-dir", required=True, metavar="DIR", help="a finished `train --out` folder")
    r.add_argument("--bags", nargs="+", required=True, metavar="PATH")
    r.add_argument("--out", required=True, metavar="CSV")
    r.add_argument("--attention-dir", default=None, metavar="DIR", help="write {slide_id}.csv with x,y,attention")
    r.add_argument("--device", default=None)

    sub.add_parser("models", help="list the registered models")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("pipeline.mil")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mil: %(message)s"))
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.cmd == "models":
            print("\n".join(list_models()))
        elif args.cmd == "train":
            from .train import train

            kw = {k: v for k, v in (("hidden_dim", args.hidden_dim), ("attn_dim", args.attn_dim),
                                    ("dropout", args.dropout)) if v is not None}
            train(args.bags, args.labels, args.out, model=args.model, folds=args.folds, seed=args.seed,
                  epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, patience=args.patience,
                  val_fraction=args.val_fraction, model_kwargs=kw, device=args.device)
        elif args.cmd == "predict":
            from .predict import predict

            predict(args.model_dir, args.bags, args.out, attention_dir=args.attention_dir, device=args.device)
    except (BagError, MILError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable input / unwritable output: str() names the file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
