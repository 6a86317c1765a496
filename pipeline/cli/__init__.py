"""``wsipipe``: one command line for every stage and tool of the pipeline.

    wsipipe tissue|grid|features ...   one stage on one slide (what the workflow's jobs run)
    wsipipe mil train|predict|compare|export|models ...
    wsipipe heatmap|report|preflight ...
    wsipipe bench|synthetic|weights|failures|store|cluster ...

``wsipipe --help`` lists the subcommands, ``wsipipe CMD --help`` explains one. ``python -m pipeline CMD``
is the same program (the Snakemake rules call it that way, so a workflow runs without the console script
on PATH), and each tool's own ``python -m pipeline.<module>`` keeps working.

Subcommands are a table (name -> module, summary): a module is imported only when its subcommand runs,
so ``wsipipe --help`` and the light subcommands never import torch. A new subcommand is one row here and
a module with ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys

from .. import __version__

#: name -> (module with ``main(argv)``, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "tissue": ("pipeline.cli.tissue", "tissue segmentation of one slide (mask, thumbnail, GeoJSON, stats)"),
    "grid": ("pipeline.cli.grid", "patch grid of one slide at an exact µm/px, with its read plan"),
    "features": ("pipeline.cli.features", "encode the grid patches of one slide into a Zarr feature bag"),
    "mil": ("pipeline.mil.__main__", "MIL training, prediction, model comparison, cohort export"),
    "heatmap": ("pipeline.heatmap", "attention / instance-score heatmap PNG and QuPath GeoJSON of one slide"),
    "report": ("pipeline.report", "cohort QC report (one self-contained HTML file)"),
    "preflight": ("pipeline.preflight", "patches per slide and the expected extraction time"),
    "bench": ("pipeline.bench", "throughput benchmarks (read, model, extract)"),
    "synthetic": ("pipeline.synthetic", "synthetic pyramidal slides with ground truth (demo, tests)"),
    "weights": ("pipeline.features.weights", "fetch and pin encoder weights from the Hugging Face hub"),
    "failures": ("pipeline.failures", "summarise the per-slide failures of a results folder"),
    "store": ("pipeline.store", "import CLAM/TRIDENT/STAMP .h5 features as bags; export bags as CLAM .h5"),
    "cluster": ("pipeline.cluster", "check that the SLURM profile's requests fit the cluster's nodes"),
}


def usage() -> str:
    w = max(len(c) for c in COMMANDS)
    lines = ["usage: wsipipe [--version] COMMAND [ARGS ...]", "",
             "Whole-slide images -> tissue -> patch grid -> Zarr feature bags -> MIL.", "", "commands:"]
    lines += [f"  {name:<{w}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`wsipipe COMMAND --help` explains a command; `python -m pipeline` is the same program."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"wsipipe {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"wsipipe: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
