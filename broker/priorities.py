"""Which queued request goes next when requests differ in priority or owner (pure; the clock is passed in).

:meth:`broker.state.BrokerState._dispatch_model` asks :func:`pick` for the next of one model's queued
requests whenever one of them is not a plain one (priority other than "normal", or an owner); with
only plain requests queued it takes the queue's head, first in first out, as it always did. Two
rules, in turn:

1. **Priority, with aging.** A request's class is the rank of its ``Generate.priority`` (high 0,
   normal 1, low 2) less one for every full ``aging_s`` (PRIORITY_AGING_S) it has waited since the
   broker received it, never below 0 (:func:`effective_rank`). Requests of the lowest class go
   first. So a low request that has waited PRIORITY_AGING_S ranks with the normal ones, and being
   older goes before every normal one that came after it; after twice that it ranks with high ones:
   nothing waits for ever behind a stream of more urgent work. ``aging_s`` 0: no aging (strict
   priority: a low request may wait until its deadline).

2. **Fair share between owners, within that class.** An owner is the API key a request came with
   (``Generate.owner``; "" without API keys), its weight the key's ``share`` (``Generate.share``).
   Its usage is the GPU time of its finished requests (a result's generation_ms / batch_size, so a
   batch's time is split between its images), decayed by half every ``half_life_s``
   (FAIR_SHARE_HALF_LIFE_S, :class:`FairShares`), plus an estimate for its requests dispatched and
   not finished yet (so a burst handed out before any result does not count as free). The owner
   with the smallest usage / weight goes next, with its request queued first; equal owners: the
   request queued first. So while several owners wait, none gets more than its share of the GPU
   time; an owner alone gets all of it.

With every request normal and no owners, both rules pick the queue's head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from imagegen.protocol import DEFAULT_PRIORITY, PRIORITIES, Generate, priority_rank

DEFAULT_AGING_S = 60.0
# Places beyond a worker's capacity for high-priority requests alone (BROKER_HIGH_PRIORITY_RESERVE):
# two cover the priority-80 workload's high requests on every simulated table (docs/scheduling.md).
DEFAULT_HIGH_PRIORITY_RESERVE = 2
DEFAULT_HALF_LIFE_S = 300.0
MAX_OWNERS = 1024  # owners whose usage is remembered; beyond it the one charged longest ago is forgotten


def effective_rank(priority: str, waited_s: float, aging_s: float) -> int:
    """The class a request of ``priority`` that has waited ``waited_s`` seconds competes in (0 goes first)."""
    rank = priority_rank(priority)
    if aging_s <= 0 or waited_s <= 0:
        return rank
    return max(0, rank - int(waited_s // aging_s))


def is_plain(priority: str, owner: str) -> bool:
    """A request both rules leave in queue order: normal, and no owner."""
    return priority_rank(priority) == priority_rank(DEFAULT_PRIORITY) and not owner


def queue_group(message: Generate) -> tuple[str, str] | None:
    """The group a request waits in (broker/models.py ModelQueues): None for a plain one, else its
    priority and owner. Within a group the first queued has waited longest, so :func:`pick` need
    only see each group's first."""
    if is_plain(message.priority, message.owner):
        return None
    return known_priority(message.priority), message.owner


@dataclass(frozen=True)
class Waiting:
    """A queued request as :func:`pick` sees it; given in queue order."""

    request_id: str
    priority: str
    owner: str
    share: float
    received_at: float


def pick(waiting: Iterable[Waiting], now: float, aging_s: float,
         usage: Callable[[str], float]) -> str | None:
    """The id of the request that goes next among ``waiting`` (in queue order), by the module's two
    rules; ``usage(owner)``: the owner's GPU-seconds as the fair share counts them. None: none waits."""
    best_rank = math.inf
    firsts: dict[str, tuple[int, Waiting]] = {}  # owner -> its first request of the best class, and where
    for index, entry in enumerate(waiting):
        rank = effective_rank(entry.priority, now - entry.received_at, aging_s)
        if rank < best_rank:
            best_rank, firsts = rank, {}
        if rank == best_rank and entry.owner not in firsts:
            firsts[entry.owner] = (index, entry)
    if not firsts:
        return None
    if len(firsts) == 1:
        return next(iter(firsts.values()))[1].request_id
    _, chosen = min(firsts.values(),
                    key=lambda item: (usage(item[1].owner) / max(item[1].share, 1e-9), item[0]))
    return chosen.request_id


class FairShares:
    """GPU-seconds per owner: all of them since start (``total``, for metrics) and decayed by half
    every ``half_life_s`` (``recent``, for the fair share); and each owner's latest weight."""

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S, max_owners: int = MAX_OWNERS) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        self.half_life_s = half_life_s
        self.max_owners = max_owners
        self._recent: dict[str, tuple[float, float]] = {}  # owner -> (decayed seconds, as of when)
        self._total: dict[str, float] = {}
        self._share: dict[str, float] = {}
        # The latest result's GPU-seconds per image, for requests whose own kind has no estimate yet.
        self.latest_image_s: float | None = None

    def charge(self, owner: str, gpu_seconds: float, now: float) -> None:
        """``owner``'s request took ``gpu_seconds`` of a GPU (its part of its batch)."""
        recent = self.recent(owner, now) + gpu_seconds
        self._recent.pop(owner, None)
        self._recent[owner] = (recent, now)  # the latest charged last: the first is forgotten first
        self._total[owner] = self._total.get(owner, 0.0) + gpu_seconds
        if gpu_seconds > 0:
            self.latest_image_s = gpu_seconds
        while len(self._recent) > self.max_owners:
            forgotten = next(iter(self._recent))
            del self._recent[forgotten]
            self._total.pop(forgotten, None)
            self._share.pop(forgotten, None)

    def recent(self, owner: str, now: float) -> float:
        """``owner``'s GPU-seconds, each halved for every ``half_life_s`` since it was charged."""
        value, at = self._recent.get(owner, (0.0, now))
        return value * 0.5 ** (max(0.0, now - at) / self.half_life_s)

    def total(self, owner: str) -> float:
        return self._total.get(owner, 0.0)

    def set_share(self, owner: str, share: float, now: float) -> None:
        """A request of ``owner`` came with weight ``share``: it counts among the owners from now on
        (charged nothing; the latest to come is the last forgotten)."""
        self.charge(owner, 0.0, now)
        self._share[owner] = share

    def share(self, owner: str) -> float:
        return self._share.get(owner, 1.0)

    def owners(self) -> list[str]:
        """Every owner charged or sent a request (and not forgotten), sorted."""
        return sorted(self._total)


@dataclass
class ClassCounters:
    """One priority's figures since start: requests accepted, requests handed to a worker for the
    first time, and the seconds those waited in the broker's queue, summed."""

    received: int = 0
    dispatched: int = 0
    queue_wait_s: float = 0.0


def class_counters() -> dict[str, ClassCounters]:
    return {priority: ClassCounters() for priority in PRIORITIES}


def known_priority(priority: str) -> str:
    """``priority``, or "normal" for a value outside PRIORITIES (a peer of a newer build)."""
    return priority if priority in PRIORITIES else DEFAULT_PRIORITY
