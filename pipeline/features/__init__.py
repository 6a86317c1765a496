"""Patch feature extraction: an encoder registry and the extraction engine that writes Zarr bags."""

from .encoders import Encoder, create_encoder, list_encoders, register_encoder

__all__ = ["Encoder", "create_encoder", "list_encoders", "register_encoder"]
