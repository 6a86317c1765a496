"""``wsipipe grid --slide PATH --tissue-dir DIR --out FILE [--settings JSON] [slide options]``: the patch
grid of one slide at an exact µm/px (see :mod:`pipeline.grid`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import _slide


def _work(args: argparse.Namespace) -> None:
    from ..grid import run_grid
    from ..layout import TISSUE_FILES
    from ..log import get_logger

    if _slide.skip_if_upstream_failed("grid", args, str(Path(args.tissue_dir) / TISSUE_FILES["stats"]), _failed):
        return
    p = _slide.settings(args, "grid")
    with _slide.open_for(args) as slide:
        g = run_grid(slide, Path(args.tissue_dir), Path(args.out), p)
    plan = g["read_plan"]
    get_logger("grid").info("%s: %d/%d patches of %d px at %.4g µm/px (requested %s); level %d read %d px",
                            g["slide_id"], g["n_patches"], g["n_candidates"], plan["patch_size_px"],
                            plan["effective_mpp"], plan["requested_mpp"], plan["level"], plan["read_size_px"])


def _failed(args: argparse.Namespace, reason: str, stage: str) -> None:
    from ..grid import write_failed
    write_failed(args.out, _slide.slide_id(args), reason, _slide.settings(args, "grid"), stage)


def main(argv: list[str] | None = None) -> int:
    p = _slide.parser("grid", "Patch grid of one slide at an exact µm/px, with its read plan.")
    p.add_argument("--tissue-dir", required=True, help="the slide's tissue folder")
    p.add_argument("--out", required=True, help="grid JSON to write")
    args = p.parse_args(argv)
    return _slide.run("grid", args, _work, _failed)


if __name__ == "__main__":
    sys.exit(main())
