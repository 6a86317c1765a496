"""Patch feature extraction: an encoder registry and the extraction engine that writes Zarr bags."""

from .encoders import Encoder, create_encoder, list_encoders, register_encoder
from . import presets  # noqa: F401  (registers the named encoder presets)

__all__ = ["Encoder", "create_encoder", "list_encoders", "register_encoder"]
