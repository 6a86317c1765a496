"""Command line: ``python -m pipeline.mil {train,predict,compare,export,models} ...``.

Expected user errors (missing or malformed files, incompatible bags, bad settings) print one line
``error: ...`` to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..config import CHOICES, DEFAULT_MIL_MODEL, STAGE_DEFAULTS, parse_with_settings
from ..log import setup
from ..store import BagError
from . import MILError, list_models, model_defaults, model_doc

D = STAGE_DEFAULTS["mil"]  # the one home of these defaults (pipeline.config)


def _choices(key: str) -> list[str]:
    return list(CHOICES[("mil", key)])


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
    """Markdown table: one row per run (model, task, mode, bags, mean ± s.d. over folds of every metric)."""
    from .compare import markdown_table

    return markdown_table(runs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.mil", description="MIL training and inference on feature bags")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="cross-validated training; writes metrics.json, predictions.csv, fold models")
    t.add_argument("--bags", nargs="+", default=None, metavar="PATH",
                   help="bag folders and/or single *.zarr bags")
    t.add_argument("--bags-file", default=None, metavar="FILE", help="file with bag paths, one per line")
    t.add_argument("--labels", required=True, metavar="CSV",
                   help="slide_id,label[,patient_id][,split] or slide_id,time,event[,patient_id][,split] CSV")
    t.add_argument("--settings", default=None, help="the settings of one MIL run as a JSON object (what the "
                                                   "workflow resolves from its `mil` section): defaults of the "
                                                   "options below, `model_args` for model hyper-parameters")
    t.add_argument("--model", default=D["model"] or DEFAULT_MIL_MODEL,
                   help=f"registered model (default {DEFAULT_MIL_MODEL}; {', '.join(list_models())}); "
                        "the wrappers mhim and r2t take their aggregator as --model-arg base=NAME")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--task", default=D["task"], choices=_choices("task"),
                   help="default auto: time+event columns -> survival, non-integer numeric label -> regression, "
                        "else classification")
    t.add_argument("--folds", type=int, default=D["folds"],
                   help="CV folds (1 = one model on all bags; default 5; a split column in the labels wins)")
    t.add_argument("--seed", type=int, default=D["seed"])
    t.add_argument("--epochs", type=int, default=D["epochs"], help="epoch budget (default: the model paper's, else 50)")
    t.add_argument("--lr", type=float, default=D["lr"], help="learning rate (default: the model paper's)")
    t.add_argument("--weight-decay", type=float, default=D["weight_decay"],
                   help="weight decay, L2 or decoupled as the optimiser applies it (default: the model paper's)")
    t.add_argument("--optimizer", default=D["optimizer"], choices=_choices("optimizer"),
                   help="optimiser (default: the model paper's; adamw for models without one)")
    t.add_argument("--betas", type=float, nargs=2, default=D["betas"], metavar=("B1", "B2"),
                   help="Adam-type betas (default: the model paper's, else torch's)")
    t.add_argument("--schedule", default=D["schedule"], choices=_choices("schedule"),
                   help="learning-rate schedule (default: the model paper's; cosine for models without one)")
    t.add_argument("--min-lr", type=float, default=D["min_lr"], help="final learning rate of the cosine schedule")
    t.add_argument("--patience", type=int, default=D["patience"],
                   help="early-stopping patience in epochs, 0 = none (default: the model paper's, else 10)")
    t.add_argument("--min-epochs", type=int, default=D["min_epochs"], help="never stop early before this epoch (CLAM: 50)")
    t.add_argument("--select", default=D["select"], choices=_choices("select"),
                   help="checkpoint: lowest validation loss, or highest validation AUC + F1 (ACMIL)")
    t.add_argument("--val-fraction", type=float, default=D["val_fraction"],
                   help="validation share of each training fold, for checkpoint selection (default 0.2)")
    t.add_argument("--batch-size", type=int, default=D["batch_size"],
                   help="bags per optimiser step (default: the model paper's, else 1; 32 with --survival-loss cox)")
    t.add_argument("--balance", default=D["balance"], choices=_choices("balance"),
                   help="class imbalance: class-weighted loss (default), class-balanced sampling, or none")
    t.add_argument("--max-instances", type=int, default=D["max_instances"], metavar="N",
                   help="train on a random subset of at most N instances per bag and step (default: all)")
    t.add_argument("--standardize", action="store_true", default=D["standardize"],
                   help="standardise features with the mean/std of each fold's training bags (out of core)")
    t.add_argument("--aem", action="store_true", default=D["aem"],
                   help="AEM: add the attention-entropy maximisation term (attention models; weight 0.1)")
    t.add_argument("--aem-lambda", type=float, default=D["aem_lambda"],
                   help="weight of the AEM term (implies --aem when > 0; default 0.1 with --aem, else off)")
    t.add_argument("--survival-loss", default=D["survival_loss"], choices=_choices("survival_loss"),
                   help="survival loss (default nll)")
    t.add_argument("--n-bins", type=int, default=D["n_bins"], help="time intervals of the discrete-time survival loss")
    t.add_argument("--regression-loss", default=D["regression_loss"], choices=_choices("regression_loss"),
                   help="regression loss (default mse)")
    t.add_argument("--regression-bounds", nargs=2, type=float, default=D["regression_bounds"], metavar=("LO", "HI"),
                   help="bounded regression output LO + (HI - LO)·sigmoid (e.g. 0 100 for a percentage; WeakSTIL)")
    t.add_argument("--regression-threshold", type=float, default=D["regression_threshold"], metavar="T",
                   help="also report the AUC of the prediction for target >= T (regression)")
    t.add_argument("--hidden-dim", type=int, default=D["hidden_dim"], help="model hidden size (model default if unset)")
    t.add_argument("--attn-dim", type=int, default=D["attn_dim"], help="attention size (model default if unset)")
    t.add_argument("--dropout", type=float, default=D["dropout"], help="dropout (model default if unset)")
    t.add_argument("--model-arg", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                   help="any other model hyper-parameter, e.g. k_sample=8 (repeatable; see `models`)")
    t.add_argument("--device", default=D["device"], help="torch device: auto (default: cuda if available, else "
                                                         "cpu), cpu, cuda, cuda:N")
    t.add_argument("--threads", type=int, default=D["threads"], help="torch CPU threads (default: torch's choice)")
    t.add_argument("--allow-unknown-encoder", action="store_true", default=D["allow_unknown_encoder"],
                   help="mix imported bags whose encoder (or resolution) is unknown with other bags")
    t.set_defaults(model_args=dict(D["model_args"]))

    r = sub.add_parser("predict", help="predict bags with the fold models of a training run")
    r.add_argument("--model-dir", required=True, metavar="DIR", help="a finished `train --out` folder")
    r.add_argument("--bags", nargs="+", default=None, metavar="PATH")
    r.add_argument("--bags-file", default=None, metavar="FILE", help="file with bag paths, one per line")
    r.add_argument("--out", required=True, metavar="CSV")
    r.add_argument("--attention-dir", default=None, metavar="DIR",
                   help="write {slide_id}.csv with x,y and the per-patch attention and/or instance scores")
    r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")

    c = sub.add_parser("compare", help="one table of the mean metrics of several finished training runs")
    c.add_argument("runs", nargs="+", metavar="DIR", help="`train --out` folders")
    c.add_argument("--out", default=None, metavar="CSV",
                   help="also write comparison.csv: one row per run, mean / sd / n over folds of every metric")
    c.add_argument("--curves", default=None, metavar="JSON",
                   help="also write the ROC (classification) or Kaplan-Meier (survival) curve data as JSON")

    e = sub.add_parser("export", help="one cohort feature table from a bag folder (written chunk by chunk)")
    e.add_argument("--bags", nargs="+", default=None, metavar="PATH")
    e.add_argument("--bags-file", default=None, metavar="FILE", help="file with bag paths, one per line")
    e.add_argument("--out", required=True, metavar="TABLE", help="*.zarr (Zarr v3 group) or *.csv")
    e.add_argument("--chunk-rows", type=int, default=4096)

    m = sub.add_parser("models", help="list the registered models")
    m.add_argument("-v", "--verbose", action="store_true", help="with hyper-parameters and optimiser defaults")
    return p


def _bag_paths(args: argparse.Namespace) -> list[str]:
    """``--bags`` and/or the lines of ``--bags-file`` (a workflow passes thousands of bags as a file)."""
    from pathlib import Path

    paths = list(args.bags or [])
    if args.bags_file:
        try:
            paths += [ln for ln in Path(args.bags_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except OSError as exc:
            raise MILError(f"{args.bags_file}: cannot read the bag list ({exc.strerror or exc})") from None
    if not paths:
        raise MILError("no bags given (--bags PATH ... or --bags-file FILE)")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args = parse_with_settings(parser, argv, target=sub.choices["train"])
    logger = logging.getLogger("pipeline.mil")
    handler = setup(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.cmd == "models":
            from . import resolve_model_kwargs

            for name in list_models():
                if not args.verbose:
                    print(name)
                    continue
                kw = ", ".join(f"{k}={v!r}" for k, v in resolve_model_kwargs(name).items())
                d = {k: v for k, v in model_defaults(name).items() if v is not None}
                recipe = " ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in d.items())
                print(f"{name}: {model_doc(name)}\n    {kw}\n    {recipe or '(trainer defaults)'}")
        elif args.cmd == "train":
            from .train import train

            kw = {k: v for k, v in (("hidden_dim", args.hidden_dim), ("attn_dim", args.attn_dim),
                                    ("dropout", args.dropout)) if v is not None}
            kw.update(args.model_args or {})
            kw.update(dict(args.model_arg))
            train(_bag_paths(args), args.labels, args.out, model=args.model, folds=args.folds, seed=args.seed,
                  epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, patience=args.patience,
                  val_fraction=args.val_fraction, model_kwargs=kw, device=args.device, task=args.task,
                  batch_size=args.batch_size, balance=args.balance, max_instances=args.max_instances,
                  standardize=args.standardize, aem=args.aem, aem_lambda=args.aem_lambda,
                  survival_loss=args.survival_loss, n_bins=args.n_bins, regression_loss=args.regression_loss,
                  optimizer=args.optimizer, betas=args.betas, schedule=args.schedule, min_lr=args.min_lr,
                  min_epochs=args.min_epochs, select=args.select, threads=args.threads,
                  allow_unknown_encoder=args.allow_unknown_encoder, regression_bounds=args.regression_bounds,
                  regression_threshold=args.regression_threshold)
        elif args.cmd == "predict":
            from .predict import predict

            predict(args.model_dir, _bag_paths(args), args.out, attention_dir=args.attention_dir, device=args.device,
                    threads=args.threads)
        elif args.cmd == "compare":
            from .compare import comparison_curves, write_comparison_csv

            print(compare_runs(args.runs))
            if args.out:
                write_comparison_csv(args.runs, args.out)
                logger.info("comparison of %d run(s) -> %s", len(args.runs), args.out)
            if args.curves:
                from ..files import write_json_atomic

                write_json_atomic(args.curves, comparison_curves(args.runs))
                logger.info("curve data -> %s", args.curves)
        elif args.cmd == "export":
            from .cohort import export_table

            info = export_table(_bag_paths(args), args.out, chunk_rows=args.chunk_rows)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
