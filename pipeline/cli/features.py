"""``wsipipe features``: encode the grid patches of slides into Zarr feature bags.

    wsipipe features --slide PATH --grid FILE --out BAG [--settings JSON] [--weights-lock LOCK] [slide options]
    wsipipe features --batch SPEC [--manifest FILE] [--settings JSON] [--weights-lock LOCK] [slide options]

One slide, or a batch (``SPEC``: a JSON list of ``{slide_id, slide, grid, out[, mpp, content]}``, or
``@FILE``) with one encoder for the whole batch, as the workflow's feature jobs run it. Bags that are up
to date (same slide content, grid, settings and weights) are left untouched; see
:mod:`pipeline.features.batch`. Exit status 1 when a slide failed with ``--on-error fail``.
"""

from __future__ import annotations

import sys

from . import _slide


def main(argv: list[str] | None = None) -> int:
    p = _slide.parser("features", "Encode the grid patches of one slide, or of a batch of slides, into Zarr "
                                  "feature bags (one encoder per batch; up-to-date bags are kept).")
    p.set_defaults(slide=None)
    for a in p._actions:
        if a.dest == "slide":
            a.required = False
    p.add_argument("--grid", default=None, help="the slide's grid JSON (one slide)")
    p.add_argument("--out", default=None, help="bag to write (*.zarr) (one slide)")
    p.add_argument("--batch", default=None, metavar="SPEC",
                   help="JSON list of {slide_id, slide, grid, out[, mpp, content]} (or @FILE): a batch")
    p.add_argument("--batch-id", default="", help="name of the batch (for the log and the manifest)")
    p.add_argument("--manifest", default=None, help="write the batch manifest here (last, atomically)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: torch's)")
    p.add_argument("--weights-lock", default=None, help="lock file written by `wsipipe weights prefetch`")
    args = p.parse_args(argv)
    from ..config import ConfigError
    from ..features.batch import SlideJob, read_spec, run_batch
    from ..log import get_logger, setup
    from ..slide import SlideError, manifest_mpp, read_manifest

    setup()
    log = get_logger("features")
    try:
        settings = _slide.settings(args, "features")
        if args.weights_lock:
            from ..features.weights import apply_lock

            settings = apply_lock(settings, args.weights_lock)
        if args.batch:
            jobs = read_spec(args.batch)
        elif args.slide and args.grid and args.out:
            mpp = args.mpp
            if mpp is None and args.labels:
                mpp = manifest_mpp(read_manifest(args.labels), _slide.slide_id(args))
            jobs = [SlideJob(_slide.slide_id(args), args.slide, args.grid, args.out, mpp=mpp)]
        else:
            p.error("give --slide, --grid and --out (one slide) or --batch SPEC")
    except (ConfigError, ValueError, OSError, SlideError) as exc:
        log.error("%s", exc)
        return 1
    jobs = run_batch(jobs, settings, reader=args.reader, default_mpp=args.default_mpp, on_error=args.on_error,
                     results_dir=args.results_dir, manifest=args.manifest, threads=args.threads,
                     batch_id=args.batch_id)
    failed = [j for j in jobs if j.status == "failed"]
    retry = [j for j in failed if j.extra.get("retryable")]
    return 1 if (failed and args.on_error == "fail") or retry else 0


if __name__ == "__main__":
    sys.exit(main())
