"""Command line: ``python -m pipeline.mil {train,predict,compare,export,models} ...``.

Expected user errors (missing or malformed files, incompatible bags, bad settings) print one line
``error: ...`` to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..store import BagError
from . import MILError, list_models, model_defaults, model_doc


def _model_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as JSON when possible (numbers, true/false, null), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = {"True": True, "False": False, "None": None}.get(value, value)
    return key, parsed


def compare_runs(runs: list[str]) -> str:
    """Markdown table: one row per run (model, task, mode, bags, mean metrics +- s.d. over folds)."""
    from pathlib import Path

    rows, keys = [], []
    for r in runs:
        path = Path(r) / "metrics.json"
        try:
            m = json.loads(path.read_text())
        except FileNotFoundError:
            raise MILError(f"{path}: not found (training did not finish here)") from None
        except ValueError as exc:
            raise MILError(f"{path}: unreadable ({exc})") from None
        for k in m.get("mean", {}):
            if not k.endswith("_note") and k not in keys:
                keys.append(k)
        rows.append((r, m))
    out = ["| run | model | task | mode | bags | " + " | ".join(keys) + " |", "|---" * (5 + len(keys)) + "|"]
    for r, m in rows:
        cells = []
        for k in keys:
            vals = [f.get(k) for f in m.get("folds", []) if f.get(k) is not None]
            mean = m.get("mean", {}).get(k)
            if mean is None:
                cells.append("n/a")
            elif len(vals) > 1:
                import statistics

                cells.append(f"{mean:.3f} ± {statistics.pstdev(vals):.3f}")
            else:
                cells.append(f"{mean:.3f}")
        out.append(f"| {r} | {m.get('model')} | {m.get('task')} | {m.get('mode')} | {m.get('n_bags')} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.mil", description="MIL training and inference on feature bags")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="cross-validated training; writes metrics.json, predictions.csv, fold models")
    t.add_argument("--bags", nargs="+", required=True, metavar="PATH",
                   help="bag folders and/or single *.zarr bags")
    t.add_argument("--labels", required=True, metavar="CSV",
                   help="slide_id,label[,patient_id][,split] or slide_id,time,event[,patient_id][,split] CSV")
    t.add_argument("--model", default="abmil", help=f"registered model (default abmil; {', '.join(list_models())}); "
                   "the wrappers mhim and r2t take their aggregator as --model-arg base=NAME")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--task", default="auto", choices=["auto", "classification", "survival", "regression"],
                   help="default auto: time+event columns -> survival, non-integer numeric label -> regression, "
                        "else classification")
    t.add_argument("--folds", type=int, default=5,
                   help="CV folds (1 = one model on all bags; default 5; a split column in the labels wins)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=50)
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: the model paper's)")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the model paper's)")
    t.add_argument("--patience", type=int, default=10, help="early-stopping patience in epochs (default 10)")
    t.add_argument("--val-fraction", type=float, default=0.2,
                   help="validation share of each training fold, for early stopping (default 0.2)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="bags per optimiser step (default 1, or the model's, e.g. 16 for scmil; 32 with "
                        "--survival-loss cox)")
    t.add_argument("--balance", default="loss", choices=["loss", "sampler", "none"],
                   help="class imbalance: class-weighted loss (default), class-balanced sampling, or none")
    t.add_argument("--max-instances", type=int, default=None, metavar="N",
                   help="train on a random subset of at most N instances per bag and step (default: all)")
    t.add_argument("--standardize", action="store_true",
                   help="standardise features with the mean/std of each fold's training bags (out of core)")
    t.add_argument("--aem-lambda", type=float, default=0.0,
                   help="weight of the attention-entropy maximisation term of AEM (attention models; default 0)")
    t.add_argument("--survival-loss", default="nll", choices=["nll", "cox"], help="survival loss (default nll)")
    t.add_argument("--n-bins", type=int, default=4, help="time intervals of the discrete-time survival loss")
    t.add_argument("--regression-loss", default="mse", choices=["mse", "mae"], help="regression loss (default mse)")
    t.add_argument("--regression-bounds", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="bounded regression output LO + (HI - LO)·sigmoid (e.g. 0 100 for a percentage; WeakSTIL)")
    t.add_argument("--regression-threshold", type=float, default=None, metavar="T",
                   help="also report the AUC of the prediction for target >= T (regression)")
    t.add_argument("--hidden-dim", type=int, default=None, help="model hidden size (model default if unset)")
    t.add_argument("--attn-dim", type=int, default=None, help="attention size (model default if unset)")
    t.add_argument("--dropout", type=float, default=None, help="dropout (model default if unset)")
    t.add_argument("--model-arg", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                   help="any other model hyper-parameter, e.g. k_sample=8 (repeatable; see `models`)")
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    r = sub.add_parser("predict", help="predict bags with the fold models of a training run")
    r.add_argument("--model-dir", required=True, metavar="DIR", help="a finished `train --out` folder")
    r.add_argument("--bags", nargs="+", required=True, metavar="PATH")
    r.add_argument("--out", required=True, metavar="CSV")
    r.add_argument("--attention-dir", default=None, metavar="DIR",
                   help="write {slide_id}.csv with x,y and the per-patch attention and/or instance scores")
    r.add_argument("--device", default=None)

    c = sub.add_parser("compare", help="one table of the mean metrics of several finished training runs")
    c.add_argument("runs", nargs="+", metavar="DIR", help="`train --out` folders")

    e = sub.add_parser("export", help="one cohort feature table from a bag folder (written chunk by chunk)")
    e.add_argument("--bags", nargs="+", required=True, metavar="PATH")
    e.add_argument("--out", required=True, metavar="TABLE", help="*.zarr (Zarr v3 group) or *.csv")
    e.add_argument("--chunk-rows", type=int, default=4096)

    m = sub.add_parser("models", help="list the registered models")
    m.add_argument("-v", "--verbose", action="store_true", help="with hyper-parameters and optimiser defaults")
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
            from . import resolve_model_kwargs

            for name in list_models():
                if not args.verbose:
                    print(name)
                    continue
                kw = ", ".join(f"{k}={v!r}" for k, v in resolve_model_kwargs(name).items())
                d = model_defaults(name)
                extra = f" batch_size={d['batch_size']}" if d.get("batch_size") else ""
                print(f"{name}: {model_doc(name)}\n    {kw}\n    lr={d['lr']} weight_decay={d['weight_decay']}{extra}")
        elif args.cmd == "train":
            from .train import train

            kw = {k: v for k, v in (("hidden_dim", args.hidden_dim), ("attn_dim", args.attn_dim),
                                    ("dropout", args.dropout)) if v is not None}
            kw.update(dict(args.model_arg))
            train(args.bags, args.labels, args.out, model=args.model, folds=args.folds, seed=args.seed,
                  epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, patience=args.patience,
                  val_fraction=args.val_fraction, model_kwargs=kw, device=args.device, task=args.task,
                  batch_size=args.batch_size, balance=args.balance, max_instances=args.max_instances,
                  standardize=args.standardize, aem_lambda=args.aem_lambda, survival_loss=args.survival_loss,
                  n_bins=args.n_bins, regression_loss=args.regression_loss,
                  regression_bounds=args.regression_bounds, regression_threshold=args.regression_threshold)
        elif args.cmd == "predict":
            from .predict import predict

            predict(args.model_dir, args.bags, args.out, attention_dir=args.attention_dir, device=args.device)
        elif args.cmd == "compare":
            print(compare_runs(args.runs))
        elif args.cmd == "export":
            from .cohort import export_table

            info = export_table(args.bags, args.out, chunk_rows=args.chunk_rows)
            logger.info("%d rows from %d slide(s), %d features -> %s", info["rows"], info["slides"], info["dim"],
                        info["path"])
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
