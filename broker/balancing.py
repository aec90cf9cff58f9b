"""Which worker gets the next request: the balancing choice alone, pure and clock-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

ROUND_ROBIN = "round-robin"
QUEUE_DEPTH = "queue-depth"
STRATEGIES = (ROUND_ROBIN, QUEUE_DEPTH)


@dataclass(frozen=True)
class Candidate:
    """A worker as the balancer sees it: identity, the requests it holds, and how many it may hold.

    ``over_share``: it already holds its fair share of the unfinished work while requests wait in
    the broker for credit (:meth:`broker.state.BrokerState.fair_share`), so it may take nothing now.

    ``preferred``: it has the request's image size warm (it runs compiled there without compiling,
    :meth:`broker.state.WorkerRecord.has_warm`); the balancer picks among preferred workers with
    credit first."""

    key: Hashable
    in_flight: int
    capacity: int
    over_share: bool = False
    preferred: bool = True

    @property
    def has_credit(self) -> bool:
        return self.in_flight < self.capacity and not self.over_share


class Balancer:
    """Chooses among workers that still have credit (in_flight < capacity, and not over their share).

    * ``round-robin``: the next worker after the last one chosen, in the given order.
    * ``queue-depth``: the worker holding the fewest requests; ties go round-robin, so equal
      workers share a burst evenly instead of the first one taking everything.

    Preferred candidates (the request's size warm there) with credit come first: the strategy
    chooses among them, and among all with credit only when none of them has any.

    Loads are the broker's own in-flight counts, which change the instant a request is assigned,
    rather than worker-reported depths, which arrive late and would let a burst pile onto one GPU.
    """

    def __init__(self, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self._last: Hashable | None = None

    def choose(self, candidates: Sequence[Candidate]) -> Hashable | None:
        """The key of the chosen worker, or None when no worker has credit."""
        ordered = self._round_robin_order(candidates)
        eligible = [c for c in ordered if c.has_credit]
        if not eligible:
            return None
        eligible = [c for c in eligible if c.preferred] or eligible
        if self.strategy == QUEUE_DEPTH:
            chosen = min(eligible, key=lambda c: c.in_flight)  # min() keeps the first of equals
        else:
            chosen = eligible[0]
        self._last = chosen.key
        return chosen.key

    def _round_robin_order(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """Candidates rotated so the one after the last chosen comes first."""
        keys = [c.key for c in candidates]
        if self._last not in keys:
            return list(candidates)
        start = keys.index(self._last) + 1
        return list(candidates[start:]) + list(candidates[:start])
