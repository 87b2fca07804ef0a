"""Compile progress on stderr: on a terminal, a bar over the compile's steps (loading, planning, then each
rank's weights and program) labelled with the current step; otherwise (CI logs, pipes) one
``[tpcompile] step`` line per step. Silent when disabled."""

from __future__ import annotations

import sys

from tqdm import tqdm

STEPS_PER_RANK = 2  # weights written, program captured (+ native program compiled)


class ProgressBar:
    def __init__(
        self, tp: int, enabled: bool = True, terminal: bool | None = None, native: bool = False
    ) -> None:
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar: tqdm | None = None
        self.total = 2 + (STEPS_PER_RANK + native) * tp  # loading + planning + per-rank steps

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if not self.terminal:
            print(f"[tpcompile] {message}", file=sys.stderr, flush=True)
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

    def echo(self, line: str) -> None:
        """Print ``line`` on stderr now (enabled or not), without breaking the bar: it is redrawn below."""
        if self.bar is not None:
            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self, complete: bool = False) -> None:
        """End the bar (filled when the compile completed); the next stderr line starts on its own line."""
        if self.bar is not None:
            if complete:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None
