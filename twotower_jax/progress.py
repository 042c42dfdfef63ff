"""A dependency-free one-line progress bar on stderr, drawn only on a terminal (or when forced)."""
from __future__ import annotations

import sys
from typing import Optional


class Progress:
    def __init__(self, total: int, enabled: Optional[bool] = None, unit: str = "", start: int = 0):
        self.total, self.done, self.unit = total, start, unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def step(self, *_, suffix: str = "") -> None:
        self.update(self.done + 1, suffix)

    def update(self, done: int, suffix: str = "") -> None:
        self.done = done
        if not self.enabled:
            return
        filled = 40 * self.done // max(self.total, 1)
        print(f"\r[{'#' * filled}{'.' * (40 - filled)}] {self.done}/{self.total} {self.unit} {suffix}".rstrip(),
              end="", file=sys.stderr, flush=True)
        if self.done >= self.total:
            print(file=sys.stderr)
