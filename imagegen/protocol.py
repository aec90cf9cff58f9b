"""The wire protocol spoken between gateway, broker and GPU workers.

Every message is a list of ZeroMQ frames (the ROUTER side sees the peer's routing id first):

    frame 0   link tag + protocol version: ``IGW1`` (worker <-> broker) or ``IGC1`` (gateway <-> broker)
    frame 1   command, one byte (:class:`Command`)
    frame 2   header: a msgpack map, at most :data:`MAX_HEADER_BYTES` (STATS_REPLY: :data:`MAX_STATS_HEADER_BYTES`)
    frame 3.. payload frames, raw bytes (PNG images); never inside msgpack, never pickled

Who gets what on the client link: a request's RESULT or FAILURE, and its PROGRESS and QUEUED
reports, go to the gateway connection that sent its GENERATE, or the one that sent a COLLECT for
it since (the latest wins). Each gateway connects with a lasting routing id (GATEWAY_ID), so a
restarted gateway gets its connection back. A RESULT or FAILURE the broker cannot deliver (the
gateway is not connected, or has sent nothing, ping included, for a few seconds) is kept, bounded,
for a later COLLECT (BROKER_UNCLAIMED_RESULTS, docs/architecture.md "Results a gateway did not
take"). CANCEL and COLLECT are honoured from any gateway: request ids are service-made and
unguessable.

Each command has one typed message class (a frozen dataclass). :func:`encode` turns a message
into frames; :func:`decode` turns frames back into a message, validating the tag, the command,
the header's size, every field's type and bounds, and the payload frame count. Anything that
fails raises :class:`ProtocolError`: the receiver drops the message, counts it and carries on.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence, Union

import msgpack

from imagegen.bounds import WIRE

PROTOCOL_VERSION = 1
WORKER_LINK = b"IGW%d" % PROTOCOL_VERSION
CLIENT_LINK = b"IGC%d" % PROTOCOL_VERSION

MAX_HEADER_BYTES = 256 * 1024
MAX_PAYLOAD_FRAMES = 1
# Per-frame cap applied with ZMQ_MAXMSGSIZE on the broker's sockets: a PNG of the largest allowed
# image (2048 x 2048 RGB, incompressible) is about 12 MiB.
MAX_FRAME_BYTES = 16 * 1024 * 1024
# The /stats document grows by about 300 bytes per worker, so past ~870 workers it outgrows
# MAX_HEADER_BYTES (then /stats and /readyz failed): STATS_REPLY alone may use a whole frame.
MAX_STATS_HEADER_BYTES = MAX_FRAME_BYTES
# A request's bounds (prompt, sides, steps, guidance, seed) are imagegen/bounds.py's WIRE table.
MAX_PROMPT_CHARS = WIRE.prompt_chars
MAX_ID_CHARS = 128
# A client's own name for its request (its X-Request-ID), carried beside the service-made request id
# so that one grep finds the request in every service's log; never used to route anything.
MAX_LABEL_CHARS = 64
MAX_SEED = WIRE.seed.high
MAX_DEADLINE_S = 86_400.0  # a day: the longest a request may wait (the gateway's REQUEST_TIMEOUT_S)
# Bounds of what a worker registers with; its settings are checked against them at start
# (gpu_worker/config.py), as a registration beyond them is dropped as malformed.
MAX_BATCH_IMAGES = 4096  # MAX_BATCH_SIZE, MIN_BATCH_SIZE
MAX_BATCH_WAIT_S = 3600.0  # MAX_BATCH_WAIT_TIME, MIN_BATCH_WAIT_TIME
MAX_ADAPTIVE_THRESHOLD = 1_000_000  # ADAPTIVE_BATCH_THRESHOLD
MAX_CAPACITY = 100_000  # WORKER_MAX_IN_FLIGHT
MAX_GPU_ID = 4096  # GPU_ID (-1: a CPU worker)
MAX_HOST_CHARS = 255  # WORKER_HOST
MAX_MODEL_ID_CHARS = 1024  # MODEL_ID
MAX_SIZES = 64  # image sizes a worker lists (SIZES) or reports warm
SIZE_STATES = ("off", "warming", "warm")  # WorkerStatus.compile_state
UNLISTED_SIZE_RULES = ("eager", "refuse", "snap")  # Register.unlisted_size (the worker's UNLISTED_SIZE)
HEARTBEAT_INTERVAL_RANGE_S = (0.01, 3600.0)  # the broker's HEARTBEAT_INTERVAL_S, sent in every Welcome
MAX_ATTEMPTS = 1000  # the broker's MAX_REQUEST_ATTEMPTS: a request's attempt number (Progress.attempt)
# Generate.priority, most urgent first; a value outside it (a peer of a newer build) counts as "normal".
PRIORITIES = ("high", "normal", "low")
DEFAULT_PRIORITY = "normal"
# Generate.share: an API key's weight in the broker's fair share between keys (its share= option).
DEFAULT_SHARE = 1.0
MIN_SHARE = 0.01
MAX_SHARE = 1000.0


def priority_rank(priority: str) -> int:
    """0 for "high", 1 for "normal", 2 for "low"; an unknown value ranks as "normal"."""
    try:
        return PRIORITIES.index(priority)
    except ValueError:
        return PRIORITIES.index(DEFAULT_PRIORITY)


class ProtocolError(ValueError):
    """A message that does not follow this protocol; the receiver drops it and counts it."""


class Command(bytes, enum.Enum):
    """One byte naming what a message is. Values are stable: never renumber, only add."""

    # worker link (IGW)
    REGISTER = b"\x01"  # W->B: I exist, this is what I can do
    WELCOME = b"\x02"  # B->W: you are registered (answers REGISTER)
    GENERATE = b"\x03"  # B->W: generate one image; also G->B on the client link
    RESULT = b"\x04"  # W->B and B->G: one generated image (payload: PNG bytes)
    FAILURE = b"\x05"  # W->B and B->G: a request that ended without an image
    HEARTBEAT = b"\x06"  # W->B: I am alive; my queue and counters
    DISCONNECT = b"\x07"  # both ways: W->B "I am leaving"; B->W "I don't know you, register again"
    BROKER_HEARTBEAT = b"\x08"  # B->W: I am alive (and which broker I am)
    CANCEL = b"\x09"  # G->B, B->W: nobody waits for the request any more; drop it, running or not
    PROGRESS = b"\x0a"  # W->B: a running request reached a denoising step (rate-limited by the worker);
    #                      also B->G on the client link, with the attempt number filled in
    PREVIEW = b"\x0b"  # W->B and B->G: a small image of a running request's latents (payload: JPEG bytes)
    # client link (IGC)
    STATS_QUERY = b"\x11"  # G->B
    STATS_REPLY = b"\x12"  # B->G
    PING = b"\x13"  # G->B: are you there?
    PONG = b"\x14"  # B->G: yes, and this is my epoch (a new epoch: the broker restarted)
    QUEUED = b"\x15"  # B->G: a watched request waits in the broker's queue at this position
    COLLECT = b"\x16"  # G->B: send me this request's answer (kept, or when it comes) and its reports


def _meta(*, max_len: int | None = None, low: float | None = None, high: float | None = None) -> dict:
    return {"max_len": max_len, "low": low, "high": high}


def bounded(default: Any = dataclasses.MISSING, **bounds: Any) -> Any:
    """A dataclass field whose value decode() checks against bounds (max_len, low, high)."""
    if default is dataclasses.MISSING:
        return field(metadata=_meta(**bounds))
    return field(default=default, metadata=_meta(**bounds))


class Message:
    """Base of every typed message: COMMAND says which command byte carries it."""

    COMMAND: ClassVar[Command]


# ---------------------------------------------------------------------------------------------
# Shared structures


@dataclass(frozen=True)
class GenerationParams:
    """What the user asked for. Requests with equal batch-relevant fields can share one inference."""

    prompt: str = bounded(max_len=MAX_PROMPT_CHARS)
    width: int = bounded(low=WIRE.image_side.low, high=WIRE.image_side.high)
    height: int = bounded(low=WIRE.image_side.low, high=WIRE.image_side.high)
    num_inference_steps: int = bounded(low=WIRE.inference_steps.low, high=WIRE.inference_steps.high)
    guidance_scale: float = bounded(low=WIRE.guidance_scale.low, high=WIRE.guidance_scale.high)
    seed: int = bounded(low=WIRE.seed.low, high=WIRE.seed.high)
    negative_prompt: str | None = bounded(None, max_len=MAX_PROMPT_CHARS)
    # The model to draw with, one a worker registered with (Register.model_id); None: the one model
    # served (broker/models.py route_model()). A broker of an older build ignores it; workers need not read it.
    model: str | None = bounded(None, max_len=MAX_MODEL_ID_CHARS)
    # True: a ``model`` no worker serves counts as none named, so it goes to the one model served
    # when only one is (OpenAI clients send fixed names such as "dall-e-3"); with several, refused.
    model_fallback: bool = False
    # True: send Preview messages (a small image of the latents every few denoising steps) while it
    # runs. Not part of what batch-mates must share (imagegen/batch_key.py): rows with and without
    # previews run in one batch. A peer of an older build ignores it (no previews).
    preview: bool = False


@dataclass(frozen=True, order=True)
class ImageSize:
    """An image size in pixels, width x height (a size a worker serves compiled, or has warm)."""

    width: int = bounded(low=WIRE.image_side.low, high=WIRE.image_side.high)
    height: int = bounded(low=WIRE.image_side.low, high=WIRE.image_side.high)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class BatchingConfig:
    """A worker's batching settings, as the seed names them; reported at registration for /stats."""

    enable_batching: bool
    max_batch_size: int = bounded(low=1, high=MAX_BATCH_IMAGES)
    max_wait_time: float = bounded(low=0.0, high=MAX_BATCH_WAIT_S)
    min_batch_size: int = bounded(low=1, high=MAX_BATCH_IMAGES)
    min_wait_time: float = bounded(low=0.0, high=MAX_BATCH_WAIT_S)
    adaptive_batching: bool
    adaptive_threshold: int = bounded(low=1, high=MAX_ADAPTIVE_THRESHOLD)
    max_batch_size_auto: bool = False


