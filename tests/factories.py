"""Factories for CLI tests (``tests.factories:NAME``)."""

from __future__ import annotations

from typing import Any

from examples import gpt


def gpt_other_weights() -> tuple[Any, ...]:
    """The example GPT's architecture with different weights: a wrong reference for ``verify``."""
    model, args, dynamic = gpt.build()
    return gpt.build_model(seed=1), args, dynamic


def softmax_head() -> tuple[Any, ...]:
    """A weight the plan keeps whole (see tests/test_weight_layouts.py)."""
    import torch

    from tests.test_weight_layouts import SoftmaxHead

    torch.manual_seed(0)
    return SoftmaxHead().eval(), (torch.randn(2, 5, 16),)
