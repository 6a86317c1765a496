"""Patch feature extraction: an encoder registry and the extraction engine that writes Zarr bags.

``from pipeline.features import create_encoder`` imports the encoders (torch, timm) and registers the
presets on first use; :mod:`pipeline.features.catalog` (the presets as data) imports neither, so the
workflow can read it while planning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Encoder", "create_encoder", "list_encoders", "register_encoder"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import encoders, presets  # noqa: F401  (presets registers the named encoder presets)

        return getattr(encoders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
