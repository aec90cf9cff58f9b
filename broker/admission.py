"""Admission: refuse at once a request that cannot finish within its deadline, instead of accepting it
and leaving it to time out (pure: no sockets, no clock of its own; every call takes ``now``).

Cost is counted in work units (gpu_worker.decisions.cost_model.work_units: megapixels x steps x CFG rows).
Each worker's *seconds per work unit* comes from two sources, the cheaper one winning:

* what it measured at warm-up and reported at registration (``Register.seconds_per_work_unit``: the
  marginal cost of one denoising step of a larger image, fixed costs left out; 0 when it measured
  nothing);
* what its results show: a batch's ``generation_ms / (batch_size x work units)``, the lowest seen in
  the last :data:`OBSERVATION_MEMORY_S` (a batch of small images costs more per unit than a large
  one, so the lowest is the closest to the marginal cost).

A request's estimate is its work units x the fastest registered worker's seconds per unit x
:data:`ESTIMATE_DISCOUNT`. False refusals are worse than late answers, so every choice errs on the
cheap side: the discount, the marginal rather than the average cost, the lowest observation, the
fastest worker, and no estimate at all (so no refusal) before any worker has measured anything.

* estimate > deadline: **too_costly** (HTTP 400), naming both figures: fewer steps or a smaller
  image would fit, a retry of the same request never will;
* estimate + the work already ahead of it (spread over the accepting workers) > deadline:
  **overloaded** (HTTP 503) with ``retry_after_s`` = the excess, at least a second: it would fit once
  the queue has drained that much;
* otherwise it is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from imagegen.batch_key import BatchKey, work_units

# The estimate is this share of the measured cost: a request is refused only when even half of its
# expected time would not fit in its deadline.
ESTIMATE_DISCOUNT = 0.5
# The lowest cost per unit a worker's results showed is kept this long; an older one gives way to
# the next observation (a worker that became slower is not held to an old figure for ever).
OBSERVATION_MEMORY_S = 600.0


@dataclass(frozen=True)
class WorkerSpeed:
    """What the broker knows of one accepting worker: its name and what it registered with."""

    name: str
    registered_s_per_unit: float = 0.0  # 0: not measured


@dataclass(frozen=True)
class Verdict:
    """``code`` None: accept. Else a FailureCode value and a message for people; ``retry_after_s``
    for overloaded."""

    code: str | None = None
    message: str = ""
    retry_after_s: float = 0.0
    estimate_s: float | None = None


ACCEPT = Verdict()


@dataclass
class Admission:
    discount: float = ESTIMATE_DISCOUNT
    memory_s: float = OBSERVATION_MEMORY_S
    _observed: dict[str, tuple[float, float]] = field(default_factory=dict)  # worker -> (s per unit, when)

    def observe(self, worker_name: str, key: BatchKey, batch_size: int, generation_s: float, now: float) -> None:
        """A worker's result: a batch of ``batch_size`` images of ``key`` took ``generation_s``."""
        units = work_units(key) * batch_size
        if units <= 0 or generation_s <= 0:
            return
        per_unit = generation_s / units
        held = self._observed.get(worker_name)
        if held is None or per_unit <= held[0] or now - held[1] > self.memory_s:
            self._observed[worker_name] = (per_unit, now)

    def forget(self, worker_name: str) -> None:
        self._observed.pop(worker_name, None)

    def seconds_per_unit(self, workers: Sequence[WorkerSpeed], now: float) -> float | None:
        """The fastest worker's seconds per work unit (each worker's cheaper figure); None if none known."""
        known = []
        for worker in workers:
            figures = [worker.registered_s_per_unit] if worker.registered_s_per_unit > 0 else []
            observed = self._observed.get(worker.name)
            if observed is not None and now - observed[1] <= self.memory_s:
                figures.append(observed[0])
            if figures:
                known.append(min(figures))
        return min(known) if known else None

    def estimate_s(self, key: BatchKey, workers: Sequence[WorkerSpeed], now: float) -> float | None:
        """Seconds the request of ``key`` is expected to take alone on the fastest worker (discounted)."""
        per_unit = self.seconds_per_unit(workers, now)
        return None if per_unit is None else per_unit * work_units(key) * self.discount

    def decide(self, key: BatchKey, deadline_s: float, units_ahead: float, workers: Sequence[WorkerSpeed],
               now: float) -> Verdict:
        """Whether a request of ``key`` with ``deadline_s`` is accepted, with ``units_ahead`` work
        units already waiting or running (gpu_worker.decisions.cost_model.work_units) and ``workers`` accepting."""
        per_unit = self.seconds_per_unit(workers, now)
        if per_unit is None:
            return ACCEPT  # nothing measured yet: never refuse on a guess
        own_s = per_unit * work_units(key) * self.discount
        if own_s > deadline_s:
            return Verdict("too_costly",
                           f"{key.width}x{key.height} with {key.num_inference_steps} steps would take about "
                           f"{_seconds(own_s)} on the fastest worker, above the request's deadline of "
                           f"{deadline_s:g} s (REQUEST_TIMEOUT_S): use fewer steps or a smaller size",
                           estimate_s=own_s)
        ahead_s = per_unit * units_ahead * self.discount / max(1, len(workers))
        if own_s + ahead_s > deadline_s:
            retry_s = float(max(1, math.ceil(own_s + ahead_s - deadline_s)))
            return Verdict("overloaded",
                           f"about {_seconds(ahead_s)} of work is queued ahead of this request and it would "
                           f"take about {_seconds(own_s)} itself, above its deadline of {deadline_s:g} s: "
                           f"retry in {retry_s:g} s",
                           retry_after_s=retry_s, estimate_s=own_s)
        return Verdict(estimate_s=own_s)


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
