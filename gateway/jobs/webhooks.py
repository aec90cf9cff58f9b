"""Webhooks: signed deliveries of a job's events to the URL its client gave, from the store's outbox.

Signing (Standard Webhooks headers)
-----------------------------------
Each POST carries ``webhook-id`` (the delivery's id, the same on every attempt: receivers
deduplicate by it), ``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature:
v1,<base64 of HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{body}">``, keyed with the
secret's bytes; the secret is written ``whsec_<base64>`` (WEBHOOK_SECRET, or WEBHOOK_SECRET_FILE).
:func:`sign` and :func:`signed_headers` make them; :func:`verify` checks them and is written to be
copied into a receiver as it is (docs/jobs.md shows it): standard library only, constant-time
comparison, a timestamp tolerance against replays, several space-separated signatures accepted
(secret rotation). ``python -m gateway.jobs.webhooks`` prints a fresh secret.

The body is JSON, the same bytes on every attempt (:func:`payload`)::

    {"type": "job.progress", "timestamp": "2026-01-01T12:00:00.000000Z",
     "data": {"job_id": "...", "event_id": 7, "step": 3, "steps": 20}}

``type`` is ``job.`` and the SSE event name; ``data`` holds the event's data with ``job_id`` and
``event_id`` (increasing per job: deliveries are not ordered, a receiver orders by it).

Which events (``webhook_events``)
---------------------------------
A job's ``webhook_events`` lists names of :data:`WEBHOOK_EVENT_GROUPS` or SSE event names:

=============  ===============================
webhook event  SSE events it selects
=============  ===============================
``queued``     queued (and position changes)
``start``      started, restarted
``progress``   progress
``preview``    preview (jobs with preview on)
``completed``  succeeded, failed, cancelled
=============  ===============================

An SSE name selects itself (``["succeeded"]``). Without ``webhook_events``:
:data:`DEFAULT_WEBHOOK_EVENTS` (start and completed). :func:`parse_webhook_events` checks a
client's list; :func:`wants` says whether a job's filter selects an event; :func:`record_event`
appends an event to the job's log and queues it for the webhook when the filter selects it.

URL guard
---------
:func:`check_webhook_url` refuses a URL that is not http or https, has no host, writes an IPv4
address in a legacy numeric form, or names an address (or ``localhost``) that is loopback, private,
link-local, multicast, reserved, unspecified or otherwise not globally routable; IPv4-mapped IPv6
addresses and the IPv4 address inside 6to4, Teredo and NAT64 addresses are checked as IPv4.
``WEBHOOK_ALLOW_PRIVATE=true`` allows every range but multicast and unspecified.
:func:`resolve_webhook_url` also resolves a host name and refuses it when any of its addresses is
refused (at submission, for a clear 400). **DNS rebinding**: a name can resolve to a public address
when the job is submitted and to a private one when it is delivered, so the check is made again at
every delivery, on the very addresses the connection uses: the sender's aiohttp connector resolves
through :class:`GuardedResolver` (which refuses a name when any of its addresses is refused) with
its DNS cache off, IP literals (which aiohttp does not resolve) are checked before each request,
redirects are not followed and proxies from the environment are not used. A delivery refused at
delivery time is given up at once (``stats["refused"]``).

Backoff and delivery
--------------------
:class:`Backoff`: after a failed attempt (not 2xx, a timeout, a connection error), the next one
comes after an exponentially growing delay with jitter; after ``max_attempts`` the delivery is
given up (``stats["given_up"]``). :class:`WebhookSender` is the background task: it claims due
deliveries from the store (leased, so gateways sharing a store do not send one twice at once),
POSTs them signed with a timeout, marks 2xx delivered and schedules a retry otherwise. It never
runs on the serving path: a route only appends and enqueues, and may call ``wake()``. Delivery is
at least once: a receiver deduplicates by ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from gateway.jobs.store import EVENT_TYPES, Delivery, Event, Job, JobStore, JobStoreError

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
SECRET_BYTES = (24, 64)  # Standard Webhooks' range for a secret's length
DEFAULT_TOLERANCE_S = 300
MAX_URL_CHARS = 2048
RESPONSE_BYTES_READ = 4096  # of a receiver's answer, for the log; the rest is discarded

WEBHOOK_EVENT_GROUPS: dict[str, tuple[str, ...]] = {
    "queued": ("queued",),
    "start": ("started", "restarted"),
    "progress": ("progress",),
    "preview": ("preview",),
    "pauses": ("paused", "resumed"),
    "completed": ("succeeded", "failed", "cancelled"),
}
DEFAULT_WEBHOOK_EVENTS = ("start", "completed")
WEBHOOK_EVENT_NAMES = tuple(dict.fromkeys([*WEBHOOK_EVENT_GROUPS, *EVENT_TYPES]))


# ---------------------------------------------------------------------------------------------
# Secrets and signatures

class WebhookSecret(str):
    """A webhook secret, never shown: the start-up log prints every setting with repr()."""

    def __repr__(self) -> str:
        return "<webhook secret, redacted>"


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_bytes(secret: str) -> bytes:
    """The key inside ``whsec_<base64>``; ValueError saying what is wrong (never showing it)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret is written {SECRET_PREFIX}<base64>; "
                         "make one with: python -m gateway.jobs.webhooks")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SECRET_PREFIX} is not base64; "
                         "make a secret with: python -m gateway.jobs.webhooks") from None
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"the secret holds {len(key)} bytes; it must hold {low} to {high} "
                         "(python -m gateway.jobs.webhooks makes one of 32)")
    return key


