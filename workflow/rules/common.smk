# Shared by the rules: the configuration resolved once, the slides, the results layout and input functions.
#
# The config is validated against workflow/schemas/config.schema.yaml and every section resolved by
# pipeline.config (the one home of every default). Each rule hands its stage the resolved settings as one
# `--settings` JSON object, and the same JSON is in the rule's params, so a changed setting (or a changed
# default) reruns exactly that stage and what depends on it. Paths come from pipeline.layout.Layout.
# Nothing here imports torch: planning stays fast.

import json
import os
import shlex
import re
import sys
from pathlib import Path

from pipeline import STAGE_VERSIONS
from pipeline.config import ConfigError, canonical, load_schema, load_workflow_config
from pipeline.files import safe_name
from pipeline.layout import Layout
from pipeline.provenance import fingerprints
from pipeline.slide import SlideError, discover_cohort, format_reconcile, manifest_mpp, read_manifest, reconcile


try:
    CFG = load_workflow_config(config, load_schema(Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"))
except ConfigError as exc:
    raise ValueError(str(exc)) from None

TOP = CFG.top
RESULTS = CFG.results_dir
TAG = CFG.tag
LAYOUT = Layout(RESULTS, TAG)
MIL_RUNS = CFG.mil  # MIL run name -> the settings of that run (several models train on the same folds)
MIL_MODEL = next(iter(MIL_RUNS))  # the first run: its attention makes the heatmaps
FEATURES = CFG.stages["features"]
SLIDES_FROM = TOP["slides_csv"] or TOP["slides_dir"]

try:
    SLIDES = discover_cohort(slides_dir=None if TOP["slides_csv"] else TOP["slides_dir"],
                             slides_csv=TOP["slides_csv"], recursive=TOP["slides_recursive"],
                             extensions=tuple(TOP["extensions"]))
except (SlideError, ValueError) as exc:
    raise ValueError(f"cannot start: {exc}") from None
# The labels: labels_csv, else a slide list that carries label columns.
LABELS = TOP["labels_csv"] or (TOP["slides_csv"] if any(
    ("label" in r or "time" in r) for r in SLIDES.rows.values()) else None)
try:
    MANIFEST = read_manifest(LABELS)
except SlideError as exc:
    raise ValueError(f"cannot start: {exc}") from None
COHORT_CHECK = reconcile(SLIDES, MANIFEST)

if not SLIDES:
    print(f"warning: no slide files found in {SLIDES_FROM}", file=sys.stderr)
if not os.environ.get("SLURM_JOB_ID"):  # printed once by the main process, not by every cluster job
    for _line in format_reconcile(COHORT_CHECK, LABELS) + [f"note: {n}" for n in SLIDES.notes[:10]]:
        print(_line, file=sys.stderr)

MIL_SLIDES = sorted(s for s in SLIDES if s in MANIFEST) if LABELS else []


# Content fingerprints: a slide replaced by a different file reruns (it is in the tissue rule's params);
# touching a file does not (the profiles use content, settings and code as rerun triggers, not mtimes).
CONTENT = fingerprints(SLIDES, LAYOUT.fingerprints_cache())
LABELS_CONTENT = fingerprints({"labels": Path(LABELS)})["labels"] if LABELS else None


# Feature jobs encode batches of slides (features.slides_per_job, in sorted slide order) with one encoder
# each; the bags are a cache checked by content (pipeline/features/batch.py). With on_slide_error: fail a
# broken slide must stop only itself, so every feature job then holds one slide.
_PER_JOB = 1 if TOP["on_slide_error"] == "fail" else FEATURES["slides_per_job"]
_ORDER = sorted(SLIDES)
BATCHES = {f"{k:05d}": _ORDER[i:i + _PER_JOB] for k, i in enumerate(range(0, len(_ORDER), _PER_JOB))}
BATCH_OF = {s: b for b, members in BATCHES.items() for s in members}


def bag_manifests(slides):
    """The feature-batch manifests that stand for the bags of ``slides`` (the jobs' outputs)."""
    return sorted({LAYOUT.features_batch(BATCH_OF[s]) for s in slides})


def batch_spec(wildcards):
    """The batch of one feature job as JSON: per slide its id, file, grid, bag, manifest µm/px and content
    fingerprint (so a changed slide, grid or mpp changes this job's params and reruns it)."""
    rows = []
    for s in BATCHES[wildcards.batch]:
        row = {"slide_id": s, "slide": str(SLIDES[s]), "grid": LAYOUT.grid(s), "out": LAYOUT.bag(s),
               "content": CONTENT[s]}
        try:
            mpp = manifest_mpp(MANIFEST, s)
        except SlideError as exc:
            raise ValueError(f"{LABELS}: {exc}") from None
        if mpp is not None:
            row["mpp"] = mpp
        rows.append(row)
    return json.dumps(rows, ensure_ascii=False)


# Cohort-wide lists (one slide id or bag path per line) for the rules that take the whole cohort (MIL,
# report, pre-flight), so that no command line carries thousands of paths. Written when a run starts; the
# same lists are those rules' inputs, so a slide added or removed reruns them.
COHORT_LISTS = {
    "slides": sorted(SLIDES),
    "bags": [LAYOUT.bag(s) for s in SLIDES],
    "mil_bags": [LAYOUT.bag(s) for s in MIL_SLIDES],
}


wildcard_constraints:
    slide="[^/]+",
    mil_model="|".join(re.escape(m) for m in MIL_RUNS),
    batch="[0-9]+",


def settings(stage):
    """A stage's resolved settings as canonical JSON: what its command gets and what Snakemake compares."""
    return CFG.settings(stage)


def slide_path(wildcards):
    return str(SLIDES[wildcards.slide])


def common_slide_args():
    """Options every slide stage gets: reader, failure handling, default mpp."""
    args = f"--reader {TOP['reader']} --on-error {TOP['on_slide_error']} --results-dir '{RESULTS}'"
    if TOP["default_mpp"] is not None:
        args += f" --default-mpp {TOP['default_mpp']}"
    return args


def slide_args(wildcards):
    """common_slide_args() plus the slide's id and manifest mpp (if any). Per slide, so that changing one
    slide's mpp in the labels CSV reruns that slide only."""
    args = common_slide_args() + f" --slide-id {shlex.quote(wildcards.slide)}"
    try:
        mpp = manifest_mpp(MANIFEST, wildcards.slide)
    except SlideError as exc:
        raise ValueError(f"{LABELS}: {exc}") from None
    if mpp is not None:
        args += f" --mpp {mpp}"
    return args


def weights_lock():
    """The pinned-weights lock file, when weights come from the hub (features.pretrained)."""
    return [LAYOUT.weights_lock(FEATURES["model"])] if FEATURES["pretrained"] else []


def mil_targets():
    """Every MIL run's metrics and predictions, the comparison of the runs and the heatmaps of the first
    run (none without labels)."""
    if not MIL_SLIDES:
        return []
    out = [LAYOUT.mil_file(m, f) for m in MIL_RUNS for f in ("metrics.json", "predictions_all.csv")]
    return out + [LAYOUT.mil_comparison("csv"), LAYOUT.mil_comparison("json")] + heatmap_targets()


def mil_settings(wildcards):
    """The settings of one MIL run (canonical JSON): what its training job gets and compares for reruns."""
    return canonical(MIL_RUNS[wildcards.mil_model])


def heatmap_targets(mil_model=None):
    """PNG + GeoJSON heatmap of every slide for the configured MIL model (none without labels)."""
    if not MIL_SLIDES:
        return []
    m = mil_model or MIL_MODEL
    return [LAYOUT.heatmap(m, s, ext) for s in SLIDES for ext in ("png", "geojson")]


def all_targets():
    targets = []
    for s in SLIDES:
        targets += [LAYOUT.tissue_json(s), LAYOUT.grid(s)]
    targets += bag_manifests(SLIDES)
    targets += mil_targets()
    targets.append(LAYOUT.report_html())
    return targets


def write_failure_summary():
    """End of run: collect per-slide failure records into failures.tsv and print them."""
    from pipeline.failures import write_summary

    if Path(RESULTS).is_dir():
        write_summary(RESULTS, list(SLIDES))


def write_cohort_lists():
    """Write the COHORT_LISTS files (at the start of a run, before any job reads them) and the cohort check
    (labels vs slides, files left out) for the report."""
    from pipeline.files import write_json_atomic, write_text_atomic

    for name, lines in COHORT_LISTS.items():
        write_text_atomic(LAYOUT.cohort_file(f"{name}.txt"), "".join(f"{line}\n" for line in lines))
    write_json_atomic(LAYOUT.cohort_json(), {**COHORT_CHECK, "labels": LABELS, "slides_from": SLIDES_FROM,
                                             "notes": list(SLIDES.notes)})


def check_cluster_fits():
    """SLURM runs: before anything is submitted, compare every submission's request with the nodes of its
    partition (pipeline/cluster.py) and stop, naming the rule, the request and the largest node, when one
    could never start. WSIPIPE_SLURM_CHECK=0 skips it; WSIPIPE_SLURM_PROFILE names another profile."""
    plugin = workflow.executor_plugin
    if getattr(plugin, "name", "") != "slurm" or os.environ.get("WSIPIPE_SLURM_CHECK", "1") == "0":
        return
    from pipeline.cluster import ClusterError, check_cluster

    profile = os.environ.get("WSIPIPE_SLURM_PROFILE") or str(Path(workflow.basedir) / "profiles" / "slurm")
    try:
        res = check_cluster(profile, config=config, threads={"features": 2 + FEATURES["num_workers"]})
    except ClusterError as exc:
        print(f"warning: cannot check the cluster's nodes ({exc}); submitting anyway", file=sys.stderr)
        return
    for f in res["findings"]:
        print(f["message"], file=sys.stderr)
    if not res["ok"]:
        print("error: these submissions would stay pending for ever; nothing was submitted "
              "(docs/cluster.md, `wsipipe cluster check`)", file=sys.stderr)
        raise SystemExit(1)


def lock_results_dir():
    """Refuse to start when another run holds the results folder (see pipeline/runlock.py)."""
    from pipeline.runlock import RunLockError, acquire

    try:
        acquire(RESULTS)
    except RunLockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1)
