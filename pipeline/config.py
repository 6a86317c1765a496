"""The one configuration path: every setting's default, and how a config becomes each stage's settings.

Everything the user can set lives here once:

* :data:`TOP_DEFAULTS`: the workflow's top-level keys (``slides_dir``, ``results_dir``, ...);
* :data:`STAGE_DEFAULTS`: one dict per stage section of ``config.yaml`` (``tissue``, ``grid``,
  ``features``, ``mil``, ``heatmap``, ``report``, ``preflight``).

:func:`resolve` turns a (partial) section into the stage's complete, checked settings: defaults filled in,
unknown keys and invalid values refused with a message naming ``section.key``. The stages call it on
whatever they are given (so the Python API and the command line behave like the workflow), and the
workflow calls :func:`load_workflow_config` once, which validates the whole config against the JSON
schema, resolves every section and derives the settings of the stages that read several sections
(``preflight``, ``report``). Those resolved settings are handed to every rule's command as one
``--settings`` JSON object and are also what Snakemake compares to decide reruns (``params``).

This module imports neither torch nor the MIL models: MIL model arguments are checked against the
factories' signatures read from the model files' source (:func:`mil_model_params`), so that planning a
workflow never pays the start-up of torch.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .files import safe_name
from .slide import READERS, SLIDE_EXTENSIONS

#: Top-level keys of the workflow configuration.
TOP_DEFAULTS: dict[str, Any] = {
    "slides_dir": "slides",
    "slides_csv": None,
    "slides_recursive": False,
    "labels_csv": None,
    "results_dir": "results",
    "reader": "auto",
    "default_mpp": None,
    "extensions": list(SLIDE_EXTENSIONS),
    "gpus_per_feature_job": 1,
    "on_slide_error": "skip",
}

#: Every stage's settings and their defaults (the sections of config.yaml).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tissue": {
        "seg_mpp": 8.0,                  # µm/px of the image the segmentation runs on
        "blur_um": 64.0,                 # median blur window (µm) applied to saturation/value
        "min_saturation": 20,            # floor on the Otsu threshold of HSV saturation (0-255)
        "min_value": 30,                 # pixels with HSV value below this are not tissue (pen, borders)
        "close_um": 32.0,                # morphological closing radius (µm)
        "min_tissue_area_um2": 20000.0,  # components smaller than this are dropped
        "fill_holes_max_um2": 5000.0,    # holes smaller than this are filled
        "thumbnail_max_px": 1024,        # longest side of thumbnail.png
    },
    "grid": {
        "patch_size": 224,
        "target_mpp": 0.5,
        "stride": None,  # in patch pixels at target_mpp; None = patch_size (no overlap)
        "min_tissue_fraction": 0.25,
        # Reading a level coarser than the target would need upsampling. Allow a little (a 0.26 µm/px
        # scan for a 0.25 target) but refuse more, which would invent detail.
        "max_upsample": 1.1,
    },
    "features": {
        "model": "resnet50_trunc",
        "tag": None,  # folder name under features/; default: the model name
        "pretrained": False,  # timm / hub weights (needs network)
        "weights": None,  # local weights file (safetensors or torch checkpoint)
        "seed": 0,  # seed of the random init when neither weights nor pretrained is set
        "batch_size": 64,
        "num_workers": 2,  # patch-reader processes (0: read in the job's own process)
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "chunk_rows": 1024,  # rows per Zarr chunk; rounded up to a multiple of batch_size
        "resize": "auto",  # auto (on the device with CUDA, else cpu) | cpu (readers, OpenCV INTER_AREA) | device
        "gpu_decode": False,  # decode JPEG tiles on the GPU (nvJPEG); checked, CPU readers as fallback
        "slides_per_job": 16,  # slides encoded by one feature job (one encoder start per job)
    },
    "mil": {
        # which models: `models` (several, trained on the same folds: {run name: {options}}) or `model` (one);
        # neither: DEFAULT_MIL_MODEL
        "models": None,
        "model": None,
        # shared by every model of a run (they decide the data and the folds)
        "task": "auto",  # auto | classification | survival | regression
        "folds": 5,
        "seed": 0,
        "val_fraction": 0.2,
        "survival_loss": "nll",  # nll | cox
        "n_bins": 4,
        "regression_loss": "mse",  # mse | mae
        "regression_bounds": None,  # [lo, hi]: bounded regression output lo + (hi - lo)·sigmoid (WeakSTIL)
        "regression_threshold": None,  # also the AUC of the prediction for target >= threshold
        "device": "auto",  # auto (CUDA when available) | cpu | cuda | cuda:N
        "threads": None,  # torch CPU threads; None: the job's threads
        "allow_unknown_encoder": False,  # mix imported bags of unknown encoder with others
        # training recipe, per model overridable; None: the model paper's (pipeline/mil/*.py registrations)
        "epochs": None,
        "lr": None,
        "weight_decay": None,
        "optimizer": None,
        "betas": None,
        "schedule": None,
        "min_lr": None,
        "patience": None,
        "min_epochs": None,
        "select": None,
        "batch_size": None,
        "balance": "loss",  # loss | sampler | none
        "max_instances": None,
        "standardize": False,
        "aem": False,
        "aem_lambda": None,
        # model hyper-parameters of the single-model form (`model:`); with `models:` they go under each model
        "hidden_dim": None,
        "attn_dim": None,
        "dropout": None,
        "model_args": {},
    },
    "heatmap": {
        "column": "auto",  # score column: attention if present, else score
        "normalise": "rank",  # rank | minmax
        "alpha": 0.5,
        "object_type": "tile",  # tile | detection (QuPath object type of the GeoJSON)
    },
    "report": {
        "image_max_px": 512,  # longest side of the overview image embedded per slide
    },
    "preflight": {
        "seconds": 5.0,  # how long the model throughput is measured
        "throughput": None,  # patches/s; None: measure the model
    },
}

#: Choices of the string settings (also in the JSON schema; a test keeps them equal).
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "reader"): READERS,
    ("", "on_slide_error"): ("skip", "fail"),
    ("features", "resize"): ("auto", "cpu", "device"),
    ("mil", "task"): ("auto", "classification", "survival", "regression"),
    ("mil", "balance"): ("loss", "sampler", "none"),
    ("mil", "survival_loss"): ("nll", "cox"),
    ("mil", "regression_loss"): ("mse", "mae"),
    ("mil", "optimizer"): ("adam", "adamw", "radam_lookahead", "sgd"),
    ("mil", "schedule"): ("constant", "cosine"),
    ("mil", "select"): ("loss", "auc_f1"),
    ("heatmap", "normalise"): ("rank", "minmax"),
    ("heatmap", "object_type"): ("tile", "detection"),
}

#: The MIL model trained when the config names none.
DEFAULT_MIL_MODEL = "abmil"
#: MIL settings every model of a run shares (the data, the folds, the losses, the machine).
MIL_SHARED = ("task", "folds", "seed", "val_fraction", "survival_loss", "n_bins", "regression_loss",
              "regression_bounds", "regression_threshold", "device", "threads", "allow_unknown_encoder")
#: MIL settings a model entry may override (its training recipe and data handling).
MIL_PER_MODEL = ("epochs", "lr", "weight_decay", "optimizer", "betas", "schedule", "min_lr", "patience",
                 "min_epochs", "select", "batch_size", "balance", "max_instances", "standardize", "aem",
                 "aem_lambda")
#: Model hyper-parameters the single-model form accepts at the top of the section.
MIL_MODEL_SHORTHANDS = ("hidden_dim", "attn_dim", "dropout")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the reason."""