def parse_webhook_secret(text: str) -> WebhookSecret | None:
    """WEBHOOK_SECRET: empty means none."""
    text = text.strip()
    if not text:
        return None
    secret_bytes(text)
    return WebhookSecret(text)


def read_webhook_secret_file(path: str) -> WebhookSecret:
    """WEBHOOK_SECRET_FILE: the secret alone (surrounding blank space ignored)."""
    try:
        text = open(path, encoding="utf-8").read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path!r}: {exc}") from None
    try:
        secret_bytes(text)
    except ValueError as exc:
        raise ValueError(f"{path!r}: {exc}") from None
    return WebhookSecret(text)


def configured_webhook_secret(settings: Any) -> WebhookSecret | None:
    """WEBHOOK_SECRET or the secret in WEBHOOK_SECRET_FILE; None: no webhooks can be signed."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret
    if settings.webhook_secret_file is not None:
        return read_webhook_secret_file(settings.webhook_secret_file)
    return None


def sign(secret: str, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 over "{msg_id}.{timestamp}.{body}">``."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body), "content-type": "application/json"}


def verify(secret, headers, body, now=None, tolerance_s=300):
    """Check a webhook delivery: raise ValueError unless its signature is right and its timestamp
    within tolerance_s seconds of now. secret: "whsec_..."; headers: any mapping of the request's
    headers; body: the raw body as received (bytes)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get("webhook-id")
    timestamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        raise ValueError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise ValueError("webhook-timestamp is not a whole number of seconds") from None
    now = time.time() if now is None else now
    if abs(now - sent_at) > tolerance_s:
        raise ValueError("webhook-timestamp is too far from now: a replay, or a clock that is off")
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())
    for signature in signatures.split():
        version, _, value = signature.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return
    raise ValueError("no signature matches: wrong secret, or the body was changed")


def payload(delivery: Delivery) -> bytes:
    """The body of every attempt of ``delivery`` (the same bytes each time)."""
    at = datetime.datetime.fromtimestamp(delivery.at, datetime.timezone.utc)
    data = {**delivery.data, "job_id": delivery.job_id, "event_id": delivery.event_id}
    document = {"type": f"job.{delivery.type}", "timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "data": data}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


# ---------------------------------------------------------------------------------------------
# The webhook_events filter

def parse_webhook_events(names: Any) -> tuple[str, ...]:
    """A client's ``webhook_events``: a non-empty list of names, each a webhook event or an SSE
    event name; duplicates dropped, order kept. ValueError names what is wrong and what is allowed."""
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"webhook_events must be a non-empty list of names out of {list(WEBHOOK_EVENT_NAMES)}")
    unknown = [name for name in names if name not in WEBHOOK_EVENT_NAMES]
    if unknown:
        raise ValueError(f"webhook_events: unknown {unknown}; use names out of {list(WEBHOOK_EVENT_NAMES)}")
    return tuple(dict.fromkeys(names))


