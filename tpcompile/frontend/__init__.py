"""Frontends: turn what the user names (a Hugging Face checkpoint or GGUF file, an export archive, a
factory, a pickled module) into a captured model (``load_model``, see ``load.py``)."""

from tpcompile.frontend.capture import CapturedModel
from tpcompile.frontend.load import load_model

__all__ = ["CapturedModel", "load_model"]