# -- per-section resolution -------------------------------------------------------------------------
def _merge(section: str, params: dict[str, Any] | None) -> dict[str, Any]:
    defaults = STAGE_DEFAULTS[section]
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown {section} parameter(s): {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(defaults)})")
    return {**defaults, **params}


def _number(section: str, key: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
            exclusive: bool = False, integer: bool = False, optional: bool = False) -> None:
    name = f"{section}.{key}"
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer and int(value) != value:
        ok = False
    if not ok:
        raise ConfigError(f"{section} parameter {key!r} ({name}) must be {'an integer' if integer else 'a number'}, "
                          f"not {value!r}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ConfigError(f"{section} parameter {key!r} ({name}) must be {'>' if exclusive else '>='} {minimum}, "
                          f"not {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{section} parameter {key!r} ({name}) must be <= {maximum}, not {value!r}")


def _choice(section: str, key: str, value: Any) -> None:
    allowed = CHOICES[(section, key)]
    if value not in allowed:
        raise ConfigError(f"{section} parameter {key!r} must be one of {', '.join(allowed)}, not {value!r}")


def _tissue(p: dict[str, Any]) -> dict[str, Any]:
    for key, value in p.items():
        _number("tissue", key, value)
    _number("tissue", "seg_mpp", p["seg_mpp"], minimum=0, exclusive=True)
    for key in ("blur_um", "close_um", "min_tissue_area_um2", "fill_holes_max_um2"):
        _number("tissue", key, p[key], minimum=0)
    for key in ("min_saturation", "min_value"):
        _number("tissue", key, p[key], minimum=0, maximum=255)
    _number("tissue", "thumbnail_max_px", p["thumbnail_max_px"], minimum=16)
    p["thumbnail_max_px"] = int(p["thumbnail_max_px"])
    return p


