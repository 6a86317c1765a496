"""Multiple-instance learning (MIL) on Zarr feature bags: a small timm-style model registry.

Model interface (every registered model follows it, so training and inference never special-case one):

* a factory ``fn(in_dim, n_classes, **kwargs) -> torch.nn.Module`` decorated with ``@register_model``;
  keyword arguments are the model's hyper-parameters, each with a default, and are stored verbatim in the
  checkpoint config so ``create_model(name, in_dim, n_classes, **kwargs)`` rebuilds the same model;
* ``model(features)`` with ``features`` a float tensor ``(N, D)`` (one bag; ``N`` may be 0) returns a dict:
  ``logits`` ``(n_classes,)``, ``attention`` ``(N,)`` instance weights (softmax-normalised, summing to 1
  over the bag; ``None`` for models without instance scores), and optionally ``aux_loss`` (a scalar that
  the trainer adds to the bag loss, already weighted by the model);
* a model that needs the bag label for an auxiliary loss (e.g. CLAM's instance clustering) sets the class
  attribute ``uses_label = True``; the trainer then calls ``model(features, label=y)`` during training.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

__all__ = ["MILError", "register_model", "create_model", "list_models", "resolve_model_kwargs"]


class MILError(ValueError):
    """An expected user error in MIL training or inference (bad input files, settings or bags)."""


_MODELS: dict[str, Callable[..., Any]] = {}


def register_model(fn: Callable[..., Any] | None = None, *, name: str | None = None):
    """Register a model factory under ``name`` (default: the function's name).

    Use as ``@register_model`` or ``@register_model(name="...")``.
    """

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise ValueError(f"MIL model {key!r} is already registered")
        _MODELS[key] = f
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


def resolve_model_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """All hyper-parameters of model ``name`` (defaults filled in), validating ``kwargs``."""
    fn = _factory(name)
    sig = inspect.signature(fn)
    try:
        bound = sig.bind(0, 2, **kwargs)
    except TypeError as exc:
        accepted = [p for p in list(sig.parameters)[2:]
                    if sig.parameters[p].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        raise MILError(f"model {name!r}: {exc} (accepted options: {', '.join(accepted) or 'none'})") from None
    bound.apply_defaults()
    out = dict(bound.arguments)
    for p in list(sig.parameters)[:2]:
        out.pop(p, None)
    extra = {k: v for k, v in out.items() if sig.parameters[k].kind == inspect.Parameter.VAR_KEYWORD}
    for k in extra:
        out.pop(k)
        out.update(extra[k])
    return out


def create_model(name: str, in_dim: int, n_classes: int, **kwargs: Any):
    """Build registered MIL model ``name`` for ``in_dim``-dimensional features and ``n_classes`` classes."""
    fn = _factory(name)
    if int(in_dim) < 1:
        raise MILError(f"model {name!r}: in_dim must be >= 1 (got {in_dim})")
    if int(n_classes) < 2:
        raise MILError(f"model {name!r}: n_classes must be >= 2 (got {n_classes})")
    kw = resolve_model_kwargs(name, **kwargs)
    return fn(int(in_dim), int(n_classes), **kw)


# Model files register themselves on import.
from . import abmil  # noqa: E402,F401