@dataclass(frozen=True)
class WorkerStatus:
    """A worker's own view of its queue and counters (sent in heartbeats, after each batch)."""

    state: str = bounded(max_len=16)  # "ready" | "draining"
    queue_depth: int = bounded(low=0, high=1_000_000)  # accepted, waiting to be batched
    running: int = bounded(low=0, high=1_000_000)  # requests in the batch on the GPU now
    max_queue_depth: int = bounded(low=0, high=1_000_000)
    total_requests: int = bounded(low=0)  # requests completed in batches
    total_batches: int = bounded(low=0)
    total_failed: int = bounded(low=0)
    sum_wait_ms: float = bounded(low=0.0)  # arrival at the worker -> its batch starts, summed
    sum_generation_ms: float = bounded(low=0.0)  # one batch's inference time, summed over batches
    max_batch_size: int = bounded(0, low=0, high=100_000)  # now (lowered after out-of-memory); 0: unknown
    # Batches stopped at a step boundary (gpu_worker/decisions/preemption.py: newer requests joining a lone
    # request's batch, or rows no longer wanted), and the GPU time they had run, summed. Defaults: a worker of an older build sends neither.
    stopped_batches: int = bounded(0, low=0)
    sum_stopped_ms: float = bounded(0.0, low=0.0)
    # torch.compile (gpu_worker/model/warm_up.py): "off" (eager: every size runs alike), "warming" (some
    # listed sizes are warm, others warm in the background) or "warm" (every listed size). A size is
    # warm when it runs compiled at every batch size up to the limit without compiling.
    compile_state: str = bounded("off", max_len=16)
    warm_sizes: tuple[ImageSize, ...] = bounded((), max_len=MAX_SIZES)
    # Batches (and their images) that ran eager because their size was not warm; requests of an
    # unlisted size refused or snapped to a listed one (UNLISTED_SIZE).
    eager_batches: int = bounded(0, low=0)
    eager_images: int = bounded(0, low=0)
    unlisted_refused: int = bounded(0, low=0)
    unlisted_snapped: int = bounded(0, low=0)


