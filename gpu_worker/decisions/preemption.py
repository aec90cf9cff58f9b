"""Stopping a batch that has just started, at a denoising step boundary, so newer requests can join it.

The default policy (gpu_worker/decisions/policies.py) starts a lone request on an idle GPU at once instead of
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
the GPU has at most one step queued (gpu_worker.model.pipelines.StepThrottle), so that a stop throws away
at most that step: otherwise the CPU queues steps far ahead of the GPU and the GPU would still have
to run them all. Waiting for the GPU to finish everything instead would leave it idle at each step
of the window while the CPU prepares the next.

Every batch the worker runs is also *stoppable for rows nobody waits for any more* (their client went
away, their deadline passed: the broker's CANCEL, or the worker's own deadline check): the event loop
marks such a row ``abandon(index)``, and at the next step boundary the GPU thread asks
:func:`abandon_decision` whether to go on (the unwanted rows' images are then dropped), stop (no row
is wanted) or stop so that the wanted rows restart without the others. For that "next step" to be
the next one, the GPU thread of such a batch always waits until the GPU has at most one step queued
(not only in the preemption window); on the CPU nothing runs ahead anyway.

Pure: no torch, no asyncio; ``synchronize`` (the wait) is passed in, ``clock`` is the worker's.
"""

from __future__ import annotations

import enum
import threading
from typing import Any, Callable


class BatchPreempted(Exception):
    """The batch was stopped at a step boundary so that newer requests can join it, or because some
    or all of its rows are no longer wanted (not an error: its wanted requests go back to the queue)."""


class AbandonDecision(str, enum.Enum):
    CONTINUE = "continue"  # finish the batch; the unwanted rows' images are dropped
    STOP = "stop"  # no row is wanted: stop now, nothing to requeue
    STOP_AND_REQUEUE = "stop_and_requeue"  # stop now; the wanted rows run again in a batch of their own


def abandon_decision(rows: int, unwanted: int, steps_done: int, steps_total: int) -> AbandonDecision:
    """What a batch of ``rows`` rows, ``unwanted`` of which nobody waits for, does at the boundary
    after ``steps_done`` of ``steps_total`` denoising steps.

    No wanted row: stop. Every row wanted: continue. Otherwise restart the wanted rows when their
    full run costs less than finishing the whole batch, cost counted in row-steps (a step's cost
    taken as proportional to its rows): ``wanted * steps_total < rows * (steps_total - steps_done)``.
    Early in a batch that lost most of its rows a restart wins; near its end finishing does. (On a
    GPU a step of fewer rows costs more than its share, so this leans towards restarting a little
    more than it should; the restarted rows also lose nothing, their images do not depend on their
    batch-mates.)"""
    wanted = rows - unwanted
    if wanted <= 0:
        return AbandonDecision.STOP
    if unwanted <= 0:
        return AbandonDecision.CONTINUE
    left = max(0, steps_total - steps_done)
    if wanted * steps_total < rows * left:
        return AbandonDecision.STOP_AND_REQUEUE
    return AbandonDecision.CONTINUE


class ProgressLimiter:
    """At most one PROGRESS message per request every ``interval_s`` (on ``clock``); a request's
    first (step 0, its batch started) always goes. Thread-safe: the event loop sends step 0, the
    GPU thread the steps after."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def allow(self, request_id: str) -> bool:
        now = self.clock()
        with self._lock:
            last = self._last.get(request_id)
            if last is not None and now - last < self.interval_s:
                return False
            self._last[request_id] = now
            return True

    def sent(self, request_id: str) -> None:
        """A PROGRESS that had to go whatever the interval (its row paused or resumed): the next
        one waits an interval from now."""
        with self._lock:
            self._last[request_id] = self.clock()

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._last.pop(request_id, None)


class Preemption:
    """The stop signal of one batch. ``open_until_s``: the instant (on ``clock``) after which no
    newcomer can ask to join it any more (None: it was never preemptible for that). ``rows`` and
    ``steps``: the batch's size and denoising steps, for the abandoned-rows decision; with rows > 0
    the GPU thread waits for the GPU before every step (so a stop is never many queued steps late).
    ``on_step(steps_done)``: called by the GPU thread before each step after the first (progress).
    ``previews``: the batch's gpu_worker.model.previews.PreviewPlan (rows that asked for previews, how
    often), which the backend reads; None: no row asked."""

    def __init__(self, open_until_s: float | None, clock: Callable[[], float], rows: int = 0, steps: int = 0,
                 on_step: Callable[[int], None] | None = None, previews: Any = None) -> None:
        self.open_until_s = open_until_s
        self.clock = clock
        self.rows = rows
        self.steps = steps
        self.on_step = on_step
        self.previews = previews
        self._requested = threading.Event()
        self._unwanted: set[int] = set()
        self._lock = threading.Lock()
        self.steps_checked = 0  # denoising steps about to start that looked at the signal (GPU thread)
        self.decision: AbandonDecision | None = None  # why the batch stopped for its unwanted rows

    def request(self) -> None:
        """Stop the batch at its next step boundary (event-loop thread; thread-safe)."""
        self._requested.set()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def abandon(self, row: int) -> None:
        """Nobody waits for row ``row`` any more (event-loop thread; thread-safe): decided at the next step."""
        with self._lock:
            self._unwanted.add(row)

    @property
    def unwanted(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._unwanted)

    @property
    def steps_done(self) -> int:
        """Denoising steps finished (or queued on the device) so far, as the GPU thread last looked."""
        return max(0, min(self.steps, self.steps_checked - 1)) if self.steps else max(0, self.steps_checked - 1)

    def before_step(self, synchronize: Callable[[], None]) -> None:
        """Called by the GPU thread before each denoising step; raises BatchPreempted to stop."""
        self.steps_checked += 1
        if self.steps_checked > 1 and self.on_step is not None:
            self.on_step(self.steps_done)
        self._check()
        in_window = self.open_until_s is not None and self.clock() <= self.open_until_s
        if in_window or self.rows > 0:
            synchronize()  # the GPU has at most one step queued: a stop now throws away little
            self._check()

    def before_decode_part(self) -> None:
        """Called by the GPU thread before each VAE decode part, once denoising is done: a batch whose
        rows nobody wants any more skips the rest of its decoding (a large image's decode can take
        longer than a denoising step). A newcomer asking to join does not stop it here: its denoising
        is done, and only the decode is left."""
        if self.rows and len(self.unwanted) >= self.rows:
            self.decision = AbandonDecision.STOP
            raise BatchPreempted()

    def _check(self) -> None:
        if self._requested.is_set():
            raise BatchPreempted()
        unwanted = len(self.unwanted)
        if unwanted and self.rows:
            decision = abandon_decision(self.rows, unwanted, self.steps_done, self.steps)
            if decision is not AbandonDecision.CONTINUE:
                self.decision = decision
                raise BatchPreempted()