def _grid(p: dict[str, Any]) -> dict[str, Any]:
    if p["stride"] is None:
        p["stride"] = p["patch_size"]
    _number("grid", "patch_size", p["patch_size"], minimum=8, integer=True)
    _number("grid", "stride", p["stride"], minimum=1, integer=True)
    _number("grid", "target_mpp", p["target_mpp"], minimum=0, exclusive=True)
    _number("grid", "min_tissue_fraction", p["min_tissue_fraction"], minimum=0, maximum=1)
    _number("grid", "max_upsample", p["max_upsample"], minimum=1)
    return p


def _features(p: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(p["model"], str) or not p["model"]:
        raise ConfigError(f"features parameter 'model' must be a preset or timm architecture name, not {p['model']!r}")
    _number("features", "batch_size", p["batch_size"], minimum=1, integer=True)
    _number("features", "num_workers", p["num_workers"], minimum=0, integer=True)
    _number("features", "chunk_rows", p["chunk_rows"], minimum=1, integer=True)
    _number("features", "slides_per_job", p["slides_per_job"], minimum=1, integer=True)
    _number("features", "seed", p["seed"], integer=True)
    dev = str(p["device"])
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"features parameter 'device' must be auto, cpu, cuda or cuda:N, not {p['device']!r}")
    if p["weights"] and p["pretrained"]:
        raise ConfigError("set either features.weights (local file) or features.pretrained, not both")
    _choice("features", "resize", p["resize"])
    if not isinstance(p["gpu_decode"], bool):
        raise ConfigError(f"features parameter 'gpu_decode' must be true or false, not {p['gpu_decode']!r}")
    if p["gpu_decode"] and p["resize"] == "cpu":
        raise ConfigError("features.gpu_decode needs resize: device or auto (decoded tiles stay on the GPU)")
    return p


