"""Batching policies a worker can run, chosen by ``BATCH_POLICY``: ``run-to-completion`` and ``window`` (pure).

``run-to-completion`` (also accepted as ``default``, its earlier name) is :class:`AdaptiveBatcher`
below: a batch, once formed, runs all its denoising steps. ``step``
(gpu_worker/decisions/step_scheduler.py) decides per denoising step instead; it is not a batcher:
the worker runs it in its step loop (gpu_worker/shell/step_loop.py), the simulator in its own.

``window`` is :class:`gpu_worker.decisions.batcher.Batcher`: a group runs when it fills a batch or its oldest
request has waited the (adaptive) window. ``seed``, its earlier name, is still accepted.

``default`` is :class:`AdaptiveBatcher`. Same interface, same grouping by :class:`BatchKey`, same
limits (``max_batch_size``, ``max_batch_pixels``, ``min_batch_size``), but it does not hold an idle
GPU for batch-mates unless they are expected soon enough to pay for the wait:

* A group that fills a batch runs at once (as under ``window``).
* Otherwise a group may run as soon as the GPU is free, unless one of two holds applies, both
  counted from the group's *newest* arrival and both capped at ``max_wait_time_s`` from its oldest:

  - **coalescing**: requests of one burst reach the worker a few milliseconds apart (the gateway
    and broker forward them one by one). Waiting ``coalesce_gap_s`` after the latest arrival (at
    most ``coalesce_fraction`` of the estimated batch-1 time, so a lone request pays at most that
    fraction) lets the burst land before the GPU commits to a batch of one. With ``preempt`` (the
    default) a group of *one* does not hold: it starts at once as a preemptible batch, and a request
    of its key arriving within ``coalesce_gap_s`` of it (:attr:`Batch.preemptible_until`) stops it
    before its next denoising step (gpu_worker/decisions/preemption.py). A lone request pays no hold; a burst
    pays what the stopped batch ran. The window is the whole gap, not capped by
    ``coalesce_fraction``: that cap bounds what a lone request pays for a hold, and a preemptible
    start costs it nothing. Groups of two or more (a burst landing) hold as before.
  - **break-even**: one more request is worth waiting ``w`` for while
    ``w < t(k) - t(k+1) + t(1) / (k + 1)`` (t: batch seconds from the online cost model, k: the
    group's size): the k wait w, but the newcomer does not wait for a whole batch and then run
    alone. With Poisson arrivals at mean gap ``g`` the expected gain is positive only while
    ``g < B (k + 1) / k`` (B: that break-even wait), and the best hold is ``(k + 1) B - k g``.
    Both t and g are learned online, so this hold appears only where measured costs show a saving
    (launch-bound small batches) and arrivals are frequent enough.
* When several groups may run, the one whose oldest request arrived first runs first (as under ``window``).
* While the GPU is busy nothing is decided: requests accumulate and form the next batch by
  themselves, which is where the large batches of a loaded server come from.

Costs come from :meth:`AdaptiveBatcher.observe_batch`, which the worker calls after every batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import TypeVar

from gpu_worker.decisions.batcher import Batch, Batcher, BatchKey, BatchPolicyConfig, Pending
from gpu_worker.decisions.cost_model import OnlineCostModel

T = TypeVar("T")

RUN_TO_COMPLETION = "run-to-completion"
DEFAULT = RUN_TO_COMPLETION  # the worker's BATCH_POLICY when none is given
WINDOW = "window"
# Step-level scheduling (gpu_worker/decisions/step_scheduler.py): decided per denoising step, not per
# batch. Not a batcher: the worker runs it in its step loop (gpu_worker/shell/step_loop.py), the
# simulator in its own.
STEP = "step"
POLICY_NAMES = (RUN_TO_COMPLETION, WINDOW)
# Other names still accepted in BATCH_POLICY and by make_batcher, so existing configurations keep working.
POLICY_ALIASES = {"seed": WINDOW, "default": RUN_TO_COMPLETION}
STEP_NOT_A_BATCHER = ("step is not a batcher: it runs with the step-level engine, in the worker's step loop "
                      "(gpu_worker/shell/step_loop.py)")


def canonical_policy(name: str) -> str:
    """``name`` with an alias replaced by the policy it names (unknown names are returned as they are)."""
    return POLICY_ALIASES.get(name, name)


@dataclass(frozen=True)
class HoldTuning:
    """How long :class:`AdaptiveBatcher` may hold an idle GPU, beyond the shared BatchPolicyConfig."""

    coalesce_gap_s: float = 0.02  # a burst's requests arrive closer together than this
    coalesce_fraction: float = 0.02  # ...but never hold more than this fraction of a batch-1 inference
    rate_alpha: float = 0.3  # weight of the newest inter-arrival gap in the moving average
    cost_alpha: float = 0.3  # weight of the newest batch duration in the online cost model
    break_even: bool = True  # False: only the coalescing hold (the "greedy" variant)
    coalesce: bool = True  # False: no coalescing hold either
    preempt: bool = True  # a group of one starts at once, preemptible, instead of the coalescing hold

    def __post_init__(self) -> None:
        if self.coalesce_gap_s < 0 or not 0 <= self.coalesce_fraction <= 1:
            raise ValueError("need coalesce_gap_s >= 0 and 0 <= coalesce_fraction <= 1")
        if not 0 < self.rate_alpha <= 1 or not 0 < self.cost_alpha <= 1:
            raise ValueError("rate_alpha and cost_alpha must be in (0, 1]")


@dataclass
class ArrivalGaps:
    """Moving average of the gaps between arrivals of one key, and the latest arrival."""

    alpha: float
    last_s: float | None = None
    mean_gap_s: float | None = None

    def observe(self, now: float) -> None:
        if self.last_s is not None:
            gap = max(0.0, now - self.last_s)
            self.mean_gap_s = gap if self.mean_gap_s is None else self.mean_gap_s + self.alpha * (gap - self.mean_gap_s)
        self.last_s = now if self.last_s is None else max(self.last_s, now)


@dataclass
class AdaptiveBatcher(Batcher[T]):
    """The default policy: :class:`gpu_worker.decisions.batcher.Batcher` with another readiness rule.

    Queueing, grouping, cancelling, taking a batch and the limits are Batcher's own; this class
    replaces only :meth:`ready_at` (when an idle GPU should run a group), and learns arrival gaps
    (in :meth:`add`) and batch costs (from :meth:`observe_batch`, which the worker calls after
    every batch). Every method that needs the time takes ``now``."""

    config: BatchPolicyConfig = field(default_factory=BatchPolicyConfig)
    tuning: HoldTuning = field(default_factory=HoldTuning)
    _gaps: dict[BatchKey, ArrivalGaps] = field(default_factory=dict)
    costs: OnlineCostModel = field(init=False)

    def __post_init__(self) -> None:
        self.costs = OnlineCostModel(self.tuning.cost_alpha)

    def add(self, request_id: str, key: BatchKey, item: T, now: float) -> None:
        super().add(request_id, key, item, now)
        self._gaps.setdefault(key, ArrivalGaps(self.tuning.rate_alpha)).observe(now)

    def observe_batch(self, key: BatchKey, size: int, duration_s: float, now: float) -> None:
        """A batch of ``size`` requests of ``key`` took ``duration_s`` of GPU time (ended at ``now``)."""
        self.costs.observe(key, size, duration_s)

    # ------------------------------------------------------------------ the rule

    def ready_at(self, group: deque[Pending[T]]) -> float:
        """The instant this group may run if the GPU is free (-inf: at once)."""
        key, size = group[0].key, len(group)
        if size >= self.max_batch_size_for(key) or not self.config.enable_batching:
            return float("-inf")
        give_up_at = group[0].arrived_at + self.config.max_wait_time_s
        if size < self.config.min_batch_size:
            return give_up_at  # the operator asked for batches of at least this size (as under ``window``)
        newest = max(p.arrived_at for p in group)
        return min(give_up_at, newest + self.hold_s(key, size))

    def hold_s(self, key: BatchKey, size: int) -> float:
        """How long after a group's newest arrival an idle GPU still waits for one more request."""
        coalesce_s = 0.0 if self.starts_preemptible(size) else self.coalesce_hold_s(key)
        return max(coalesce_s, self.break_even_hold_s(key, size))

    def starts_preemptible(self, size: int) -> bool:
        """Whether a group of ``size`` replaces its coalescing hold by a preemptible start."""
        return self.tuning.preempt and self.tuning.coalesce and size == 1 and self.config.enable_batching

    def next_batch(self, now: float) -> Batch[T] | None:
        """Batcher's choice; a lone request started within ``coalesce_gap_s`` of its arrival is marked
        preemptible until then (its batch may be stopped for batch-mates of the same burst)."""
        batch = super().next_batch(now)
        if batch is None or not self.starts_preemptible(len(batch)):
            return batch
        window_ends_at = batch.requests[-1].arrived_at + self.tuning.coalesce_gap_s
        if now >= window_ends_at or len(batch) >= self.max_batch_size_for(batch.key):
            return batch  # no burst is landing any more, or it is full: nothing to stop it for
        return replace(batch, preemptible_until=window_ends_at)

    def coalesce_hold_s(self, key: BatchKey) -> float:
        if not self.tuning.coalesce:
            return 0.0
        batch1_s = self.costs.estimate_s(key, 1)
        if batch1_s is None:
            return self.tuning.coalesce_gap_s
        return min(self.tuning.coalesce_gap_s, self.tuning.coalesce_fraction * batch1_s)

    def break_even_wait_s(self, key: BatchKey, size: int) -> float:
        """The longest wait for request ``size + 1`` that still lowers the summed latency (<= 0: none).

        Compares running the ``size`` queued requests now (a newcomer then waits for the batch and
        runs alone) with waiting ``w`` and running ``size + 1`` together."""
        if size + 1 > self.max_batch_size_for(key):
            return 0.0
        now_s, one_s, more_s = (self.costs.estimate_s(key, n) for n in (size, 1, size + 1))
        if now_s is None or one_s is None or more_s is None:
            return 0.0
        return now_s - more_s + one_s / (size + 1)

    def break_even_hold_s(self, key: BatchKey, size: int) -> float:
        """The best hold for Poisson arrivals at the observed mean gap: (k + 1) B - k g, at most B."""
        if not self.tuning.break_even:
            return 0.0
        wait_s = self.break_even_wait_s(key, size)
        gaps = self._gaps.get(key)
        if wait_s <= 0.0 or gaps is None or gaps.mean_gap_s is None:
            return 0.0
        return max(0.0, min(wait_s, (size + 1) * wait_s - size * gaps.mean_gap_s))


def make_batcher(name: str, config: BatchPolicyConfig, tuning: HoldTuning | None = None) -> Batcher:
    """The batcher for policy ``name`` ("run-to-completion" or "window"; "default" and "seed" name them),
    with the shared limits in ``config``. "step" is not a batcher: ValueError saying so."""
    name = canonical_policy(name)
    if name == WINDOW:
        return Batcher(config)
    if name == RUN_TO_COMPLETION:
        return AdaptiveBatcher(config=config, tuning=tuning or HoldTuning())
    if name == STEP:
        raise ValueError(STEP_NOT_A_BATCHER)
    raise ValueError(f"unknown batching policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
