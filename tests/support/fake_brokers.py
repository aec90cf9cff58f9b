"""Fakes of the gateway's broker link (gateway.broker_client.BrokerClient): the interface the app
uses (async start/close/generate/stats) with no broker behind it, so the HTTP layer can be tested in
one process. Three, for what they are used to test:

* :class:`RecordingFakeBroker` records every call and fails on demand (a BrokerFailure, a timeout,
  a PNG of the wrong size or no PNG at all): most gateway tests;
* :class:`ScriptedFakeBroker` answers with scripted Result fields, in order, and can hold its
  answers: what the gateway counts (GET /metrics) and logs;
* :class:`WireCheckingFakeBroker` passes each request through the wire protocol as the real link
  and the broker would, and answers with the smallest valid PNG: fuzzing.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from typing import Any

from gateway.broker_client import BrokerFailure
from gateway.images import PNG_SIGNATURE
from imagegen import protocol
from imagegen.protocol import CLIENT_LINK, Generate, GenerationParams, Result
from tests.support.images import make_png


class RecordingFakeBroker:
    """A FAKE standing in for the gateway's broker link over ZeroMQ (gateway.broker_client.BrokerClient)
    that records every call and fails on demand: the fake most gateway tests use.

    It speaks the same Python interface the app uses (async start/close/generate/stats) but talks to
    no broker: `generate` draws a real PNG of the requested size with PIL and returns it with a
    made-up Result. The real ZeroMQ link and the broker are tested elsewhere; this exists only to
    test the HTTP layer. Configure it per test:

    * ``failure``: a BrokerFailure to raise from generate, or ``"timeout"`` for asyncio.TimeoutError;
    * ``wrong_size``: return a PNG 8 pixels wider than asked; ``garbage``: return bytes that are no PNG;
    * ``stats_document`` / ``stats_timeout``: what stats returns, or make it time out.

    Every call is recorded: ``calls`` holds (request_id, GenerationParams, timeout_s) per generate,
    ``stats_calls`` the timeout of each stats query.
    """

    RESULT = dict(worker_name="fake-worker-3", host="fake-host", gpu_id=3, batch_id="batch-42",
                  batch_size=4, queue_wait_ms=12.345, generation_ms=678.912)

    def __init__(self) -> None:
        self.failure: BrokerFailure | str | None = None
        self.wrong_size = False
        self.garbage = False
        self.stats_document: dict[str, Any] = {"num_gpus": 2, "queue_depth": 0, "workers": [{"name": "w0"}]}
        self.stats_timeout = False
        self.calls: list[tuple[str, GenerationParams, float]] = []
        self.labels: list[str] = []  # each call's label (its client's X-Request-ID)
        self.rankings: list[dict[str, Any]] = []  # each call's priority, owner and share
        self.stats_calls: list[float] = []
        self.started = False
        self.closed = False

    @property
    def params(self) -> list[GenerationParams]:
        return [params for _, params, _ in self.calls]

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def generate(self, request_id: str, params: GenerationParams, timeout_s: float,
                       label: str = "", **ranking: Any) -> tuple[Result, bytes]:
        self.calls.append((request_id, params, timeout_s))
        self.labels.append(label)
        self.rankings.append(ranking)  # priority, owner, share (BrokerClient.generate)
        if self.failure == "timeout":
            raise asyncio.TimeoutError()
        if isinstance(self.failure, BrokerFailure):
            raise self.failure
        if self.garbage:
            png = b"this is not a png at all, not even close"
        else:
            png = make_png(params.width + (8 if self.wrong_size else 0), params.height)
        result = Result(request_id=request_id, width=params.width, height=params.height, seed=params.seed,
                        **self.RESULT)
        return result, png

    async def stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        self.stats_calls.append(timeout_s)
        if self.stats_timeout:
            raise asyncio.TimeoutError()
        return self.stats_document


class ScriptedFakeBroker:
    """A FAKE broker link (the app's interface of gateway.broker_client.BrokerClient, nothing behind it)
    that answers with scripted Result fields, in order, and can hold its answers: for tests of what
    the gateway counts (GET /metrics) and logs.

    ``results`` are the Result fields to answer the next generate calls with, in order (then
    ``default``); ``failure`` raises a BrokerFailure instead; ``hold`` makes generate wait until
    released; ``stats_document`` is what stats returns, ``None`` makes it time out."""

    def __init__(self) -> None:
        self.default = dict(worker_name="w0", host="host-a", gpu_id=0, batch_id="w0:1", batch_size=1,
                            queue_wait_ms=50.0, generation_ms=300.0)
        self.results: list[dict[str, Any]] = []
        self.failure: BrokerFailure | None = None
        self.hold: asyncio.Event | None = None
        self.stats_document: dict[str, Any] | None = {"num_gpus": 0, "broker": {}}
        self.request_ids: list[str] = []
        self.labels: list[str] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def generate(self, request_id: str, params: GenerationParams, timeout_s: float,
                       label: str = "", **ranking: Any) -> tuple[Result, bytes]:
        self.request_ids.append(request_id)
        self.labels.append(label)
        if self.hold is not None:
            await self.hold.wait()
        if self.failure is not None:
            raise self.failure
        fields = self.results.pop(0) if self.results else self.default
        result = Result(request_id=request_id, width=params.width, height=params.height, seed=params.seed, **fields)
        return result, make_png(params.width, params.height, (10, 20, 30))

    async def stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        if self.stats_document is None:
            raise asyncio.TimeoutError()
        return self.stats_document


def tiny_png(width: int, height: int) -> bytes:
    """Signature + IHDR + IEND: enough for png_size(), cheap enough to make thousands of times."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


class WireCheckingFakeBroker:
    """A FAKE standing in for the broker link (gateway.broker_client.BrokerClient); no ZeroMQ. It checks
    that every request it is given survives the wire protocol, and answers cheaply: for fuzzing.

    ``generate`` encodes the request exactly as the real link does (protocol.encode, which raises
    on what msgpack cannot carry) and decodes it back as the broker would (protocol.decode): a
    request the gateway accepted but the broker would drop as malformed is recorded in
    ``wire_errors`` and fails the test. It answers with a made-up Result and ``tiny_png``."""

    def __init__(self) -> None:
        self.calls = 0
        self.wire_errors: list[str] = []
        self.stats_document = {"num_gpus": 1, "queue_depth": 0}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def generate(self, request_id: str, params: GenerationParams, timeout_s: float,
                       label: str = "", **ranking: Any) -> tuple[Result, bytes]:
        self.calls += 1
        try:
            frames = protocol.encode(CLIENT_LINK, Generate(request_id, params, timeout_s))
            decoded, _ = protocol.decode(frames, CLIENT_LINK)
            assert decoded.params == params, (decoded.params, params)
        except Exception as exc:
            self.wire_errors.append(f"{type(exc).__name__}: {exc} for {params!r}")
            raise
        result = Result(request_id=request_id, worker_name="fake-worker", host="fake-host", gpu_id=0,
                        batch_id="fake-batch", batch_size=1, queue_wait_ms=1.25, generation_ms=2.5,
                        width=params.width, height=params.height, seed=params.seed)
        return result, tiny_png(params.width, params.height)

    async def stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        return self.stats_document
