"""Factories for CLI tests (``tests.factories:NAME``)."""

from __future__ import annotations

from typing import Any

from examples import gpt


def gpt_other_weights() -> tuple[Any, ...]:
    """The example GPT's architecture with different weights: a wrong reference for ``verify``."""
    model, args, dynamic = gpt.build()
    return gpt.build_model(seed=1), args, dynamic