# ---------------------------------------------------------------------------------------------
# Worker link


@dataclass(frozen=True)
class Register(Message):
    COMMAND: ClassVar[Command] = Command.REGISTER
    worker_name: str = bounded(max_len=MAX_ID_CHARS)
    host: str = bounded(max_len=MAX_HOST_CHARS)
    gpu_id: int = bounded(low=-1, high=MAX_GPU_ID)  # -1: CPU
    pid: int = bounded(low=0)
    model_id: str = bounded(max_len=MAX_MODEL_ID_CHARS)
    device: str = bounded(max_len=64)
    capacity: int = bounded(low=1, high=MAX_CAPACITY)  # most requests the broker may hand it at once
    batching: BatchingConfig
    protocol_version: int = PROTOCOL_VERSION
    # Seconds one denoising step costs per work unit (gpu_worker.decisions.cost_model.work_units: megapixels x
    # CFG rows), measured at warm-up as the marginal cost of a larger image: for the broker's
    # admission rule before it has seen a result (broker/admission.py). 0: not measured (a worker of
    # an older build, WORKER_WARMUP=0, the fake backend).
    seconds_per_work_unit: float = bounded(0.0, low=0.0, high=1e6)
    # The sizes it lists (SIZES: served compiled with TORCH_COMPILE; sent with compile off too, for
    # UNLISTED_SIZE), those already warm when it registers (later ones come in
    # WorkerStatus.warm_sizes; a compiling worker warms its first size before registering, so listed
    # sizes with none warm mean compile off, until its first heartbeat says), and what it does with a
    # size it does not list (UNLISTED_SIZE: one of UNLISTED_SIZE_RULES). Empty sizes: a worker of an
    # older build; every size runs alike there.
    sizes: tuple[ImageSize, ...] = bounded((), max_len=MAX_SIZES)
    warm_sizes: tuple[ImageSize, ...] = bounded((), max_len=MAX_SIZES)
    unlisted_size: str = bounded("eager", max_len=16)


