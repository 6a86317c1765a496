"""The ``mil`` section of the workflow configuration, validated against the model registry.

:func:`resolve_mil_section` turns the section (a dict, e.g. read from config.yaml) into one settings dict
per model run, each ready for :func:`pipeline.mil.train.train`; every error names the offending key
(``mil.models.transmil.dropout``). Shape::

    mil:
      models:                      # several models, trained on the same folds (or a list of names)
        abmil: {}                  # registry name, paper defaults
        transmil: {dropout: 0.1}   # model hyper-parameters ...
        clam_sb: {inst_loss: svm, subtyping: true, lr: 1.0e-4}   # ... and per-model training overrides
        acmil_small: {model: acmil, hidden_dim: 64}             # a second run of one model: own name
      task: auto                   # auto | classification | survival | regression
      folds: 5                     # shared by every model (the fold assignment must be identical)
      seed: 0
      val_fraction: 0.2
      survival_loss: nll           # nll | cox
      n_bins: 4
      regression_loss: mse         # mse | mae
      balance: loss                # loss | sampler | none
      max_instances: null
      standardize: false
      aem: false                   # AEM entropy term (attention models), weight aem_lambda (0.1)
      batch_size: null             # null: each model's paper value (1; TransMIL 2; Cox 32)
      epochs: null                 # null: each model's paper recipe; also lr, weight_decay, optimizer,
      device: auto                 # betas, schedule, min_lr, patience, min_epochs, select
      threads: null

The legacy single-model form ``model: abmil`` (with ``hidden_dim``, ``attn_dim``, ``dropout`` at the top
level) is accepted too.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from . import (OPTIMIZERS, RECIPE_KEYS, SCHEDULES, SELECT, TASKS, MILError, create_model, list_models,
               resolve_model_kwargs)
from .tasks import REGRESSION_LOSSES, SURVIVAL_LOSSES

__all__ = ["resolve_mil_section", "SHARED_KEYS", "PER_MODEL_KEYS", "LEGACY_MODEL_ARGS"]

_INT, _NUM, _BOOL, _STR = "an integer", "a number", "true or false", "a string"

#: Settings that must be the same for every model of a run (they decide the data and the folds).
SHARED_KEYS: dict[str, tuple[str, Any, tuple | None]] = {
    # key: (kind, default, choices)
    "task": (_STR, "auto", ("auto",) + TASKS),
    "folds": (_INT, 5, None),
    "seed": (_INT, 0, None),
    "val_fraction": (_NUM, 0.2, None),
    "survival_loss": (_STR, "nll", SURVIVAL_LOSSES),
    "n_bins": (_INT, 4, None),
    "regression_loss": (_STR, "mse", REGRESSION_LOSSES),
    "device": (_STR, "auto", None),
    "threads": (_INT, None, None),
}
#: Settings a model entry may override (the top-level value, else the model's paper recipe, else the
#: trainer's default applies).
PER_MODEL_KEYS: dict[str, tuple[str, Any, tuple | None]] = {
    "epochs": (_INT, None, None),
    "lr": (_NUM, None, None),
    "weight_decay": (_NUM, None, None),
    "optimizer": (_STR, None, OPTIMIZERS),
    "betas": ("a list of two numbers", None, None),
    "schedule": (_STR, None, SCHEDULES),
    "min_lr": (_NUM, None, None),
    "patience": (_INT, None, None),
    "min_epochs": (_INT, None, None),
    "select": (_STR, None, SELECT),
    "batch_size": (_INT, None, None),
    "balance": (_STR, "loss", ("loss", "sampler", "none")),
    "max_instances": (_INT, None, None),
    "standardize": (_BOOL, False, None),
    "aem": (_BOOL, False, None),
    "aem_lambda": (_NUM, None, None),
}
#: Model hyper-parameters the legacy single-model form accepts at the top level.
LEGACY_MODEL_ARGS = ("hidden_dim", "attn_dim", "dropout")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?|mps)$")


def _check_value(where: str, value: Any, kind: str, choices: tuple | None) -> Any:
    def bad() -> MILError:
        extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
        return MILError(f"{where}: expected {kind}{extra}, got {value!r}")

    if value is None:
        return None
    if kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif kind == _NUM:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        value = float(value)
    elif kind == _BOOL:
        if not isinstance(value, bool):
            raise bad()
    elif kind == _STR:
        if not isinstance(value, str):
            raise bad()
    else:  # betas
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
            raise bad()
        value = [float(v) for v in value]
    if choices and value not in choices:
        raise bad()
    return value


def _settings_check(where: str, settings: Mapping[str, Any], overridden: Iterable[str] = ()) -> None:
    """The trainer's own range checks, the message prefixed with the config path of the key (the model
    entry's when it overrides the key there, else the section's)."""
    from .train import _check_settings

    s = dict(settings)
    s.pop("task", None)
    s.pop("seed", None)
    s.pop("device", None)
    try:
        _check_settings(s.pop("folds"), s.pop("epochs"), s.pop("lr"), s.pop("weight_decay"), s.pop("patience"),
                        s.pop("val_fraction"), **s)
    except MILError as exc:
        msg = str(exc)
        m = re.match(r"--([a-z-]+)", msg)
        key = m.group(1).replace("-", "_") if m else ""
        path = where if key in set(overridden) else "mil"
        raise MILError(f"{path}.{key}: {msg}" if key else f"{where}: {msg}") from None


def _model_entries(section: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(run name, registry name, entry options)`` per model, from ``models`` or legacy ``model``."""
    if "models" in section and "model" in section:
        raise MILError("mil: give either 'models' (several) or 'model' (one), not both")
    if "models" not in section:
        if "model" not in section:
            raise MILError("mil.models: no model given (e.g. models: {abmil: {}})")
        name = section["model"]
        if not isinstance(name, str):
            raise MILError(f"mil.model: expected a model name, got {name!r}")
        opts = {k: section[k] for k in LEGACY_MODEL_ARGS if section.get(k) is not None}
        return [(name, name, opts)]
    models = section["models"]
    entries: list[tuple[str, Any]] = []
    if isinstance(models, str):
        entries = [(models, {})]
    elif isinstance(models, Mapping):
        entries = list(models.items())
    elif isinstance(models, (list, tuple)):
        for i, item in enumerate(models):
            if isinstance(item, str):
                entries.append((item, {}))
            elif isinstance(item, Mapping) and len(item) == 1:
                entries.append(next(iter(item.items())))
            else:
                raise MILError(f"mil.models[{i}]: expected a model name or {{name: {{options}}}}, got {item!r}")
    else:
        raise MILError(f"mil.models: expected a mapping of model names to options (or a list of names), "
                       f"got {models!r}")
    if not entries:
        raise MILError("mil.models: empty; name at least one model")
    out, seen = [], set()
    for run, opts in entries:
        if not isinstance(run, str) or not _NAME_RE.match(run):
            raise MILError(f"mil.models: {run!r} is not a usable run name (letters, digits, _ . -)")
        if run in seen:
            raise MILError(f"mil.models.{run}: listed twice")
        seen.add(run)
        if opts is None:
            opts = {}
        if not isinstance(opts, Mapping):
            raise MILError(f"mil.models.{run}: expected a mapping of options, got {opts!r}")
        opts = dict(opts)
        model = opts.pop("model", run)
        if not isinstance(model, str):
            raise MILError(f"mil.models.{run}.model: expected a model name, got {model!r}")
        out.append((run, model, opts))
    return out