def _mil_training(where: str, p: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Checks of MIL training settings (``where``: the config path of the mapping they are in)."""
    sec = where
    for key in keys:
        v = p.get(key)
        if key in ("optimizer", "schedule", "select") and v is None:
            continue  # the model paper's
        if key in ("task", "balance", "survival_loss", "regression_loss", "optimizer", "schedule", "select"):
            if v not in CHOICES[("mil", key)]:
                raise ConfigError(f"{sec}.{key}: must be one of {', '.join(CHOICES[('mil', key)])}, not {v!r}")
        elif key in ("standardize", "aem", "allow_unknown_encoder"):
            if not isinstance(v, bool):
                raise ConfigError(f"{sec}.{key}: must be true or false, not {v!r}")
        elif key == "betas":
            if v is not None and (not isinstance(v, (list, tuple)) or len(v) != 2 or any(
                    isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1 for b in v)):
                raise ConfigError(f"{sec}.betas: must be two numbers in [0, 1), not {v!r}")
        elif key == "regression_bounds":
            if v is not None and (not isinstance(v, (list, tuple)) or len(v) != 2 or any(
                    isinstance(b, bool) or not isinstance(b, (int, float)) for b in v) or not v[0] < v[1]):
                raise ConfigError(f"{sec}.regression_bounds: must be two numbers [lo, hi] with lo < hi, not {v!r}")
        elif key == "regression_threshold":
            _number(sec, key, v, optional=True)
        elif key == "device":
            dev = str(v)
            if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
                raise ConfigError(f"{sec}.device: must be auto, cpu, cuda or cuda:N, not {v!r}")
        elif key == "val_fraction":
            _number(sec, key, v, minimum=0, exclusive=True, maximum=1)
            if v >= 1:
                raise ConfigError(f"{sec}.val_fraction: must be < 1, not {v!r}")
        else:
            spec = {"folds": (1, True, False), "seed": (None, True, False), "n_bins": (1, True, False),
                    "threads": (1, True, True), "epochs": (1, True, True), "lr": (0, False, True),
                    "weight_decay": (0, False, True), "min_lr": (0, False, True), "patience": (0, True, True),
                    "min_epochs": (0, True, True), "batch_size": (1, True, True),
                    "max_instances": (1, True, True), "aem_lambda": (0, False, True)}[key]
            minimum, integer, optional = spec
            _number(sec, key, v, minimum=minimum, exclusive=key == "lr", integer=integer, optional=optional)


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _mil_entries(p: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``models`` in every accepted form (a name, a list of names or ``{name: options}``, a mapping) or
    the single-model form, as ``{run name: options}``."""
    models, model = p.get("models"), p.get("model")
    if models is not None and model is not None:
        raise ConfigError("mil: give either 'models' (several) or 'model' (one), not both")
    if models is None:
        name = model or DEFAULT_MIL_MODEL
        if not isinstance(name, str):
            raise ConfigError(f"mil.model: expected a model name, not {name!r}")
        opts = {k: p[k] for k in MIL_MODEL_SHORTHANDS if p.get(k) is not None}
        both = sorted(set(opts) & set(p.get("model_args") or {}))
        if both:
            raise ConfigError(f"mil.{both[0]} and mil.model_args.{both[0]} are both set; keep one")
        return {name: {**opts, **(p.get("model_args") or {})}}
    legacy = [k for k in MIL_MODEL_SHORTHANDS if p.get(k) is not None] + (["model_args"] if p.get("model_args") else [])
    if legacy:
        raise ConfigError(f"mil.{legacy[0]}: a model hyper-parameter belongs under its model with 'models' "
                          f"(e.g. models: {{abmil: {{{legacy[0]}: ...}}}})")
    if isinstance(models, str):
        items = [(models, {})]
    elif isinstance(models, dict):
        items = list(models.items())
    elif isinstance(models, (list, tuple)):
        items = []
        for i, item in enumerate(models):
            if isinstance(item, str):
                items.append((item, {}))
            elif isinstance(item, dict) and len(item) == 1:
                items.append(next(iter(item.items())))
            else:
                raise ConfigError(f"mil.models[{i}]: expected a model name or {{name: {{options}}}}, not {item!r}")
    else:
        raise ConfigError(f"mil.models: expected a mapping of model names to options (or a list of names), "
                          f"not {models!r}")
    if not items:
        raise ConfigError("mil.models: empty; name at least one model")
    out: dict[str, dict[str, Any]] = {}
    for run, opts in items:
        if not isinstance(run, str) or not _RUN_NAME.match(run):
            raise ConfigError(f"mil.models: {run!r} is not a usable run name (letters, digits, _ . -)")
        if run in out:
            raise ConfigError(f"mil.models.{run}: listed twice")
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise ConfigError(f"mil.models.{run}: expected a mapping of options, not {opts!r}")
        out[run] = dict(opts)
    return out


def _mil(p: dict[str, Any]) -> dict[str, Any]:
    _mil_training("mil", p, MIL_SHARED + MIL_PER_MODEL)
    if not isinstance(p["model_args"], dict):
        raise ConfigError(f"mil.model_args: must be a mapping of model arguments, not {p['model_args']!r}")
    p["model_args"] = dict(p["model_args"])
    models = mil_model_params()
    entries = _mil_entries(p)
    single = p.get("models") is None
    for run, opts in entries.items():
        where = "mil" if single else f"mil.models.{run}"
        model = opts.get("model", run) if not single else run
        if not isinstance(model, str) or model not in models:
            raise ConfigError(f"{where}{'.model' if model != run else ''}: unknown MIL model {model!r} "
                              f"(available: {', '.join(sorted(models))})")
        accepted = models[model]
        for k, v in opts.items():
            if k == "model" and not single:
                continue
            if k in accepted or "**" in accepted:
                continue
            if k in MIL_PER_MODEL and not single:
                _mil_training(where, opts, (k,))
            elif k in MIL_SHARED:
                raise ConfigError(f"{where}.{k}: must be the same for every model (set it once under mil:, so "
                                  "all models train on the same data and folds)")
            else:
                path = f"mil.{k}" if single and k in MIL_MODEL_SHORTHANDS and k not in p["model_args"] else (
                    f"mil.model_args.{k}" if single else f"{where}.{k}")
                raise ConfigError(f"config key {path}: MIL model {model!r} does not take {k!r} "
                                  f"(its arguments: {', '.join(a for a in accepted if a != '**') or 'none'}"
                                  f"{'' if single else '; training options: ' + ', '.join(MIL_PER_MODEL)})")
    if not single:
        p["models"] = entries
    return p


def mil_runs(mil: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every model run of a resolved ``mil`` section: run name -> the settings of that one run (a
    single-model section: ``model``, ``model_args`` and every training setting, per-model overrides
    applied), which is what its training job receives."""
    runs = {}
    models = mil_model_params()
    for run, opts in _mil_entries(mil).items():
        single = mil.get("models") is None
        model = run if single else opts.get("model", run)
        accepted = models[model]
        margs = {k: v for k, v in opts.items() if k != "model" and (k in accepted or ("**" in accepted
                                                                                 and k not in MIL_PER_MODEL))}
        over = {k: v for k, v in opts.items() if k in MIL_PER_MODEL and k not in margs}
        runs[run] = {"model": model, "model_args": margs, **{k: mil[k] for k in MIL_SHARED},
                     **{k: (over[k] if over.get(k) is not None else mil[k]) for k in MIL_PER_MODEL}}
    return runs


def mil_model_kwargs(mil: dict[str, Any]) -> dict[str, Any]:
    """The model hyper-parameters of a single-model ``mil`` section (shorthands and ``model_args``)."""
    return dict(next(iter(mil_runs(mil).values()))["model_args"])


def _heatmap(p: dict[str, Any]) -> dict[str, Any]:
    _choice("heatmap", "normalise", p["normalise"])
    _choice("heatmap", "object_type", p["object_type"])
    _number("heatmap", "alpha", p["alpha"], minimum=0, maximum=1)
    return p


def _report(p: dict[str, Any]) -> dict[str, Any]:
    _number("report", "image_max_px", p["image_max_px"], minimum=64, integer=True)
    return p


def _preflight(p: dict[str, Any]) -> dict[str, Any]:
    _number("preflight", "seconds", p["seconds"], minimum=0, exclusive=True)
    _number("preflight", "throughput", p["throughput"], minimum=0, exclusive=True, optional=True)
    return p


_CHECKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "tissue": _tissue, "grid": _grid, "features": _features, "mil": _mil, "heatmap": _heatmap,
    "report": _report, "preflight": _preflight,
}


def resolve(section: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The complete, checked settings of ``section`` from a partial dict (defaults filled in).

    Idempotent: resolving resolved settings gives them back unchanged. Raises :class:`ConfigError`
    (a ``ValueError``) naming the key for unknown keys and invalid values.
    """
    if section not in STAGE_DEFAULTS:
        raise ConfigError(f"unknown configuration section {section!r} (known: {', '.join(STAGE_DEFAULTS)})")
    return _CHECKS[section](_merge(section, params))


def canonical(settings: dict[str, Any]) -> str:
    """Canonical JSON of settings: what a rule hands its stage and what Snakemake compares for reruns."""
    return json.dumps(settings, sort_keys=True)


def parse_settings(text: str | dict[str, Any] | None, section: str | None = None) -> dict[str, Any]:
    """Settings from a ``--settings`` JSON object (or ``@FILE`` holding one); resolved when ``section``
    is given."""
    if text is None or text == "":
        val: Any = {}
    elif isinstance(text, dict):
        val = text
    else:
        src = text
        if text.startswith("@"):
            try:
                src = Path(text[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"{text[1:]}: cannot read settings file ({exc.strerror or exc})") from None
        try:
            val = json.loads(src)
        except ValueError as exc:
            raise ConfigError(f"--settings is not valid JSON ({exc})") from None
    if not isinstance(val, dict):
        raise ConfigError("--settings must be a JSON object")
    return resolve(section, val) if section else val


# -- the features tag ---------------------------------------------------------------------------------
def model_tag(features: dict[str, Any] | None) -> str:
    """Folder name of a cohort's bags under ``features/``: ``features.tag`` or the model name."""
    f = features or {}
    return safe_name(f.get("tag") or f.get("model") or STAGE_DEFAULTS["features"]["model"])


# -- MIL model arguments, read from the model files (no torch) ------------------------------------------
_MIL_DIR = Path(__file__).resolve().parent / "mil"
_NOT_HYPER = ("in_dim", "n_classes", "task")  # positional inputs and the runtime task argument
_mil_cache: dict[str, dict[str, Any]] | None = None


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def _register_call(dec: ast.expr) -> ast.Call | ast.Name | None:
    target = dec.func if isinstance(dec, ast.Call) else dec
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
    return dec if name == "register_model" else None  # type: ignore[return-value]


def mil_model_params() -> dict[str, dict[str, Any]]:
    """Every registered MIL model -> its hyper-parameters and their defaults, read from the source of
    the model files (the ``@register_model`` factories) without importing them. A factory with
    ``**kwargs`` accepts any argument (its entry holds ``"**": True``)."""
    global _mil_cache
    if _mil_cache is not None:
        return _mil_cache
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(_MIL_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            for dec in node.decorator_list:
                call = _register_call(dec)
                if call is None:
                    continue
                name = node.name
                if isinstance(call, ast.Call):
                    for kw in call.keywords:
                        if kw.arg == "name":
                            name = _literal(kw.value)
                a = node.args
                pos = a.posonlyargs + a.args
                defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
                params = {arg.arg: _literal(d) for arg, d in zip(pos, defaults)}
                params.update({arg.arg: _literal(d) for arg, d in zip(a.kwonlyargs, a.kw_defaults)})
                for k in _NOT_HYPER:
                    params.pop(k, None)
                if a.vararg is None and a.kwarg is not None:
                    params["**"] = True
                out[str(name)] = params
    _mil_cache = out
    return out


# -- the whole workflow configuration ---------------------------------------------------------------------
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def _coerce(cfg: Any, schema: dict[str, Any]) -> None:
    """``--config 'grid={target_mpp: 1.0}'`` arrives as strings inside sections: convert a string to the
    number/boolean/null its schema expects (only where the schema does not allow a string)."""
    import yaml

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


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def validate(cfg: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Check ``cfg`` against the JSON schema (after coercing ``--config`` strings), listing every error
    with its key; raises :class:`ConfigError`."""
    import jsonschema

    schema = schema or load_schema()
    _coerce(cfg, schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        lines = []
        for e in errors:
            where = ".".join(str(p) for p in e.path) or "(top level)"
            lines.append(f"  config key {where}: {e.message}")
        raise ConfigError("invalid configuration (see workflow/schemas/config.schema.yaml):\n" + "\n".join(lines))


@dataclass
class WorkflowConfig:
    """The resolved workflow configuration: top-level values and every stage's settings."""

    top: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    mil: dict[str, dict[str, Any]] = field(default_factory=dict)  # run name -> settings of that MIL run

    @property
    def results_dir(self) -> str:
        return str(self.top["results_dir"]).rstrip("/") or "/"

    @property
    def tag(self) -> str:
        return model_tag(self.stages["features"])

    def settings(self, stage: str) -> str:
        """Canonical JSON of a stage's settings (handed to the stage and compared for reruns)."""
        return canonical(self.stages[stage])


def load_workflow_config(cfg: dict[str, Any], schema: dict[str, Any] | None = None) -> WorkflowConfig:
    """Validate a Snakemake ``config`` dict and resolve it once: top-level keys with defaults, every
    stage section resolved, plus the derived settings of ``preflight`` (features + grid + its own) and
    ``report`` (features tag + MIL model + its own)."""
    validate(cfg, schema)
    top = {k: cfg.get(k, v) for k, v in TOP_DEFAULTS.items()}
    if top["extensions"] is None:
        top["extensions"] = list(SLIDE_EXTENSIONS)
    for key in ("reader", "on_slide_error"):
        _choice("", key, top[key])
    if not isinstance(top["slides_recursive"], bool):
        raise ConfigError(f"slides_recursive must be true or false, not {top['slides_recursive']!r}")
    stages: dict[str, dict[str, Any]] = {}
    for section in STAGE_DEFAULTS:
        try:
            stages[section] = resolve(section, cfg.get(section) or {})
        except ConfigError as exc:
            raise ConfigError(f"invalid configuration: {exc}") from None
    f, g = stages["features"], stages["grid"]
    stages["preflight"] = {**stages["preflight"], "model": f["model"], "batch_size": f["batch_size"],
                           "device": f["device"], "patch_size": g["patch_size"], "target_mpp": g["target_mpp"],
                           "stride": g["stride"], "min_tissue_fraction": g["min_tissue_fraction"]}
    runs = mil_runs(stages["mil"])
    stages["report"] = {**stages["report"], "tag": model_tag(f), "mil_model": list(runs)}
    return WorkflowConfig(top=top, stages=stages, mil=runs)


# -- command lines --------------------------------------------------------------------------------------
def parse_with_settings(parser, argv: list[str] | None, section: str | None = None, target=None):
    """Parse ``argv`` with ``parser``, where ``--settings JSON`` (a rule's resolved settings, or any subset
    by hand) gives the defaults of the options of the same name; options given explicitly win. With
    ``section``, the settings are first resolved (defaults filled in, keys checked) as that section.
    ``target``: the (sub)parser that owns the options (default: ``parser``)."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--settings", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.settings:
        try:
            s = parse_settings(known.settings, section)
        except ConfigError as exc:
            parser.error(str(exc))
        target = target or parser
        actions = {a.dest: a for a in target._actions}
        known_dests = set(actions) | set(target._defaults)
        unknown = sorted(set(s) - known_dests)
        if unknown:
            target.error(f"--settings: unknown key(s) {', '.join(unknown)}")
        for dest in s:
            if dest in actions:
                actions[dest].required = False
        target.set_defaults(**s)
    return parser.parse_args(argv)


# -- the documented reference -------------------------------------------------------------------------------
def _fmt_default(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return "all known" if list(value) == list(SLIDE_EXTENSIONS) else f"`{json.dumps(list(value))}`"
    if isinstance(value, dict):
        return f"`{json.dumps(value)}`" if value else "`{}`"
    return f"`{value}`"


def reference_table(schema: dict[str, Any] | None = None) -> str:
    """The configuration reference (docs/config.md): every key, its default and the schema's description."""
    schema = schema or load_schema()
    props = schema["properties"]
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default in TOP_DEFAULTS.items():
        rows.append(f"| `{key}` | {_fmt_default(default)} | {' '.join(props[key].get('description', '').split())} |")
    for section, defaults in STAGE_DEFAULTS.items():
        sprops = props[section]["properties"]
        for key, default in defaults.items():
            desc = " ".join(sprops[key].get("description", "").split())
            rows.append(f"| `{section}.{key}` | {_fmt_default(default)} | {desc} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m pipeline.config",
                                 description="Print the configuration reference (the table in docs/config.md).")
    ap.parse_args(argv)
    sys.stdout.write(reference_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
