"""Stopping a batch that has just started, at a denoising step boundary, so newer requests can join it.

The default policy (gpu_worker/policies.py) starts a lone request on an idle GPU at once instead of
holding the GPU for the few milliseconds in which the rest of a burst would land. Such a batch is
*preemptible* for a short window: if a request it could share an inference with arrives in that
window, the worker stops it before its next denoising step, puts its request back in the queue
(with its arrival time) and forms the next batch with everything queued. A lone request then pays
no hold, and a burst pays what the stopped batch had run: its text encoding, when the burst's
next request comes within it (the usual case: a burst's requests reach the worker well under a
millisecond apart), else a step or two.

:class:`Preemption` is the hand-off between the worker's event loop, which decides (``request``),
and the GPU thread, which stops (``before_step``, called before every UNet call of the denoising
loop, the first one included). While the window is open the GPU thread waits before it looks until
the GPU has at most one step queued (gpu_worker.pipelines.StepThrottle), so that a stop throws away
at most that step: otherwise the CPU queues steps far ahead of the GPU and the GPU would still have
to run them all. Waiting for the GPU to finish everything instead would leave it idle at each step
of the window while the CPU prepares the next.

Pure: no torch, no asyncio; ``synchronize`` (the wait) is passed in, ``clock`` is the worker's.
"""

from __future__ import annotations

import threading
from typing import Callable


class BatchPreempted(Exception):
    """The batch was stopped at a step boundary so that newer requests can join it (not an error:
    its requests go back to the queue)."""


class Preemption:
    """The stop signal of one preemptible batch. ``open_until_s``: the instant (on ``clock``) after
    which no stop can be requested any more, so the GPU thread need not wait for the GPU."""

    def __init__(self, open_until_s: float, clock: Callable[[], float]) -> None:
        self.open_until_s = open_until_s
        self.clock = clock
        self._requested = threading.Event()
        self.steps_checked = 0  # denoising steps about to start that looked at the signal (GPU thread)

    def request(self) -> None:
        """Stop the batch at its next step boundary (event-loop thread; thread-safe)."""
        self._requested.set()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def before_step(self, synchronize: Callable[[], None]) -> None:
        """Called by the GPU thread before each denoising step; raises BatchPreempted to stop."""
        self.steps_checked += 1
        if self._requested.is_set():
            raise BatchPreempted()
        if self.clock() <= self.open_until_s:
            synchronize()  # the GPU has at most one step queued: a stop now throws away little
            if self._requested.is_set():
                raise BatchPreempted()