@dataclass(frozen=True)
class Welcome(Message):
    COMMAND: ClassVar[Command] = Command.WELCOME
    broker_epoch: str = bounded(max_len=64)  # changes whenever the broker restarts
    heartbeat_interval_s: float = bounded(low=HEARTBEAT_INTERVAL_RANGE_S[0], high=HEARTBEAT_INTERVAL_RANGE_S[1])


@dataclass(frozen=True)
class Heartbeat(Message):
    COMMAND: ClassVar[Command] = Command.HEARTBEAT
    status: WorkerStatus


@dataclass(frozen=True)
class Disconnect(Message):
    COMMAND: ClassVar[Command] = Command.DISCONNECT
    reason: str = bounded(max_len=1024)


@dataclass(frozen=True)
class Generate(Message):
    """A request to generate one image: gateway -> broker, then broker -> worker."""

    COMMAND: ClassVar[Command] = Command.GENERATE
    request_id: str = bounded(max_len=MAX_ID_CHARS)  # made by the gateway, never taken from a client
    params: GenerationParams
    deadline_s: float = bounded(low=0.0, high=MAX_DEADLINE_S)  # seconds the client waits; the broker counts from receipt
    label: str = bounded("", max_len=MAX_LABEL_CHARS)  # the client's X-Request-ID, for logs only; "" if none
    # True: the broker sends the client QUEUED reports while the request waits in its queue (jobs);
    # False (/generate): only PROGRESS, which every request gets once a worker runs it.
    watch: bool = False
    # How urgent (one of PRIORITIES): the broker's queue and the worker's admission serve higher ones
    # first, with aging so that lower ones still run. The gateway caps it by the API key's allowance.
    priority: str = bounded(DEFAULT_PRIORITY, max_len=8)
    # Who the GPU time is charged to, for fair shares between API keys: the gateway's id of the key
    # ("key-" + 16 hex of its SHA-256, as the job store's owner), "" without API keys. Made by the
    # gateway, never taken from a client.
    owner: str = bounded("", max_len=MAX_ID_CHARS)
    # The owner's weight in the broker's fair share (broker/priorities.py): its key's share= (1 by
    # default, and without API keys). A peer of an older build leaves it out: 1.
    share: float = bounded(DEFAULT_SHARE, low=MIN_SHARE, high=MAX_SHARE)