def selected_events(names: Iterable[str] | None) -> frozenset[str]:
    """The SSE event types a ``webhook_events`` list selects (None: the default list)."""
    selected: set[str] = set()
    for name in DEFAULT_WEBHOOK_EVENTS if names is None else names:
        selected.update(WEBHOOK_EVENT_GROUPS.get(name, (name,)))
    return frozenset(selected)


def wants(names: Iterable[str] | None, event_type: str) -> bool:
    return event_type in selected_events(names)


def record_event(store: JobStore, job: Job, type: str, data: dict | None = None, *,
                 now: float | None = None) -> Event | None:
    """Append an event to ``job``'s log and, when the job has a webhook whose filter selects it,
    queue it in the outbox. Blocking, like the store: call it in a thread from asyncio (then
    ``WebhookSender.wake()`` sends at once)."""
    now = time.time() if now is None else now
    event = store.append_event(job.id, type, data, at=now)
    if event is not None and job.webhook_url is not None and wants(job.webhook_events, type):
        store.enqueue(job.id, event, now)
    return event


# ---------------------------------------------------------------------------------------------
# The URL guard

class WebhookUrlRefused(ValueError):
    """A webhook URL the gateway will not call; the message says why and what to do."""


_ALLOW_HINT = ("; webhooks go to public addresses only, unless the operator sets WEBHOOK_ALLOW_PRIVATE=true")


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _candidates(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The addresses a connection to ``address`` reaches or tunnels to: an IPv4-mapped or NAT64
    address is its IPv4 address; a 6to4 or Teredo address is itself and the IPv4 address inside."""
    if isinstance(address, ipaddress.IPv4Address):
        return [address]
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    found: list = [address]
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.append(address.teredo[1])
    return found


def address_refusal(text: str, allow_private: bool = False) -> str | None:
    """Why a webhook may not go to address ``text`` (e.g. "loopback"), or None if it may."""
    for candidate in _candidates(ipaddress.ip_address(text.split("%", 1)[0])):
        if candidate.is_multicast:
            return "multicast"
        if candidate.is_unspecified:
            return "unspecified"
        if allow_private:
            continue
        for kind in ("loopback", "link_local", "reserved", "private"):
            if getattr(candidate, f"is_{kind}"):
                return kind.replace("_", "-")
        if not candidate.is_global:
            return "not globally routable"
    return None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def check_webhook_url(url: Any, allow_private: bool = False) -> str:
    """Refuse (WebhookUrlRefused) a URL that is not http(s) with a host, or whose host is an IP
    literal or ``localhost`` the guard refuses; host names are resolved by resolve_webhook_url and,
    at delivery, by GuardedResolver. Returns the URL."""
    if not isinstance(url, str) or not url:
        raise WebhookUrlRefused("webhook must be an http:// or https:// URL")
    if len(url) > MAX_URL_CHARS:
        raise WebhookUrlRefused(f"webhook URL is {len(url)} characters; at most {MAX_URL_CHARS}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    except ValueError as exc:
        raise WebhookUrlRefused(f"webhook URL {url!r} cannot be parsed: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise WebhookUrlRefused(f"webhook URL scheme {parts.scheme!r} is not allowed; use http:// or https://")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookUrlRefused(f"webhook URL {url!r} has no host")
    if _is_ip_literal(host):
        reason = address_refusal(host, allow_private)
        if reason is not None:
            raise WebhookUrlRefused(f"webhook URL {url!r} points to a {reason} address" + _ALLOW_HINT)
    elif all(char in "0123456789." for char in host) or host.lower().startswith("0x"):
        raise WebhookUrlRefused(f"webhook URL host {host!r} is not a canonical address; write an IPv4 "
                                "address as four decimal numbers, or use a host name")
    elif (host.lower() == "localhost" or host.lower().endswith(".localhost")) and not allow_private:
        raise WebhookUrlRefused(f"webhook URL {url!r} points to this machine (localhost)" + _ALLOW_HINT)
    return url


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver for webhook deliveries: resolves with ``inner`` (getaddrinfo in a thread
    by default) and refuses the name (WebhookUrlRefused) when any address is refused, so the
    addresses checked are the ones connected to."""

    def __init__(self, allow_private: bool = False, inner: AbstractResolver | None = None) -> None:
        self.allow_private = allow_private
        self._inner = inner

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        for result in results:
            reason = address_refusal(result["host"], self.allow_private)
            if reason is not None:
                raise WebhookUrlRefused(f"webhook host {host!r} resolves to {result['host']}, a {reason} address"
                                        + _ALLOW_HINT)
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


async def resolve_webhook_url(url: Any, allow_private: bool = False,
                              resolver: AbstractResolver | None = None) -> str:
    """check_webhook_url, then resolve a host name and refuse it when it does not resolve or any of
    its addresses is refused: for the submission's answer (delivery checks again)."""
    check_webhook_url(url, allow_private)
    host = (urlsplit(url).hostname or "").rstrip(".")
    if _is_ip_literal(host):
        return url
    guarded = GuardedResolver(allow_private, resolver)
    try:
        await guarded.resolve(host, 0, socket.AF_UNSPEC)
    except OSError as exc:
        raise WebhookUrlRefused(f"webhook host {host!r} does not resolve: {exc}") from None
    finally:
        if resolver is None:
            await guarded.close()
    return url


def _refusal_in(exc: BaseException) -> WebhookUrlRefused | None:
    """The WebhookUrlRefused behind an aiohttp error, if one is."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, WebhookUrlRefused):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# ---------------------------------------------------------------------------------------------
# Backoff and the sender

@dataclass(frozen=True)
class Backoff:
    """When to try again. After attempt n (1, 2, ...) failed, the next comes after
    ``min(max_delay_s, base_s * factor ** (n - 1))`` scaled by ``0.5 + 0.5 * jitter()`` (between
    half and all of it; ``jitter`` returns a number in [0, 1), random by default, injected by
    tests); after ``max_attempts`` attempts, None: give up. The defaults wait about 5 s, 20 s,
    80 s, 5 min, 21 min, 85 min and 5.7 h: 8 attempts over up to 7.5 hours."""

    max_attempts: int = 8
    base_s: float = 5.0
    factor: float = 4.0
    max_delay_s: float = 6 * 3600.0
    jitter: Callable[[], float] = field(default=random.random, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_s <= 0 or self.factor < 1 or self.max_delay_s < self.base_s:
            raise ValueError("need base_s > 0, factor >= 1 and max_delay_s >= base_s")

    def delay_s(self, attempts: int) -> float:
        step = min(self.max_delay_s, self.base_s * self.factor ** min(max(attempts - 1, 0), 64))
        return step * (0.5 + 0.5 * self.jitter())

    def next_attempt_at(self, now: float, attempts: int) -> float | None:
        """When to make attempt ``attempts + 1``, or None when ``attempts`` were the last."""
        if attempts >= self.max_attempts:
            return None
        return now + self.delay_s(attempts)


class WebhookSender:
    """The background task that delivers the outbox of ``store``.

    ``await start()`` opens an aiohttp session (connector resolving through GuardedResolver) and
    starts the loop; ``wake()`` makes it look for due deliveries now (otherwise every
    ``poll_interval_s``); ``await run_once()`` claims and sends one round (tests call it directly,
    without start's loop, after ``await open()``); ``await stop()`` ends the loop, waiting for the
    round in progress up to ``timeout_s``, and closes the session (a delivery cut short is sent again
    when its lease ends). ``clock`` (Unix seconds) decides what is due and the timestamps;
    ``stats`` counts delivered, retried (failed attempts with another to come), given_up and refused
    deliveries."""

    def __init__(self, store: JobStore, secret: str, *, allow_private: bool = False, timeout_s: float = 10.0,
                 backoff: Backoff | None = None, batch_size: int = 32, poll_interval_s: float = 1.0,
                 lease_s: float | None = None, clock: Callable[[], float] = time.time,
                 resolver: AbstractResolver | None = None) -> None:
        secret_bytes(secret)
        self.store = store
        self._secret = secret
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        self.backoff = backoff or Backoff()
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        # Longer than an attempt can take, so a delivery is not claimed twice while in flight.
        self.lease_s = lease_s if lease_s is not None else timeout_s + 30.0
        self.clock = clock
        self._resolver = resolver
        self.stats = {"delivered": 0, "retried": 0, "given_up": 0, "refused": 0}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    @classmethod
    def from_settings(cls, store: JobStore, settings: Any, **options: Any) -> "WebhookSender | None":
        """The sender the gateway's settings describe (WEBHOOK_SECRET or its file, WEBHOOK_ALLOW_PRIVATE,
        WEBHOOK_TIMEOUT_S, WEBHOOK_MAX_ATTEMPTS); None without a secret (no webhooks then)."""
        secret = configured_webhook_secret(settings)
        if secret is None:
            return None
        options.setdefault("backoff", Backoff(max_attempts=settings.webhook_max_attempts))
        return cls(store, secret, allow_private=settings.webhook_allow_private, timeout_s=settings.webhook_timeout_s,
                   **options)

    async def open(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allow_private, self._resolver),
                                             use_dns_cache=False, limit=max(self.batch_size, 1))
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                                  headers={"User-Agent": "imagegen-webhooks"})

    async def start(self) -> None:
        await self.open()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.timeout_s + 1.0)
            except asyncio.TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                sent = await self.run_once()
            except JobStoreError as exc:
                log.warning("webhooks: the job store failed (%s); trying again in %gs", exc, self.poll_interval_s)
                sent = 0
            except Exception:
                log.exception("webhooks: a delivery round failed")
                sent = 0
            if sent < self.batch_size and not self._stopping:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
                except asyncio.TimeoutError:
                    pass

    async def run_once(self) -> int:
        """Claim up to batch_size due deliveries and make one attempt at each; how many."""
        if self._session is None:
            raise RuntimeError("WebhookSender.open() or start() first")
        due = await asyncio.to_thread(self.store.claim_due, self.clock(), self.batch_size, self.lease_s)
        await asyncio.gather(*(self._attempt(delivery) for delivery in due))
        return len(due)

    async def _attempt(self, delivery: Delivery) -> None:
        attempts = delivery.attempts + 1
        body = payload(delivery)
        headers = signed_headers(self._secret, delivery.id, int(self.clock()), body)
        outcome = "refused"
        try:
            check_webhook_url(delivery.url, self.allow_private)
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            assert self._session is not None
            async with self._session.post(delivery.url, data=body, headers=headers, timeout=timeout,
                                          allow_redirects=False) as response:
                await response.content.read(RESPONSE_BYTES_READ)
                outcome = f"HTTP {response.status}"
                delivered = 200 <= response.status < 300
        except WebhookUrlRefused as exc:
            await self._give_up(delivery, "refused", str(exc))
            return
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            refusal = _refusal_in(exc)
            if refusal is not None:
                await self._give_up(delivery, "refused", str(refusal))
                return
            outcome = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            delivered = False
        try:
            if delivered:
                await asyncio.to_thread(self.store.mark_delivered, delivery.id)
                self.stats["delivered"] += 1
                return
            next_attempt_at = self.backoff.next_attempt_at(self.clock(), attempts)
            if next_attempt_at is None:
                await self._give_up(delivery, "given_up", f"{outcome} at attempt {attempts}, the last")
                return
            await asyncio.to_thread(self.store.mark_retry, delivery.id, next_attempt_at, attempts)
            self.stats["retried"] += 1
            log.info("webhook %s for job %s: %s at attempt %d; next in %.1fs", delivery.id, delivery.job_id,
                     outcome, attempts, next_attempt_at - self.clock())
        except JobStoreError as exc:  # the lease ends and the delivery is attempted again
            log.warning("webhook %s: cannot record the attempt's outcome (%s): %s", delivery.id, outcome, exc)

    async def _give_up(self, delivery: Delivery, counter: str, why: str) -> None:
        self.stats[counter] += 1
        log.warning("webhook %s for job %s given up: %s", delivery.id, delivery.job_id, why)
        try:
            await asyncio.to_thread(self.store.mark_given_up, delivery.id)
        except JobStoreError as exc:
            log.warning("webhook %s: cannot record giving up: %s", delivery.id, exc)


if __name__ == "__main__":
    print(generate_secret())