def resolve_mil_section(section: Mapping[str, Any] | None, *, ignore: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Validate a ``mil`` config section; one dict per model run::

        {"name": run name (its output folder), "model": registry name, "model_kwargs": {all hyper-parameters},
         "settings": {keyword arguments of pipeline.mil.train.train other than bags/labels/out_dir/model/
                      model_kwargs}, "recipe": {the optimisation recipe that will apply (paper or given)}}

    ``ignore``: top-level keys that belong to the workflow, not to training (left alone). Raises
    :class:`MILError` naming the key on an unknown key, a wrong type or value, an unknown model or a model
    option the model does not accept.
    """
    from .train import resolve_recipe

    section = dict(section or {})
    for k in ignore:
        section.pop(k, None)
    known = set(SHARED_KEYS) | set(PER_MODEL_KEYS) | {"models", "model"} | set(LEGACY_MODEL_ARGS)
    unknown = sorted(k for k in section if k not in known)
    if unknown:
        raise MILError(f"mil.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    if "models" in section:
        legacy = [k for k in LEGACY_MODEL_ARGS if k in section]
        if legacy:
            raise MILError(f"mil.{legacy[0]}: a model hyper-parameter belongs under its model with 'models' "
                           f"(e.g. models: {{abmil: {{{legacy[0]}: ...}}}})")
    shared = {k: _check_value(f"mil.{k}", section.get(k, d), kind, ch) for k, (kind, d, ch) in SHARED_KEYS.items()}
    for k, (kind, d, ch) in SHARED_KEYS.items():
        if shared[k] is None:
            shared[k] = d
    if not _DEVICE_RE.match(str(shared["device"])):
        raise MILError(f"mil.device: expected auto, cpu, cuda or cuda:N, got {shared['device']!r}")
    top = {k: _check_value(f"mil.{k}", section.get(k, d), kind, ch) for k, (kind, d, ch) in PER_MODEL_KEYS.items()}
    for k, (kind, d, ch) in PER_MODEL_KEYS.items():
        if top[k] is None:
            top[k] = d
    available = list_models()
    runs = []
    for run, model, opts in _model_entries(section):
        where = f"mil.models.{run}" if "models" in section else "mil"
        if model not in available:
            raise MILError(f"{where}{'.model' if model != run else ''}: unknown MIL model {model!r}; available "
                           f"models: {', '.join(available)}")
        accepted = set(resolve_model_kwargs(model))
        model_kw, overrides = {}, {}
        for k, v in opts.items():
            if k in accepted:
                model_kw[k] = v
            elif k in PER_MODEL_KEYS:
                kind, _, ch = PER_MODEL_KEYS[k]
                overrides[k] = _check_value(f"{where}.{k}", v, kind, ch)
            elif k in SHARED_KEYS:
                raise MILError(f"{where}.{k}: must be the same for every model (set it once under mil:, so all "
                               "models train on the same data and folds)")
            else:
                raise MILError(f"{where}.{k}: model {model!r} has no option {k!r} (model options: "
                               f"{', '.join(sorted(accepted)) or 'none'}; training options: "
                               f"{', '.join(PER_MODEL_KEYS)})")
        try:
            model_kwargs = resolve_model_kwargs(model, **model_kw)
            task = shared["task"] if shared["task"] in TASKS else "classification"
            create_model(model, 8, 1 if task != "classification" else 2, task=task, **model_kwargs)
        except MILError as exc:
            raise MILError(f"{where}: {exc}") from None
        settings = {**shared, **{k: (overrides[k] if overrides.get(k) is not None else top[k])
                                 for k in PER_MODEL_KEYS}}
        _settings_check(where, settings, [k for k, v in overrides.items() if v is not None])
        recipe = resolve_recipe(model, cox=shared["survival_loss"] == "cox" and shared["task"] == "survival",
                                **{k: settings[k] for k in RECIPE_KEYS})
        recipe.pop("source")
        runs.append({"name": run, "model": model, "model_kwargs": model_kwargs, "settings": settings,
                     "recipe": recipe})
    return runs