@dataclass(frozen=True)
class Result(Message):
    """One generated image (payload frame: PNG bytes) and how it was made."""

    COMMAND: ClassVar[Command] = Command.RESULT
    request_id: str = bounded(max_len=MAX_ID_CHARS)
    worker_name: str = bounded(max_len=MAX_ID_CHARS)
    host: str = bounded(max_len=MAX_HOST_CHARS)
    gpu_id: int = bounded(low=-1, high=MAX_GPU_ID)
    batch_id: str = bounded(max_len=2 * MAX_ID_CHARS)
    batch_size: int = bounded(low=1, high=100_000)
    # Worker fills in its own wait (arrival -> batch start); the broker adds its queue time.
    queue_wait_ms: float = bounded(low=0.0)
    generation_ms: float = bounded(low=0.0)
    width: int = bounded(low=1, high=WIRE.image_side.high)
    height: int = bounded(low=1, high=WIRE.image_side.high)
    seed: int = bounded(low=WIRE.seed.low, high=WIRE.seed.high)
    # The model of the worker that made it, filled in by the broker on the way to the gateway ("": a
    # broker of an older build).
    model: str = bounded("", max_len=MAX_MODEL_ID_CHARS)


class FailureCode(str, enum.Enum):
    OVERLOADED = "overloaded"  # broker queue full: retry later (HTTP 503)
    INVALID_REQUEST = "invalid_request"  # the pipeline rejected the inputs (HTTP 400)
    GENERATION_FAILED = "generation_failed"  # inference raised (HTTP 500)
    WORKER_LOST = "worker_lost"  # the worker holding it went away too often (HTTP 503)
    DEADLINE_EXCEEDED = "deadline_exceeded"  # waited past the client's deadline (HTTP 504)
    SHUTTING_DOWN = "shutting_down"  # the broker is draining for a restart (HTTP 503)
    BROKER_RESTARTED = "broker_restarted"  # lost in a broker restart even after one resend (HTTP 503)
    TOO_COSTLY = "too_costly"  # could not finish within its deadline even alone on the fastest worker (HTTP 400)
    UNKNOWN_MODEL = "unknown_model"  # names a model no registered worker serves; lists those served (HTTP 400)
    MODEL_REQUIRED = "model_required"  # names no model while several are served; the message lists them (HTTP 400)
    SIZE_NOT_SERVED = "size_not_served"  # a size the worker does not list, with UNLISTED_SIZE=refuse; lists them (HTTP 400)
    # A COLLECT for an id the broker holds nothing for: answered and taken already, its kept answer
    # expired or was dropped (BROKER_UNCLAIMED_RESULT_TTL_S), or the broker restarted since (HTTP 503)
    UNKNOWN_REQUEST = "unknown_request"


@dataclass(frozen=True)
class Failure(Message):
    COMMAND: ClassVar[Command] = Command.FAILURE
    request_id: str = bounded(max_len=MAX_ID_CHARS)
    code: str = bounded(max_len=64)  # a FailureCode value
    message: str = bounded(max_len=4096)
    retry_after_s: float = bounded(0.0, low=0.0, high=MAX_DEADLINE_S)  # when a retry may succeed; 0: unknown


@dataclass(frozen=True)
class BrokerHeartbeat(Message):
    COMMAND: ClassVar[Command] = Command.BROKER_HEARTBEAT
    broker_epoch: str = bounded(max_len=64)


@dataclass(frozen=True)
class Cancel(Message):
    """The client stopped waiting: drop the request wherever it still waits (best effort)."""

    COMMAND: ClassVar[Command] = Command.CANCEL
    request_id: str = bounded(max_len=MAX_ID_CHARS)


