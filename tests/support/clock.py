"""A clock for code that takes one (``clock=``): it stands still until the test sets ``now``."""

from __future__ import annotations


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
