"""The results layout: where every output of a run lives, in one place.

::

    {results_dir}/
      tissue/{slide}/mask.png, thumbnail.png, tissue.geojson, tissue.json
      grid/{slide}.json
      features/{tag}/{slide}.zarr, features/{tag}/.batches/{batch}.json
      mil/{tag}/{mil_model}/metrics.json, predictions.csv, model_config.json, predictions_all.csv,
                            fold_{k}/model.pt, attention/{slide}.csv
      heatmaps/{tag}/{mil_model}/{slide}.png, {slide}.geojson
      failures/{slide}.json, failures.tsv
      report/index.html, preflight.json
      weights/{model}.lock.json
      logs/{stage}/...

The Snakemake rules, the stages, the QC report, the pre-flight estimate and the failure summary all ask a
:class:`Layout` for paths; none spells them out. Arguments may be real names or Snakemake wildcard
patterns such as ``"{slide}"`` (paths are plain strings joined with ``/``, so patterns pass through).
"""

from __future__ import annotations

import os
from pathlib import Path

from .files import safe_name

#: The files of the tissue stage's per-slide folder.
TISSUE_FILES = {"mask": "mask.png", "thumbnail": "thumbnail.png", "geojson": "tissue.geojson",
                "stats": "tissue.json"}


class Layout:
    """Paths of one results folder. ``tag``: the feature folder (``features.tag`` or the model name);
    ``None`` where a reader looks at every tag (see :meth:`tags`)."""

    def __init__(self, results_dir: str | os.PathLike, tag: str | None = None):
        self.root = str(results_dir).rstrip("/") or "/"
        self.tag = tag

    def __repr__(self) -> str:
        return f"Layout({self.root!r}, tag={self.tag!r})"

    def _p(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _tag(self, tag: str | None) -> str:
        t = tag or self.tag
        if not t:
            raise ValueError("this path needs a feature tag (Layout(..., tag=...))")
        return t

    # -- tissue, grid, features ------------------------------------------------------------------
    def tissue_dir(self, slide: str) -> str:
        return self._p("tissue", slide)

    def tissue_file(self, slide: str, kind: str) -> str:
        """``kind``: mask, thumbnail, geojson or stats (tissue.json)."""
        return self._p("tissue", slide, TISSUE_FILES[kind])

    def tissue_json(self, slide: str) -> str:
        return self.tissue_file(slide, "stats")

    def grid(self, slide: str) -> str:
        return self._p("grid", f"{slide}.json")

    def features_dir(self, tag: str | None = None) -> str:
        return self._p("features", self._tag(tag))

    def bag(self, slide: str, tag: str | None = None) -> str:
        return self._p("features", self._tag(tag), f"{slide}.zarr")

    def features_batch(self, batch: str, tag: str | None = None) -> str:
        """The manifest a feature job writes for its batch of slides (the job's Snakemake output)."""
        return self._p("features", self._tag(tag), ".batches", f"{batch}.json")

    # -- MIL and heatmaps ------------------------------------------------------------------------
    def mil_dir(self, mil_model: str, tag: str | None = None) -> str:
        return self._p("mil", self._tag(tag), mil_model)

    def mil_file(self, mil_model: str, name: str, tag: str | None = None) -> str:
        """A file of a MIL run: metrics.json, predictions.csv, model_config.json, predictions_all.csv."""
        return self._p("mil", self._tag(tag), mil_model, name)

    def mil_comparison(self, ext: str, tag: str | None = None) -> str:
        """``comparison.csv`` (every MIL run's metrics, mean ± sd over folds) or ``comparison_curves.json``."""
        return self._p("mil", self._tag(tag), "comparison.csv" if ext == "csv" else "comparison_curves.json")

    def mil_attention_dir(self, mil_model: str, tag: str | None = None) -> str:
        return self._p("mil", self._tag(tag), mil_model, "attention")

    def mil_root(self) -> str:
        return self._p("mil")

    def heatmaps_dir(self) -> str:
        return self._p("heatmaps")

    def heatmap(self, mil_model: str, slide: str, ext: str, tag: str | None = None) -> str:
        """``ext``: png or geojson."""
        return self._p("heatmaps", self._tag(tag), mil_model, f"{slide}.{ext}")

    # -- run-level files -------------------------------------------------------------------------
    def failures_dir(self) -> str:
        return self._p("failures")

    def failure_record(self, slide: str) -> str:
        return self._p("failures", f"{slide}.json")

    def failures_tsv(self) -> str:
        return self._p("failures.tsv")

    def report_html(self) -> str:
        return self._p("report", "index.html")

    def preflight_json(self) -> str:
        return self._p("preflight.json")

    def weights_lock(self, model: str) -> str:
        return self._p("weights", f"{safe_name(model)}.lock.json")

    def fingerprints_cache(self) -> str:
        return self._p(".fingerprints.json")

    def run_lock(self) -> str:
        return self._p(".wsipipe.lock")

    def cohort_json(self) -> str:
        """The cohort check written when a run starts: labels vs slides, files left out (for the report)."""
        return self._p("cohort.json")

    def cohort_file(self, name: str) -> str:
        """Lists the workflow writes for rules that take many inputs (one path per line)."""
        return self._p(".cohort", name)

    def log(self, stage: str, name: str) -> str:
        """``logs/{stage}/{name}.log``; ``name`` may contain ``/`` (e.g. ``{tag}/{slide}``)."""
        return self._p("logs", stage, f"{name}.log")

    # -- discovery (readers of an existing results folder) ---------------------------------------
    def tags(self) -> list[str]:
        """This layout's tag, or every feature folder present when it has none."""
        if self.tag:
            return [self.tag] if Path(self._p("features", self.tag)).is_dir() else []
        base = Path(self._p("features"))
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def mil_runs(self, mil_model: str | None = None) -> list[Path]:
        """Folders holding a MIL ``metrics.json`` (restricted to this tag / ``mil_model`` when given)."""
        base = Path(self.mil_root())
        if not base.is_dir():
            return []
        tags = [base / self.tag] if self.tag else sorted(p for p in base.iterdir() if p.is_dir())
        runs = []
        for t in tags:
            if not t.is_dir():
                continue
            models = [t / mil_model] if mil_model else sorted(p for p in t.iterdir() if p.is_dir())
            runs += [m for m in models if (m / "metrics.json").is_file()]
        return runs

    def slide_ids(self) -> list[str]:
        """Every slide with a tissue folder, a grid or a bag (of this tag, or any)."""
        ids: set[str] = set()
        t = Path(self._p("tissue"))
        if t.is_dir():
            ids.update(p.name for p in t.iterdir() if p.is_dir() and not p.name.startswith("."))
        g = Path(self._p("grid"))
        if g.is_dir():
            ids.update(p.stem for p in g.glob("*.json") if not p.name.startswith("."))
        for tag in self.tags():
            f = Path(self.features_dir(tag))
            ids.update(p.name[:-5] for p in f.glob("*.zarr") if p.is_dir() and not p.name.startswith("."))
        return sorted(ids)