@dataclass(frozen=True)
class Progress(Message):
    """A running request reached denoising step ``step`` of ``steps`` (0: its batch started).

    One message per running request, rate-limited by the worker (at most one every 0.5 s); the
    broker's progress deadline (a worker holding requests that sends no progress, result or
    failure for too long is declared stuck) is built on it, and the broker forwards each one to the
    request's client, filling in ``attempt`` (1 for the first worker to run it; a request taken
    back from a worker that died or left runs again from step 0 under the next number) and
    ``worker_name``; a worker leaves both at their defaults. ``batch_size``: the rows of the batch
    it runs in, from the worker (0: not said, a worker of an older build). A batch stopped at a step
    boundary and run again on the same worker (preemption) starts again from step 0 under the same
    attempt number. ``paused``: the request's row waits at ``step``, its latents kept, while rows of a
    better priority take the GPU (BATCH_POLICY=step); the next PROGRESS without it says it runs again."""

    COMMAND: ClassVar[Command] = Command.PROGRESS
    request_id: str = bounded(max_len=MAX_ID_CHARS)
    step: int = bounded(low=0, high=WIRE.inference_steps.high)
    steps: int = bounded(low=WIRE.inference_steps.low, high=WIRE.inference_steps.high)
    attempt: int = bounded(1, low=1, high=MAX_ATTEMPTS)
    worker_name: str = bounded("", max_len=MAX_ID_CHARS)
    batch_size: int = bounded(0, low=0, high=MAX_BATCH_IMAGES)
    paused: bool = False


@dataclass(frozen=True)
class Preview(Message):
    """A small image of a running request's latents after ``step`` of ``steps`` denoising steps
    (payload frame: a JPEG at 1/8 of the image's side), for a request with ``GenerationParams.preview``.

    An approximation of the latents through a fixed linear latent-to-RGB map, not a decode of the
    image (gpu_worker/model/previews.py); sent every PREVIEW_EVERY_STEPS steps (the worker's
    setting), never for the last step, and only for rows still wanted. The broker forwards it, its
    payload frame untouched, to the request's client like PROGRESS (dropped when that gateway cannot
    take it: a report, not an answer)."""

    COMMAND: ClassVar[Command] = Command.PREVIEW
    request_id: str = bounded(max_len=MAX_ID_CHARS)
    step: int = bounded(low=1, high=WIRE.inference_steps.high)
    steps: int = bounded(low=WIRE.inference_steps.low, high=WIRE.inference_steps.high)


# ---------------------------------------------------------------------------------------------
# Client link


@dataclass(frozen=True)
class Ping(Message):
    COMMAND: ClassVar[Command] = Command.PING
    query_id: str = bounded(max_len=MAX_ID_CHARS)


@dataclass(frozen=True)
class Pong(Message):
    COMMAND: ClassVar[Command] = Command.PONG
    query_id: str = bounded(max_len=MAX_ID_CHARS)
    broker_epoch: str = bounded(max_len=64)
    workers: int = bounded(low=0)  # workers registered and accepting work


@dataclass(frozen=True)
class Queued(Message):
    """Where a watched request (``Generate.watch``, or one collected) waits: ``position`` 1 goes
    next among the ``waiting`` requests of its model in the broker's queue; 0: a worker holds it and
    its batch has not started (PROGRESS follows). Sent when it is queued, then when its position
    changes, at most once a second.

    ``ahead_units``: work units (megapixels x steps x CFG rows) the model's workers must get through
    before it starts: the unfinished part of what they hold plus the requests queued before it.
    ``estimated_start_s``: that work x the fastest worker's seconds per work unit (what the
    broker's admission uses, broker/admission.py, without its discount) / the model's accepting
    workers; None until a worker has measured its speed. A rough figure: batching, and requests of
    other sizes joining batches, move it."""

    COMMAND: ClassVar[Command] = Command.QUEUED
    request_id: str = bounded(max_len=MAX_ID_CHARS)
    position: int = bounded(low=0)
    waiting: int = bounded(0, low=0)
    ahead_units: float = bounded(0.0, low=0.0)
    estimated_start_s: float | None = bounded(None, low=0.0, high=MAX_DEADLINE_S)


@dataclass(frozen=True)
class Collect(Message):
    """Any gateway asks for a request by id. The broker answers at once with a kept RESULT or
    FAILURE (and forgets it); for a request still queued or running, the asker becomes its client
    (its answer, PROGRESS and QUEUED reports go there from now on) and gets a QUEUED or the latest
    PROGRESS now; for an id it knows nothing of, FAILURE ``unknown_request``."""

    COMMAND: ClassVar[Command] = Command.COLLECT
    request_id: str = bounded(max_len=MAX_ID_CHARS)


