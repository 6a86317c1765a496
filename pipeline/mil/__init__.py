"""Multiple-instance learning (MIL) on Zarr feature bags: a small timm-style model registry.

Model interface (every registered model follows it, so training and inference never special-case one):

* a factory ``fn(in_dim, n_classes, **kwargs) -> torch.nn.Module`` decorated with ``@register_model``;
  ``n_classes`` is the number of model outputs (classes for classification, time bins for discrete-time
  survival, 1 for Cox survival and regression). Keyword arguments are the model's hyper-parameters, each
  with a default, and are stored verbatim in the checkpoint config so ``create_model(name, in_dim,
  n_classes, **kwargs)`` rebuilds the same model. A factory may also accept the keyword ``task``
  (``"classification"``, ``"survival"`` or ``"regression"``); it is not a hyper-parameter but is passed
  by the trainer and by inference (models that treat binary classification as "is a positive instance
  present?" need it);
* ``model(features)`` with ``features`` a float tensor ``(N, D)`` (one bag; ``N`` may be 0) returns a dict:

  - ``logits`` ``(n_classes,)``: the bag prediction;
  - ``attention`` ``(N,)``: instance weights (softmax-normalised, summing to 1 over the bag), or ``None``
    for models without attention;
  - ``instance_logits`` ``(N, n_classes)`` (optional): per-instance outputs on the scale of ``logits``
    (e.g. an instance classifier, or each instance's exact share of the bag logit for pooling models);
  - ``aux_loss`` (optional): a scalar that the trainer adds to the bag loss, already weighted by the model;
  - ``loss_logits`` (optional): a list of ``(logits, weight)``; when present the trainer's task loss is
    ``sum(weight * loss(logits))`` over it instead of ``loss(logits)`` (e.g. DSMIL's two streams);
  - ``attention_branches`` ``(K, N)`` (optional): all attention maps of a multi-branch model (the
    attention-entropy term of ``--aem-lambda`` averages over them);

* a model that needs the bag label for an auxiliary loss (e.g. CLAM's instance clustering) sets the class
  attribute ``uses_label = True``; for classification the trainer then calls ``model(features, label=y)``
  during training (``y`` a 0-d long tensor);
* a model that needs where each instance lies (e.g. R²T's regions of the patch grid) sets ``uses_coords =
  True`` (a class or instance attribute); training, evaluation and inference then call ``model(features,
  coords=c)`` with ``c`` the bag's patch coordinates, a float tensor ``(N, 2)`` (level-0 ``x, y`` of each
  patch, in the bag's order; the same subset as ``features`` under ``--max-instances``). ``c`` may be
  ``None`` (in-memory data without coordinates), and the model must then fall back to something sensible.
  :func:`call_model` passes ``coords`` and ``label`` to the models that declare them.

Optional training hooks, called by the trainer (``pipeline.mil.train.fit``) when the model has them:

* ``set_progress(step, total)``: before each optimiser step's forward passes, with the 0-based step and
  the planned number of steps (``epochs × batches per epoch``; early stopping may end training before
  ``total``). For schedules that move with training (SC-MIL's loss weight, OTSurv's transported mass);
* ``batch_loss(outs, labels)``: after the forward passes of a mini-batch, with the list of the bags' output
  dicts and ``labels`` (long tensor ``(B,)``: the class index for classification, the event for survival,
  the target stratum for regression); returns a scalar added to the batch loss (already weighted), or
  None. For losses over several bags (SC-MIL's supervised contrastive loss);
* ``after_step()``: after each optimiser step (e.g. an exponential-moving-average teacher, MHIM-MIL).

Each registration carries, as data, the training recipe of the model's paper (see :data:`RECIPE_KEYS`):
the optimiser (``optimizer``, ``betas``, ``lr``, ``weight_decay``), the learning-rate schedule
(``schedule``, ``min_lr``), the epoch budget (``epochs``, ``patience``, ``min_epochs``), the checkpoint
selection (``select``) and ``batch_size``; the trainer uses each one the user does not set, and its own
defaults (:data:`TRAIN_DEFAULTS`) for what a registration leaves out.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ..config import CHOICES as _CHOICES  # the one home of the setting choices

__all__ = ["MILError", "register_model", "create_model", "list_models", "resolve_model_kwargs",
           "model_defaults", "model_recipe", "call_model", "TASKS", "RECIPE_KEYS", "TRAIN_DEFAULTS", "OPTIMIZERS", "SCHEDULES", "SELECT"]

#: Tasks a model can be built for (the labels CSV decides, or ``--task``).
TASKS = ("classification", "survival", "regression")


#: Optimisers a model can be trained with (see :mod:`pipeline.mil.optim`): ``adam`` (L2 weight decay, as
#: ``torch.optim.Adam``), ``adamw`` (decoupled weight decay), ``radam_lookahead`` (RAdam with decoupled
#: weight decay, none on biases and norm weights, wrapped in Lookahead k = 6, alpha = 0.5), ``sgd``
#: (momentum 0.9, L2 weight decay).
OPTIMIZERS = _CHOICES[("mil", "optimizer")]
#: Learning-rate schedules: constant, or cosine annealing from ``lr`` to ``min_lr`` over the epochs.
SCHEDULES = _CHOICES[("mil", "schedule")]
#: Checkpoint selection: the epoch with the lowest validation loss, or (classification) the highest
#: validation AUC + F1 (ACMIL); ``auc_f1`` falls back to the loss for survival and regression.
SELECT = _CHOICES[("mil", "select")]
#: The training recipe a registration may carry, and what the trainer uses where it carries none.
TRAIN_DEFAULTS: dict[str, Any] = {"lr": 2e-4, "weight_decay": 1e-4, "optimizer": "adamw", "betas": None,
                                  "schedule": "cosine", "min_lr": 0.0, "epochs": 50, "patience": 10,
                                  "min_epochs": 0, "select": "loss", "batch_size": None}
RECIPE_KEYS = tuple(TRAIN_DEFAULTS)


class MILError(ValueError):
    """An expected user error in MIL training or inference (bad input files, settings or bags)."""


_MODELS: dict[str, Callable[..., Any]] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}
_RUNTIME_ARGS = ("task",)  # passed by the trainer, never a stored hyper-parameter


def register_model(fn: Callable[..., Any] | None = None, *, name: str | None = None, **recipe: Any):
    """Register a model factory under ``name`` (default: the function's name).

    Use as ``@register_model`` or ``@register_model(name="...", lr=..., weight_decay=..., optimizer=...)``;
    the keywords are the training recipe of the model's paper (:data:`RECIPE_KEYS`), each optional.
    """
    bad = sorted(set(recipe) - set(RECIPE_KEYS))
    if bad:
        raise ValueError(f"register_model: unknown recipe key(s) {bad} (known: {', '.join(RECIPE_KEYS)})")
    if recipe.get("optimizer") is not None and recipe["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"register_model: optimizer must be one of {OPTIMIZERS}")
    if recipe.get("schedule") is not None and recipe["schedule"] not in SCHEDULES:
        raise ValueError(f"register_model: schedule must be one of {SCHEDULES}")
    if recipe.get("select") is not None and recipe["select"] not in SELECT:
        raise ValueError(f"register_model: select must be one of {SELECT}")
    if recipe.get("betas") is not None:
        recipe["betas"] = tuple(float(b) for b in recipe["betas"])

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise ValueError(f"MIL model {key!r} is already registered")
        _MODELS[key] = f
        _DEFAULTS[key] = {k: recipe.get(k) for k in RECIPE_KEYS}
        return f

    return deco(fn) if fn is not None else deco


def list_models() -> list[str]:
    """Names of the registered MIL models, sorted."""
    return sorted(_MODELS)


def _factory(name: str) -> Callable[..., Any]:
    try:
        return _MODELS[name]
    except KeyError:
        raise MILError(f"unknown MIL model {name!r}; available models: {', '.join(list_models())}") from None


def model_defaults(name: str) -> dict[str, Any]:
    """The training recipe registered with model ``name`` (every key of :data:`RECIPE_KEYS`; ``None``
    where the registration does not set it)."""
    _factory(name)
    return {k: _DEFAULTS.get(name, {}).get(k) for k in RECIPE_KEYS}


def model_recipe(name: str) -> dict[str, Any]:
    """The training recipe of model ``name`` with the trainer's defaults filled in where it sets none."""
    d = model_defaults(name)
    return {k: (TRAIN_DEFAULTS[k] if d[k] is None else d[k]) for k in RECIPE_KEYS}


def model_doc(name: str) -> str:
    """First line of the factory's docstring."""
    doc = inspect.getdoc(_factory(name)) or ""
    return doc.splitlines()[0] if doc else ""


def resolve_model_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """All hyper-parameters of model ``name`` (defaults filled in), validating ``kwargs``."""
    fn = _factory(name)
    sig = inspect.signature(fn)
    bad = [k for k in kwargs if k in _RUNTIME_ARGS]
    if bad:
        raise MILError(f"model {name!r}: {bad[0]!r} is not a model hyper-parameter")
    try:
        bound = sig.bind(0, 2, **kwargs)
    except TypeError as exc:
        accepted = [p for p in list(sig.parameters)[2:]
                    if sig.parameters[p].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
                    and p not in _RUNTIME_ARGS]
        raise MILError(f"model {name!r}: {exc} (accepted options: {', '.join(accepted) or 'none'})") from None
    bound.apply_defaults()
    out = dict(bound.arguments)
    for p in list(sig.parameters)[:2]:
        out.pop(p, None)
    for p in _RUNTIME_ARGS:
        out.pop(p, None)
    extra = {k: v for k, v in out.items() if sig.parameters[k].kind == inspect.Parameter.VAR_KEYWORD}
    for k in extra:
        out.pop(k)
        out.update(extra[k])
    return out


def create_model(name: str, in_dim: int, n_classes: int, task: str = "classification", **kwargs: Any):
    """Build registered MIL model ``name`` for ``in_dim``-dimensional features and ``n_classes`` outputs.

    ``task`` is passed to factories that accept it (see the module docstring).
    """
    fn = _factory(name)
    if int(in_dim) < 1:
        raise MILError(f"model {name!r}: in_dim must be >= 1 (got {in_dim})")
    if task not in TASKS:
        raise MILError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    min_out = 2 if task == "classification" else 1
    if int(n_classes) < min_out:
        what = "n_classes" if task == "classification" else "the number of outputs"
        raise MILError(f"model {name!r}: {what} must be >= {min_out} (got {n_classes})")
    kw = resolve_model_kwargs(name, **kwargs)
    if "task" in inspect.signature(fn).parameters:
        kw["task"] = task
    try:
        return fn(int(in_dim), int(n_classes), **kw)
    except (ValueError, TypeError) as exc:  # a hyper-parameter value the model refuses
        raise MILError(f"model {name!r}: {exc}") from None


def call_model(model: Any, features: Any, coords: Any = None, label: Any = None) -> dict[str, Any]:
    """``model(features)``, passing ``coords`` to models with ``uses_coords`` and ``label`` (when not None)
    to models with ``uses_label``."""
    kw: dict[str, Any] = {}
    if getattr(model, "uses_coords", False):
        kw["coords"] = coords
    if label is not None and getattr(model, "uses_label", False):
        kw["label"] = label
    return model(features, **kw)


# Model files register themselves on import.
from . import abmil, acmil, clam, dsmil, pooling, transmil  # noqa: E402,F401
from . import hopfield, instance_cls, mambamil, mhim, otsurv, r2t, scmil  # noqa: E402,F401
