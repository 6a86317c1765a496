# Helpers shared by the rules: config validation, slide discovery, paths and stage params.

import json
import sys
from pathlib import Path

import jsonschema
import yaml

from pipeline import STAGE_VERSIONS
from pipeline.provenance import fingerprints
from pipeline.store import model_tag
from pipeline.slide import SLIDE_EXTENSIONS, SlideError, discover_slides, manifest_mpp, read_manifest


def _coerce(cfg, schema):
    """`--config 'grid={target_mpp: 1.0}'` arrives as strings inside sections: convert a string to the
    number/boolean/null its schema expects (only where the schema does not allow a string)."""
    if not isinstance(cfg, dict):
        return
    for key, value in cfg.items():
        sub = (schema.get("properties") or {}).get(key) or {}
        if isinstance(value, dict):
            _coerce(value, sub)
            continue
        types = sub.get("type", [])
        types = [types] if isinstance(types, str) else types
        if isinstance(value, str) and types and "string" not in types:
            parsed = yaml.safe_load(value)
            if isinstance(parsed, (int, float, bool)) or parsed is None:
                cfg[key] = parsed


def _validate_config(cfg):
    schema_path = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    _coerce(cfg, schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        lines = []
        for e in errors:
            where = ".".join(str(p) for p in e.path) or "(top level)"
            lines.append(f"  config key {where}: {e.message}")
        raise ValueError("invalid configuration (see workflow/schemas/config.schema.yaml):\n" + "\n".join(lines))


_validate_config(config)

RESULTS = config["results_dir"].rstrip("/")
TAG = model_tag(config.get("features") or {})
LABELS = config.get("labels_csv") or None

try:
    SLIDES = discover_slides(config["slides_dir"], tuple(config.get("extensions") or SLIDE_EXTENSIONS))
    MANIFEST = read_manifest(LABELS)
except SlideError as exc:
    raise ValueError(f"cannot start: {exc}") from None

if not SLIDES:
    print(f"warning: no slide files found in {config['slides_dir']}", file=sys.stderr)

MIL_SLIDES = sorted(s for s in SLIDES if s in MANIFEST) if LABELS else []
if LABELS:
    _missing = sorted(set(MANIFEST) - set(SLIDES))
    if _missing:
        print(f"warning: {len(_missing)} slide(s) in {LABELS} have no file in {config['slides_dir']}: "
              f"{', '.join(_missing[:10])}{' ...' if len(_missing) > 10 else ''}", file=sys.stderr)


# Content fingerprints: a slide replaced by a different file reruns (it is in the tissue rule's params);
# touching a file does not (the profiles use content, settings and code as rerun triggers, not mtimes).
CONTENT = fingerprints(SLIDES, Path(RESULTS) / ".fingerprints.json")
LABELS_CONTENT = fingerprints({"labels": Path(LABELS)})["labels"] if LABELS else None


wildcard_constraints:
    slide="[^/]+",


def slide_path(wildcards):
    return str(SLIDES[wildcards.slide])


def stage_settings(section):
    """A stage's own config section, canonical JSON (the value Snakemake compares for reruns)."""
    return json.dumps(config.get(section) or {}, sort_keys=True)


def slide_args(wildcards):
    """Options every per-slide stage gets: reader, the slide's manifest mpp (if any), failure handling.
    Per slide, so that changing one slide's mpp in the labels CSV reruns that slide only."""
    args = (f"--reader {config.get('reader', 'auto')} --on-error {config.get('on_slide_error', 'skip')} "
            f"--results-dir '{RESULTS}'")
    try:
        mpp = manifest_mpp(MANIFEST, wildcards.slide)
    except SlideError as exc:
        raise ValueError(f"{LABELS}: {exc}") from None
    if mpp is not None:
        args += f" --mpp {mpp}"
    if config.get("default_mpp") is not None:
        args += f" --default-mpp {config['default_mpp']}"
    return args


WEIGHTS_NAME = "".join(c if c.isalnum() or c in "-_." else "_"
                       for c in str((config.get("features") or {}).get("model", "resnet50_trunc")))


def weights_lock():
    """The pinned-weights lock file, when weights come from the hub (features.pretrained)."""
    if (config.get("features") or {}).get("pretrained"):
        return [f"{RESULTS}/weights/{WEIGHTS_NAME}.lock.json"]
    return []


def bag(slide):
    return f"{RESULTS}/features/{TAG}/{slide}.zarr"


def all_targets():
    targets = []
    for s in SLIDES:
        targets += [f"{RESULTS}/tissue/{s}/tissue.json", f"{RESULTS}/grid/{s}.json", bag(s)]
    if MIL_SLIDES:
        m = config["mil"]["model"]
        targets += [f"{RESULTS}/mil/{TAG}/{m}/metrics.json", f"{RESULTS}/mil/{TAG}/{m}/predictions_all.csv"]
        targets += heatmap_targets()
    targets.append(f"{RESULTS}/report/index.html")
    return targets


def mil_args():
    """Command-line options of `python -m pipeline.mil train` from the mil config section."""
    m = config["mil"]
    keys = {"folds": "--folds", "seed": "--seed", "epochs": "--epochs", "lr": "--lr",
            "weight_decay": "--weight-decay", "patience": "--patience", "hidden_dim": "--hidden-dim",
            "dropout": "--dropout", "val_fraction": "--val-fraction"}
    return " ".join(f"{flag} {m[k]}" for k, flag in keys.items() if m.get(k) is not None)


def write_failure_summary():
    """End of run: collect per-slide failure records into failures.tsv and print them."""
    from pipeline.failures import write_summary

    if Path(RESULTS).is_dir():
        write_summary(RESULTS, list(SLIDES))


def lock_results_dir():
    """Refuse to start when another run holds the results folder (see pipeline/runlock.py)."""
    from pipeline.runlock import RunLockError, acquire

    try:
        acquire(RESULTS)
    except RunLockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1)


def heatmap_targets(mil_model=None):
    """PNG + GeoJSON heatmap of every slide for the configured MIL model (none without labels)."""
    if not MIL_SLIDES:
        return []
    m = mil_model or config["mil"]["model"]
    return [f"{RESULTS}/heatmaps/{TAG}/{m}/{s}.{ext}" for s in SLIDES for ext in ("png", "geojson")]
