"""What the per-slide stage commands (``wsipipe tissue|grid|features``) share: the slide options, opening
the slide with its µm/px, and the per-slide failure handling.

A slide that cannot be used is reported with one line naming the file and the reason, and recorded under
``{results}/failures/`` when ``--results-dir`` is given. With ``--on-error fail`` (the default by hand) the
command exits 1 and writes nothing; with ``--on-error skip`` (the workflow's default) the stage writes its
explicit *failed* outputs (``"status": "failed"``) so downstream stages and MIL go on without that slide.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from .. import failures
from ..config import ConfigError, parse_settings
from ..log import get_logger, setup
from ..slide import Slide, SlideError, manifest_mpp, open_slide, read_manifest, slide_id_from_path


def parser(stage: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every per-slide stage takes."""
    p = argparse.ArgumentParser(prog=f"wsipipe {stage}", description=description)
    p.add_argument("--slide", required=True, help="slide file (or the folder of a DICOM series)")
    p.add_argument("--slide-id", default=None,
                   help="the slide's id in the cohort (default: the file name without its extension)")
    p.add_argument("--reader", default="auto", choices=["auto", "openslide", "tiffslide"])
    p.add_argument("--labels", default=None, help="labels/manifest CSV (slide_id[,mpp])")
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px of this slide (overrides metadata)")
    p.add_argument("--default-mpp", type=float, default=None,
                   help="fallback level-0 µm/px for slides without metadata")
    p.add_argument("--settings", default=None,
                   help=f"the {stage} settings as a JSON object (or @FILE); missing keys take their defaults")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="fail: exit 1; skip: write explicit failed outputs and exit 0")
    p.add_argument("--results-dir", default=None, help="record failures under RESULTS/failures/")
    return p


def settings(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """The stage's resolved settings from ``--settings`` (defaults filled in, unknown keys refused)."""
    return parse_settings(args.settings, stage)


def slide_id(args: argparse.Namespace) -> str:
    """``--slide-id``, else the id derived from the file name."""
    return args.slide_id or slide_id_from_path(args.slide)


def open_for(args: argparse.Namespace) -> Slide:
    """Open ``--slide`` with its level-0 µm/px: ``--mpp``, else the labels CSV's ``mpp`` column, else the
    slide's metadata, else ``--default-mpp`` (see :func:`pipeline.slide.open_slide`)."""
    mpp = args.mpp
    if mpp is None and args.labels:
        mpp = manifest_mpp(read_manifest(args.labels), slide_id(args))
    return open_slide(args.slide, reader=args.reader, mpp=mpp, default_mpp=args.default_mpp, slide_id=slide_id(args))


def retryable(exc: BaseException) -> bool:
    """A failure that is not the slide's (disk full, the file replaced while it was read): the job fails
    and a rerun completes it, so no explicit failed outputs are written whatever ``--on-error`` says."""
    from ..files import is_disk_full

    return bool(getattr(exc, "retryable", False)) or is_disk_full(exc)


def run(stage: str, args: argparse.Namespace, work: Callable[[argparse.Namespace], None],
        write_failed: Callable[[argparse.Namespace, str, str], None]) -> int:
    """Run ``work(args)`` for one slide with the per-slide failure handling (module docstring).
    ``write_failed(args, reason, failed_stage)`` writes the stage's explicit failed outputs."""
    setup()
    log = get_logger(stage)
    sid = slide_id(args)
    try:
        work(args)
    except ConfigError as exc:  # the settings, not the slide: nothing to record or write
        log.error("%s", exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - every failure is reported per slide, in one line
        if isinstance(exc, SlideError):
            reason = exc.reason if exc.path == str(args.slide) else str(exc)
        elif isinstance(exc, (ValueError, OSError)):
            reason = str(exc)
        else:  # unexpected: keep the traceback in the job log
            log.debug("traceback", exc_info=True)
            import traceback

            traceback.print_exc()
            reason = f"{type(exc).__name__}: {exc}"
        reason = failures.one_line(reason)
        log.error("%s: %s", args.slide, reason)
        if args.results_dir:
            try:
                failures.record_failure(args.results_dir, sid, stage, reason, args.slide)
            except OSError:  # e.g. the full disk itself
                pass
        if args.on_error == "fail" or retryable(exc):
            return 1
        write_failed(args, reason, stage)
        log.info("%s: failed outputs written (on_slide_error=skip)", sid)
        return 0
    if args.results_dir:
        failures.clear_failure(args.results_dir, sid, stage)
    return 0


def skip_if_upstream_failed(stage: str, args: argparse.Namespace, upstream_json: str,
                            write_failed: Callable[[argparse.Namespace, str, str], None]) -> bool:
    """When the upstream stage wrote a failed output, write this stage's failed outputs (naming the stage
    that failed and why) and return True."""
    up = failures.upstream_failure(upstream_json)
    if not up:
        return False
    write_failed(args, up.get("error", "failed upstream"), up.get("stage", "upstream"))
    get_logger(stage).info("%s: skipped, %s failed", slide_id(args), up.get("stage"))
    return True
