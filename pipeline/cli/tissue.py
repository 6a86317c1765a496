"""``wsipipe tissue --slide PATH --out-dir DIR [--settings JSON] [slide options]``: tissue segmentation of
one slide (see :mod:`pipeline.tissue`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import _slide


def _work(args: argparse.Namespace) -> None:
    from ..log import get_logger
    from ..tissue import run_tissue

    p = _slide.settings(args, "tissue")
    with _slide.open_for(args) as slide:
        res = run_tissue(slide, Path(args.out_dir), p)
    st = res.get("stats", {})
    get_logger("tissue").info("%s: tissue %.2f mm², mpp %.4g (%s)", res["slide_id"], st.get("tissue_area_mm2", 0),
                              res["slide"]["level0_mpp"], res["slide"]["mpp_source"])


def _failed(args: argparse.Namespace, reason: str, stage: str) -> None:
    from ..tissue import write_failed

    write_failed(args.out_dir, _slide.slide_id(args), reason, _slide.settings(args, "tissue"), stage)


def main(argv: list[str] | None = None) -> int:
    p = _slide.parser("tissue", "Tissue segmentation of one slide: mask, thumbnail, GeoJSON, tissue.json.")
    p.add_argument("--out-dir", required=True, help="the slide's tissue folder")
    args = p.parse_args(argv)
    return _slide.run("tissue", args, _work, _failed)


if __name__ == "__main__":
    sys.exit(main())
