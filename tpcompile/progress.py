"""Compile progress on stderr: a bar over the compile's steps (planning, then lowering, capturing and
writing weights for each rank), with the current step as its label. Silent when disabled."""

from __future__ import annotations

import sys

from tqdm import tqdm

STEPS_PER_RANK = 2  # weights written, program captured


class ProgressBar:
    def __init__(self, tp: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.total = 2 + STEPS_PER_RANK * tp  # loading + planning + per-rank steps

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(
                total=self.total,
                file=sys.stderr,
                bar_format="tpcompile {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} [{elapsed}] {desc}",
                dynamic_ncols=False,
            )
        else:
            self.bar.update(1)
        self.bar.set_description_str(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None