@dataclass(frozen=True)
class StatsQuery(Message):
    COMMAND: ClassVar[Command] = Command.STATS_QUERY
    query_id: str = bounded(max_len=MAX_ID_CHARS)


@dataclass(frozen=True)
class StatsReply(Message):
    COMMAND: ClassVar[Command] = Command.STATS_REPLY
    query_id: str = bounded(max_len=MAX_ID_CHARS)
    stats: dict  # the /stats JSON document, built by the broker


_WORKER_LINK_COMMANDS = {Register, Welcome, Heartbeat, Disconnect, Generate, Result, Failure, BrokerHeartbeat, Cancel,
                         Progress, Preview}
_CLIENT_LINK_COMMANDS = {Generate, Result, Failure, StatsQuery, StatsReply, Cancel, Ping, Pong, Progress, Queued,
                         Collect, Preview}
MESSAGE_TYPES: dict[bytes, dict[Command, type[Message]]] = {
    WORKER_LINK: {cls.COMMAND: cls for cls in _WORKER_LINK_COMMANDS},
    CLIENT_LINK: {cls.COMMAND: cls for cls in _CLIENT_LINK_COMMANDS},
}
_PAYLOAD_COMMANDS = {Command.RESULT, Command.PREVIEW}


# ---------------------------------------------------------------------------------------------
# Encoding and decoding


def encode(link: bytes, message: Message, payload: Sequence[bytes] = ()) -> list[bytes]:
    """Frames for one message on ``link`` (WORKER_LINK or CLIENT_LINK), payload frames last."""
    if type(message) not in MESSAGE_TYPES[link].values():
        raise ValueError(f"{type(message).__name__} is not spoken on link {link!r}")
    header = msgpack.packb(dataclasses.asdict(message), use_bin_type=True)
    return [link, message.COMMAND.value, header, *payload]


def refusal(link: bytes, message: Message) -> str | None:
    """Why the other end of ``link`` would drop ``message`` as malformed (a value out of its
    bounds), or None: for checking at start what a process will send, rather than be ignored."""
    try:
        decode(encode(link, message), link)
    except ProtocolError as exc:
        return str(exc)
    return None


def decode(frames: Sequence[Any], link: bytes) -> tuple[Message, list[Any]]:
    """Parse and validate frames received on ``link``; returns the message and its payload frames."""
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames, got {len(frames)}")
    tag, command_byte, header = bytes(frames[0]), bytes(frames[1]), bytes(frames[2])
    if tag != link:
        raise ProtocolError(f"unexpected link tag {tag[:8]!r} (expected {link!r}): version mismatch?")
    try:
        cls = MESSAGE_TYPES[link][Command(command_byte)]
    except (ValueError, KeyError):
        raise ProtocolError(f"unknown command {command_byte[:4]!r} on link {link!r}") from None
    payload = list(frames[3:])  # kept as received (zmq.Frame or bytes): forwarded without a copy
    expected_payload = MAX_PAYLOAD_FRAMES if cls.COMMAND in _PAYLOAD_COMMANDS else 0
    if len(payload) != expected_payload:
        raise ProtocolError(f"{cls.__name__} carries {expected_payload} payload frame(s), got {len(payload)}")
    max_bytes = MAX_STATS_HEADER_BYTES if cls.COMMAND is Command.STATS_REPLY else MAX_HEADER_BYTES
    return from_header(cls, unpack_header(header, max_bytes)), payload


def request_id_of_refused(frames: Sequence[Any], link: bytes) -> str | None:
    """The request id of a GENERATE that ``decode`` refused, if it has a readable one; else None.

    So the receiver can answer it with a Failure instead of leaving its client waiting for its
    deadline (a sender of another build with other bounds, or a sender's bug)."""
    if len(frames) < 3 or bytes(frames[0]) != link or bytes(frames[1]) != Command.GENERATE.value:
        return None
    try:
        request_id = unpack_header(bytes(frames[2])).get("request_id")
    except ProtocolError:
        return None
    if isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_CHARS:
        return request_id
    return None


