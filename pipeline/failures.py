"""Per-slide failure records and the end-of-run summary (``{results_dir}/failures.tsv``).

A stage that cannot process a slide writes ``{results_dir}/failures/{slide_id}.json`` with the stage,
a one-line reason and the slide path; a later successful run of that stage removes it. At the end of
every run the records are collected into ``failures.tsv`` and printed. With ``on_slide_error: skip``
the failing stage also writes explicit *failed* outputs (``"status": "failed"``) so the other slides
and MIL training go on; with ``fail`` the job fails.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Any

from .files import atomic_path, one_line, read_json_or_none, write_json_atomic
from .layout import Layout

STAGES = ("tissue", "grid", "features")


def record_path(results_dir: str | os.PathLike, slide_id: str) -> Path:
    return Path(Layout(results_dir).failure_record(slide_id))


def upstream_failure(path: str | os.PathLike) -> dict[str, Any] | None:
    """The failure recorded in an upstream stage's JSON output (``status: failed``), if it failed."""
    rec, _ = read_json_or_none(path)
    return rec if rec is not None and rec.get("status") == "failed" else None


def record_failure(results_dir: str | os.PathLike, slide_id: str, stage: str, reason: str, path: str) -> None:
    write_json_atomic(record_path(results_dir, slide_id), {
        "slide_id": slide_id, "stage": stage, "reason": one_line(reason), "path": str(path),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })


def read_failure(results_dir: str | os.PathLike, slide_id: str) -> dict[str, Any] | None:
    return read_json_or_none(record_path(results_dir, slide_id))[0]


def clear_failure(results_dir: str | os.PathLike, slide_id: str, stage: str) -> None:
    """A stage succeeded: drop a record that this stage (or a later one, now to be redone) wrote."""
    rec = read_failure(results_dir, slide_id)
    if rec and rec.get("stage") in STAGES[STAGES.index(stage):]:
        record_path(results_dir, slide_id).unlink(missing_ok=True)


def collect(results_dir: str | os.PathLike, slide_ids: list[str] | None = None) -> list[dict[str, Any]]:
    d = Path(Layout(results_dir).failures_dir())
    recs = []
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            rec = read_json_or_none(p)[0]
            if rec is None:
                continue
            if slide_ids is None or rec.get("slide_id") in slide_ids:
                recs.append(rec)
    return recs


def write_summary(results_dir: str | os.PathLike, slide_ids: list[str] | None = None, stream=sys.stderr) -> Path:
    """Write ``failures.tsv`` (header only when nothing failed) and print a short summary."""
    recs = collect(results_dir, slide_ids)
    out = Path(Layout(results_dir).failures_tsv())
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("slide_id\tstage\treason\tpath\n")
            for r in recs:
                fh.write("\t".join(one_line(str(r.get(k, ""))).replace("\t", " ")
                                   for k in ("slide_id", "stage", "reason", "path")) + "\n")
    if recs:
        print(f"\n{len(recs)} slide(s) failed (details in {out}):", file=stream)
        for r in recs:
            print(f"  {r.get('slide_id')} [{r.get('stage')}]: {r.get('reason')}", file=stream)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.failures", description="Summarise slide failures.")
    ap.add_argument("results_dir")
    a = ap.parse_args(argv)
    write_summary(a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
