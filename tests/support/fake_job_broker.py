"""A FAKE of the gateway's broker link for the job API: no ZeroMQ, no broker, scripted reports.

:class:`JobFakeBroker` speaks the interface of gateway.broker_client.BrokerClient the job runner
uses: ``generate(request_id, params, timeout_s, label="", on_event=None, watch=False)``,
``collect(request_id, timeout_s, on_event=None)`` and ``cancel(request_id)``, plus start, close
and stats. Each request it is given becomes a :class:`FakeRequest` whose script the test feeds:
``queued(position)``, ``step(step, steps, attempt)``, ``preview(step, image)`` (each delivered to
``on_event`` as the broker's Queued, Progress and Preview reports), then ``succeed()`` or ``fail(code)``. With ``auto=True`` every request
gets :meth:`FakeRequest.default_script` at once (queued 2, queued 1, steps 0..N, the image).

Like a broker, it keeps requests across the gateway's restarts: ``close()`` (the gateway's broker
link closing) ends every waiting ``generate`` with CancelledError, as the real link does, and the
request stays here; a gateway started again with the same fake ``collect``s it and gets the rest of
its script. A request it never had, or one already answered, makes ``collect`` raise BrokerFailure
``unknown_request`` (the broker "knows nothing of it").
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from gateway.broker_client import BrokerFailure
from imagegen import protocol
from imagegen.protocol import GenerationParams, Result
from tests.support.images import make_png

if hasattr(protocol, "Queued"):
    Queued = protocol.Queued
else:  # until the broker sends queue positions
    @dataclass(frozen=True)
    class Queued:  # type: ignore[no-redef]
        request_id: str
        position: int
        estimated_start_s: float = 0.0

if "attempt" in {f.name for f in dataclasses.fields(protocol.Progress)}:
    Progress = protocol.Progress
else:  # until the broker numbers attempts
    @dataclass(frozen=True)
    class Progress:  # type: ignore[no-redef]
        request_id: str
        step: int
        steps: int
        attempt: int = 1


def queued_report(request_id: str, position: int, estimated_start_s: float = 0.0) -> Any:
    names = {f.name for f in dataclasses.fields(Queued)}
    extra = {name: estimated_start_s for name in names if name.startswith("estimated")}
    return Queued(request_id=request_id, position=position, **extra)


def progress_report(request_id: str, step: int, steps: int, attempt: int = 1, paused: bool = False) -> Any:
    return Progress(request_id=request_id, step=step, steps=steps, attempt=attempt, paused=paused)


RESULT = dict(worker_name="fake-worker-1", host="fake-host", gpu_id=1, batch_id="fake-worker-1:7", batch_size=3,
              queue_wait_ms=40.0, generation_ms=250.0, model="fake:model")


@dataclass(eq=False)
class FakeRequest:
    request_id: str
    params: GenerationParams | None
    watch: bool = False
    script: asyncio.Queue = field(default_factory=asyncio.Queue)
    reports: list = field(default_factory=list)  # every report delivered, in order
    answered: bool = False
    cancelled: bool = False

    @property
    def steps(self) -> int:
        return self.params.num_inference_steps if self.params is not None else 4

    def queued(self, position: int, estimated_start_s: float = 0.0) -> "FakeRequest":
        self.script.put_nowait(("report", queued_report(self.request_id, position, estimated_start_s)))
        return self

    def step(self, step: int, steps: int | None = None, attempt: int = 1, paused: bool = False) -> "FakeRequest":
        """A PROGRESS report (``paused``: its row waits at ``step`` while better-priority rows run)."""
        self.script.put_nowait(("report", progress_report(self.request_id, step, steps or self.steps, attempt,
                                                          paused)))
        return self

    def preview(self, step: int, image: bytes, steps: int | None = None) -> "FakeRequest":
        """A PREVIEW report, as the real link hands it over (a PreviewReport with the JPEG as ``image``)."""
        from gateway.broker_client import PreviewReport

        self.script.put_nowait(("report", PreviewReport(self.request_id, step, steps or self.steps, image=image)))
        return self

    def succeed(self, **fields: Any) -> "FakeRequest":
        self.script.put_nowait(("result", fields))
        return self

    def fail(self, code: str = "generation_failed", message: str = "the fake worker failed") -> "FakeRequest":
        self.script.put_nowait(("failure", BrokerFailure(code, message)))
        return self

    def pause(self, gate: asyncio.Event) -> "FakeRequest":
        """Wait for ``gate`` before going on with the script."""
        self.script.put_nowait(("gate", gate))
        return self

    def default_script(self) -> "FakeRequest":
        self.queued(2, 1.5).queued(1, 0.5)
        for step in range(self.steps + 1):
            self.step(step)
        return self.succeed()


@dataclass(frozen=True)
class FakeIdentity:
    gateway_id: str


class JobFakeBroker:
    """See the module docstring. ``auto``: give every request the default script; ``gateway_id``:
    the identity of the gateway this link belongs to (``identity.gateway_id``, as the real link's).
    ``for_gateway(gateway_id)`` is another gateway's link to the same fake broker."""

    def __init__(self, auto: bool = True, gateway_id: str | None = None) -> None:
        self.auto = auto
        self.identity = FakeIdentity(gateway_id) if gateway_id is not None else None
        self.requests: dict[str, FakeRequest] = {}
        self.order: list[str] = []        # request ids, in the order generate got them
        self.rankings: dict[str, dict] = {}  # request id -> its priority, owner and share
        self.collected: list[str] = []    # request ids collect was asked for
        self.cancelled: list[str] = []    # request ids cancel was sent for
        self.labels: list[str] = []
        self.result_fields = dict(RESULT)
        self._closed = asyncio.Event()
        self._arrived = asyncio.Event()

    def for_gateway(self, gateway_id: str) -> "JobFakeBroker":
        """A link of another gateway to this broker: the same requests, its own identity and lifecycle."""
        other = JobFakeBroker(self.auto, gateway_id)
        other.requests, other.order, other.collected, other.cancelled = (self.requests, self.order, self.collected,
                                                                         self.cancelled)
        other.labels, other.result_fields, other._arrived = self.labels, self.result_fields, self._arrived
        return other

    async def start(self) -> None:
        self._closed = asyncio.Event()

    async def close(self) -> None:
        self._closed.set()

    async def stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        return {"num_gpus": 1, "workers": [{"name": "fake-worker-1"}]}

    def request(self, index: int) -> FakeRequest:
        return self.requests[self.order[index]]

    async def wait_for_requests(self, count: int) -> None:
        while len(self.order) < count:
            self._arrived.clear()
            await self._arrived.wait()

    async def generate(self, request_id: str, params: GenerationParams, timeout_s: float, label: str = "",
                       on_event: Callable[[Any], None] | None = None, watch: bool = False,
                       cancel_on_exit: bool = True, **ranking: Any) -> tuple[Result, bytes]:
        request = FakeRequest(request_id, params, watch)
        self.rankings[request_id] = ranking  # priority, owner, share (BrokerClient.generate)
        self.requests[request_id] = request
        self.order.append(request_id)
        self.labels.append(label)
        self._arrived.set()
        if self.auto:
            request.default_script()
        return await self._serve(request, on_event)

    async def collect(self, request_id: str, timeout_s: float,
                      on_event: Callable[[Any], None] | None = None) -> tuple[Result, bytes]:
        self.collected.append(request_id)
        request = self.requests.get(request_id)
        if request is None or request.answered:
            raise BrokerFailure("unknown_request", f"the broker knows nothing of request {request_id}")
        return await self._serve(request, on_event)

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        request = self.requests.get(request_id)
        if request is not None and not request.answered:
            request.cancelled = True
            request.script.put_nowait(("failure", BrokerFailure("cancelled", "cancelled by the client")))

    async def _unless_closed(self, awaitable: Any) -> Any:
        """``awaitable``'s value; CancelledError if the link closes first (the request stays here)."""
        waiting = asyncio.ensure_future(awaitable)
        closing = asyncio.ensure_future(self._closed.wait())
        try:
            done, _ = await asyncio.wait({waiting, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if waiting in done:
            return waiting.result()
        waiting.cancel()
        raise asyncio.CancelledError()

    async def _next(self, request: FakeRequest) -> tuple[str, Any]:
        return await self._unless_closed(request.script.get())

    async def _serve(self, request: FakeRequest, on_event: Callable[[Any], None] | None) -> tuple[Result, bytes]:
        while True:
            kind, item = await self._next(request)
            if kind == "report":
                request.reports.append(item)
                if on_event is not None:
                    on_event(item)
            elif kind == "gate":
                await self._unless_closed(item.wait())
            elif kind == "failure":
                request.answered = True
                raise item
            else:
                request.answered = True
                params = request.params
                width, height = (params.width, params.height) if params is not None else (64, 64)
                seed = params.seed if params is not None else 1
                fields = {**self.result_fields, **item}
                result = Result(request_id=request.request_id, width=width, height=height, seed=seed, **fields)
                return result, make_png(width, height, (40, 90, 160))