def failure_for_refused(frames: Sequence[Any], link: bytes, reader: str, error: ProtocolError) -> Failure | None:
    """The answer to a GENERATE that ``decode`` refused (see request_id_of_refused), naming ``reader``
    ("broker", "worker") and what was wrong; None when it has no readable id to answer."""
    request_id = request_id_of_refused(frames, link)
    if request_id is None:
        return None
    text = f"the {reader} could not read this request: {error}"
    return Failure(request_id, FailureCode.GENERATION_FAILED.value, text[:4000])


def unpack_header(header: bytes, max_bytes: int = MAX_HEADER_BYTES) -> dict:
    """Unpack a msgpack header safely: size-capped, string keys, no extension types."""
    if len(header) > max_bytes:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {max_bytes}")
    try:
        # msgpack bounds every container length by len(header), so a tiny "array of 2**32" bomb fails fast.
        value = msgpack.unpackb(bytes(header), raw=False, strict_map_key=True, use_list=False, ext_hook=_reject_ext)
    except Exception as exc:  # msgpack raises several unrelated types (ValueError, StackError, ExtraData...)
        raise ProtocolError(f"undecodable header: {type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"header must be a map, got {type(value).__name__}")
    return value


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def from_header(cls: type, header: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a decoded map, checking every field; unknown keys are ignored."""
    if not isinstance(header, dict):
        raise ProtocolError(f"{path or cls.__name__}: expected a map, got {type(header).__name__}")
    hints = _type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        where = f"{path}.{f.name}" if path else f.name
        if f.name not in header:
            if f.default is dataclasses.MISSING:
                raise ProtocolError(f"{where}: missing")
            continue
        values[f.name] = _check(header[f.name], hints[f.name], f.metadata, where)
    return cls(**values)


_type_hints = functools.cache(typing.get_type_hints)


def _check(value: Any, hint: Any, meta: typing.Mapping, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _check(value, inner, meta, where)
    if dataclasses.is_dataclass(hint):
        return from_header(hint, value, where)
    if origin is tuple:  # tuple[X, ...]: a sequence of at most max_len items, each checked as X
        if not isinstance(value, (tuple, list)):
            raise ProtocolError(f"{where}: expected an array")
        if meta.get("max_len") is not None and len(value) > meta["max_len"]:
            raise ProtocolError(f"{where}: more than {meta['max_len']} items")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(_check(item, item_hint, {}, f"{where}[{index}]") for index, item in enumerate(value))
    if hint is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        return _thaw(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where}: expected a boolean")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{where}: expected an integer")
        return _check_range(value, meta, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProtocolError(f"{where}: expected a finite number")
        return _check_range(float(value), meta, where)
    if hint is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{where}: expected a string")
        if meta.get("max_len") is not None and len(value) > meta["max_len"]:
            raise ProtocolError(f"{where}: longer than {meta['max_len']} characters")
        return value
    raise TypeError(f"protocol field {where} has unsupported type {hint!r}")  # a bug in this module


def _check_range(value: float, meta: typing.Mapping, where: str) -> Any:
    if meta.get("low") is not None and value < meta["low"]:
        raise ProtocolError(f"{where}: {value} is below {meta['low']}")
    if meta.get("high") is not None and value > meta["high"]:
        raise ProtocolError(f"{where}: {value} is above {meta['high']}")
    return value


# Nesting _thaw accepts inside a free-form map (the /stats document is 3 deep). msgpack accepts
# ~1000 levels, which would overflow Python's recursion limit here: refuse them as malformed.
MAX_NESTING = 32


def _thaw(value: Any, depth: int = 0) -> Any:
    """Turn the tuples that unpack_header produces back into lists (for JSON documents)."""
    if depth > MAX_NESTING and isinstance(value, (dict, tuple)):
        raise ProtocolError(f"value nested deeper than {MAX_NESTING} levels")
    if isinstance(value, dict):
        return {k: _thaw(v, depth + 1) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v, depth + 1) for v in value]
    return value
