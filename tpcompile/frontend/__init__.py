"""Frontends: turn what the user names (an export archive, a factory, a pickled module) into a
captured model."""

from tpcompile.frontend.capture import CapturedModel, load_model

__all__ = ["CapturedModel", "load_model"]
