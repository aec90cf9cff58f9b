"""Answers the broker could not deliver, kept for a gateway to collect (pure: no sockets, no clock).

A request's RESULT or FAILURE goes to its client, the gateway connection that sent it (or the
latest that collected it). When that gateway is not there (the send fails: it is not connected, or
it has sent nothing for a while, broker.state.BrokerPolicy.client_silence_s) the answer is kept
here instead of being dropped, so that the gateway, restarted, or any other gateway can COLLECT it
by its request id. The store is bounded three ways (the broker's settings):

* ``max_results`` answers (BROKER_UNCLAIMED_RESULTS),
* ``max_bytes`` of payload (BROKER_UNCLAIMED_RESULT_BYTES; an answer larger than that is not kept),
* ``ttl_s`` seconds each (BROKER_UNCLAIMED_RESULT_TTL_S),

the oldest answer dropped first when a new one does not fit. Everything is lost when the broker
restarts. Payload frames are kept as received (zmq.Frame), never copied.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from imagegen.protocol import Message

# Bytes counted per kept answer on top of its payload: the header, the entry and the table slot.
ENTRY_OVERHEAD_BYTES = 1024


@dataclass
class Kept:
    """One undelivered answer: its message (a Result or Failure), payload frames, the client it was
    meant for and when it was first kept (its age counts from there, whatever happens after)."""

    request_id: str
    client_id: bytes
    message: Message
    payload: tuple[Any, ...]
    label: str
    kept_at: float
    size: int = 0


@dataclass
class UnclaimedCounters:
    kept: int = 0  # answers kept because they could not be delivered
    claimed: int = 0  # kept answers taken out by a COLLECT (or a resent GENERATE) and sent
    expired: int = 0  # dropped after ttl_s
    dropped: int = 0  # dropped to make room (the oldest first), or too large to keep at all
    cancelled: int = 0  # dropped because a CANCEL for their request came


@dataclass
class UnclaimedResults:
    max_results: int
    max_bytes: int
    ttl_s: float
    counters: UnclaimedCounters = field(default_factory=UnclaimedCounters)

    def __post_init__(self) -> None:
        self._kept: OrderedDict[str, Kept] = OrderedDict()  # oldest first
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._kept

    def keep(self, request_id: str, client_id: bytes, message: Message, payload: Sequence[Any], label: str,
             now: float, kept_at: float | None = None) -> list[str]:
        """Keep one undelivered answer; returns the ids of the answers dropped to make room (the new
        one's own id when it cannot be kept: larger than ``max_bytes``, or the store is off).

        ``kept_at``: when it was first kept, for an answer taken out to be delivered whose delivery
        failed in turn: it keeps its age, and its claim is undone."""
        if kept_at is None:
            kept_at = now
            self.counters.kept += 1
        else:
            self.counters.claimed -= 1
        self._pop(request_id)  # first answer wins at the broker: never two for one id, but never keep both
        size = ENTRY_OVERHEAD_BYTES + sum(_length(frame) for frame in payload)
        if self.max_results <= 0 or size > self.max_bytes or now - kept_at >= self.ttl_s:
            self.counters.dropped += 1
            return [request_id]
        dropped = []
        while self._kept and (len(self._kept) >= self.max_results or self.bytes + size > self.max_bytes):
            oldest = next(iter(self._kept))
            self._pop(oldest)
            self.counters.dropped += 1
            dropped.append(oldest)
        newest = next(reversed(self._kept.values()), None)
        self._kept[request_id] = Kept(request_id, client_id, message, tuple(payload), label, kept_at, size)
        if newest is not None and kept_at < newest.kept_at:  # kept again: back to its place by age
            self._kept = OrderedDict(sorted(self._kept.items(), key=lambda item: item[1].kept_at))
        self.bytes += size
        return dropped

    def take(self, request_id: str) -> Kept | None:
        """The kept answer for ``request_id``, forgotten here (counted as claimed); None if none."""
        entry = self._pop(request_id)
        if entry is not None:
            self.counters.claimed += 1
        return entry

    def discard(self, request_id: str) -> bool:
        """Forget a kept answer nobody wants any more (its request was cancelled)."""
        if self._pop(request_id) is None:
            return False
        self.counters.cancelled += 1
        return True

    def expire(self, now: float) -> list[str]:
        """Drop the answers kept ``ttl_s`` or longer; returns their ids."""
        expired = []
        while self._kept:
            oldest = next(iter(self._kept.values()))
            if now - oldest.kept_at < self.ttl_s:
                break
            self._pop(oldest.request_id)
            self.counters.expired += 1
            expired.append(oldest.request_id)
        return expired

    def _pop(self, request_id: str) -> Kept | None:
        entry = self._kept.pop(request_id, None)
        if entry is None:
            return None
        self.bytes -= entry.size
        return entry


def _length(frame: Any) -> int:
    """Bytes of one payload frame (zmq.Frame or bytes)."""
    buffer = getattr(frame, "buffer", None)
    return len(buffer) if buffer is not None else len(frame)
