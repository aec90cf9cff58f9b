"""Unit tests of imagegen.protocol: every message round-trips; every malformed frame set is refused.

The rule under test: decode() returns a typed message or raises ProtocolError, never anything else.
"""

from __future__ import annotations

import dataclasses
import re

import msgpack
import pytest

from imagegen import protocol
from imagegen.protocol import (
    CLIENT_LINK,
    MAX_HEADER_BYTES,
    MAX_PROMPT_CHARS,
    WORKER_LINK,
    BatchingConfig,
    Command,
    Disconnect,
    Failure,
    Generate,
    GenerationParams,
    Heartbeat,
    ProtocolError,
    Register,
    Result,
    StatsQuery,
    StatsReply,
    Welcome,
    WorkerStatus,
    decode,
    encode,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def params(**overrides) -> GenerationParams:
    values = dict(prompt="a lighthouse at dusk", width=512, height=512, num_inference_steps=25,
                  guidance_scale=7.5, seed=42, negative_prompt="blurry")
    values.update(overrides)
    return GenerationParams(**values)


def generate(**overrides) -> Generate:
    return Generate(request_id="req-1", params=params(**overrides), deadline_s=120.0)


def register() -> Register:
    return Register(
        worker_name="host-a:gpu0", host="host-a", gpu_id=0, pid=1234, model_id="tiny/sd", device="cuda:0",
        capacity=16,
        batching=BatchingConfig(enable_batching=True, max_batch_size=8, max_wait_time=5.0, min_batch_size=1,
                                min_wait_time=0.5, adaptive_batching=True, adaptive_threshold=10,
                                max_batch_size_auto=True),
    )


def status() -> WorkerStatus:
    return WorkerStatus(state="ready", queue_depth=3, running=2, max_queue_depth=47, total_requests=150,
                        total_batches=23, total_failed=1, sum_wait_ms=351150.0, sum_generation_ms=885500.0,
                        stopped_batches=2, sum_stopped_ms=21.5)


def result() -> Result:
    return Result(request_id="req-1", worker_name="host-a:gpu0", host="host-a", gpu_id=0, batch_id="host-a:gpu0:7",
                  batch_size=4, queue_wait_ms=1234.5, generation_ms=38500.0, width=512, height=512, seed=42)


def header_of(message) -> dict:
    return dataclasses.asdict(message)


def frames_with(link: bytes, command: Command, header: dict | bytes, *payload: bytes) -> list[bytes]:
    raw = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    return [link, command.value, raw, *payload]


def generate_header(**param_overrides) -> dict:
    h = header_of(generate())
    h["params"].update(param_overrides)
    return h


# ------------------------------------------------------------------ round trips


WORKER_MESSAGES = [
    register(),
    Welcome(broker_epoch="0123abcd" * 4, heartbeat_interval_s=1.0),
    Heartbeat(status=status()),
    Disconnect(reason="worker shutting down"),
    generate(),
    generate(negative_prompt=None, seed=2**63 - 1),
    Failure(request_id="req-1", code="generation_failed", message="CUDA out of memory"),
]
CLIENT_MESSAGES = [
    generate(),
    generate(negative_prompt=None, seed=2**63 - 1),
    Failure(request_id="req-1", code="overloaded", message="queue full"),
    StatsQuery(query_id="q-1"),
]


@pytest.mark.parametrize("message", WORKER_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_on_worker_link(message):
    frames = encode(WORKER_LINK, message)
    assert frames[0] == WORKER_LINK and frames[1] == message.COMMAND.value and len(frames) == 3
    decoded, payload = decode(frames, WORKER_LINK)
    assert decoded == message and type(decoded) is type(message)
    assert payload == []


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_on_client_link(message):
    decoded, payload = decode(encode(CLIENT_LINK, message), CLIENT_LINK)
    assert decoded == message and payload == []


def test_generate_keeps_none_negative_prompt_and_the_largest_seed():
    decoded, _ = decode(encode(WORKER_LINK, generate(negative_prompt=None, seed=2**63 - 1)), WORKER_LINK)
    assert decoded.params.negative_prompt is None
    assert decoded.params.seed == 2**63 - 1
    assert isinstance(decoded.params, GenerationParams)


def test_register_round_trip_keeps_the_nested_batching_config():
    decoded, _ = decode(encode(WORKER_LINK, register()), WORKER_LINK)
    assert isinstance(decoded.batching, BatchingConfig)
    assert decoded.batching.max_batch_size_auto is True
    assert decoded.protocol_version == protocol.PROTOCOL_VERSION


def test_heartbeat_round_trip_keeps_the_worker_status():
    decoded, _ = decode(encode(WORKER_LINK, Heartbeat(status())), WORKER_LINK)
    assert isinstance(decoded.status, WorkerStatus)
    assert decoded.status == status()


def test_a_status_without_the_stopped_batch_counters_reads_as_none_stopped():
    # A worker built before preemptible starts sends no stopped_batches: the broker reads zeros.
    older = {k: v for k, v in dataclasses.asdict(status()).items() if k not in ("stopped_batches", "sum_stopped_ms")}
    decoded = protocol.from_header(WorkerStatus, older)
    assert (decoded.stopped_batches, decoded.sum_stopped_ms) == (0, 0.0)


def test_sizes_round_trip_as_image_sizes():
    sizes = (protocol.ImageSize(1024, 1024), protocol.ImageSize(1152, 896))
    message = dataclasses.replace(register(), sizes=sizes, warm_sizes=sizes[:1], unlisted_size="snap")
    decoded, _ = decode(encode(WORKER_LINK, message), WORKER_LINK)
    assert decoded == message
    assert decoded.sizes == sizes and isinstance(decoded.sizes, tuple)
    assert [str(size) for size in decoded.sizes] == ["1024x1024", "1152x896"]


def test_a_register_of_an_older_build_lists_no_sizes():
    older = {k: v for k, v in dataclasses.asdict(register()).items() if k not in ("sizes", "warm_sizes", "unlisted_size")}
    decoded = protocol.from_header(Register, older)
    assert (decoded.sizes, decoded.warm_sizes, decoded.unlisted_size) == ((), (), "eager")


@pytest.mark.parametrize("sizes, error", [
    ([{"width": 64, "height": 64}] * (protocol.MAX_SIZES + 1), "sizes: more than 64 items"),
    ([{"width": 4, "height": 64}], "sizes[0].width: 4 is below"),
    ({"width": 64, "height": 64}, "sizes: expected an array"),
    (["64x64"], "sizes[0]: expected a map"),
])
def test_sizes_out_of_bounds_are_refused(sizes, error):
    header = dataclasses.asdict(register())
    header["sizes"] = sizes
    with pytest.raises(ProtocolError, match=re.escape(error)):
        decode([WORKER_LINK, Command.REGISTER.value, msgpack.packb(header)], WORKER_LINK)


@pytest.mark.parametrize("link", [WORKER_LINK, CLIENT_LINK])
def test_result_round_trip_carries_its_payload_frame(link):
    frames = encode(link, result(), [PNG])
    assert frames[3] == PNG and len(frames) == 4
    decoded, payload = decode(frames, link)
    assert decoded == result()
    assert payload == [PNG]


def test_stats_reply_round_trip_keeps_nested_dicts_and_lists_as_lists():
    stats = {
        "num_gpus": 2,
        "gpu_ids": [0, 1],
        "avg_batch_size": 6.52,
        "config": {"max_batch_size": 8, "adaptive_batching": True, "max_wait_time": None},
        "per_gpu_stats": [{"gpu_id": 0, "load": [1, [2, 3]]}, {"gpu_id": 1, "load": []}],
    }
    decoded, _ = decode(encode(CLIENT_LINK, StatsReply("q-1", stats)), CLIENT_LINK)
    assert decoded.stats == stats
    assert isinstance(decoded.stats["gpu_ids"], list)
    assert isinstance(decoded.stats["per_gpu_stats"], list)
    assert isinstance(decoded.stats["per_gpu_stats"][0]["load"][1], list)


def test_decode_accepts_int_for_a_float_field():
    h = generate_header(guidance_scale=7)
    decoded, _ = decode(frames_with(WORKER_LINK, Command.GENERATE, h), WORKER_LINK)
    assert decoded.params.guidance_scale == 7.0 and isinstance(decoded.params.guidance_scale, float)


def test_unknown_extra_keys_are_ignored():
    h = generate_header(sampler="euler")  # nested
    h["tenant_class"] = "gold"  # top level
    decoded, _ = decode(frames_with(WORKER_LINK, Command.GENERATE, h), WORKER_LINK)
    assert decoded == generate()


def test_optional_field_may_be_omitted():
    h = generate_header()
    del h["params"]["negative_prompt"]
    decoded, _ = decode(frames_with(WORKER_LINK, Command.GENERATE, h), WORKER_LINK)
    assert decoded.params.negative_prompt is None


# ------------------------------------------------------------------ encode refuses the wrong link


@pytest.mark.parametrize(
    "link, message",
    [
        (CLIENT_LINK, register()),
        (CLIENT_LINK, Heartbeat(status())),
        (CLIENT_LINK, Welcome("e", 1.0)),
        (CLIENT_LINK, Disconnect("bye")),
        (WORKER_LINK, StatsQuery("q")),
        (WORKER_LINK, StatsReply("q", {})),
    ],
    ids=lambda v: v.decode() if isinstance(v, bytes) else type(v).__name__,
)
def test_encode_refuses_a_message_on_the_wrong_link(link, message):
    with pytest.raises(ValueError):
        encode(link, message)


# ------------------------------------------------------------------ malformed frames


def assert_refused(frames, link=WORKER_LINK):
    with pytest.raises(ProtocolError):
        decode(frames, link)


@pytest.mark.parametrize("count", [0, 1, 2])
def test_too_few_frames(count):
    assert_refused(encode(WORKER_LINK, generate())[:count])


@pytest.mark.parametrize("tag", [b"IGW2", b"IGW0", b"", b"XXXX", CLIENT_LINK])
def test_wrong_link_tag_on_worker_link(tag):
    frames = encode(WORKER_LINK, generate())
    frames[0] = tag
    assert_refused(frames)


def test_worker_tag_on_client_link():
    assert_refused(encode(WORKER_LINK, generate()), CLIENT_LINK)


@pytest.mark.parametrize("command", [b"\x00", b"\x08", b"\xff", b"", b"\x03\x03"])
def test_unknown_command_byte(command):
    frames = encode(WORKER_LINK, generate())
    frames[1] = command
    assert_refused(frames)


@pytest.mark.parametrize(
    "link, message",
    [(WORKER_LINK, StatsQuery("q")), (WORKER_LINK, StatsReply("q", {})),
     (CLIENT_LINK, register()), (CLIENT_LINK, Heartbeat(status())), (CLIENT_LINK, Welcome("e", 1.0)),
     (CLIENT_LINK, Disconnect("bye"))],
    ids=lambda v: v.decode() if isinstance(v, bytes) else type(v).__name__,
)
def test_command_not_allowed_on_that_link(link, message):
    other = CLIENT_LINK if link == WORKER_LINK else WORKER_LINK
    frames = encode(other, message)
    frames[0] = link  # right tag, but a command that link does not speak
    assert_refused(frames, link)


@pytest.mark.parametrize("header", [b"", b"\xc1", b"\xa5abc", b"{\"request_id\": \"x\"}"])
def test_header_that_is_not_msgpack(header):
    assert_refused(frames_with(WORKER_LINK, Command.GENERATE, header))


def test_header_with_trailing_garbage():
    raw = msgpack.packb(header_of(generate())) + b"\x00"
    assert_refused(frames_with(WORKER_LINK, Command.GENERATE, raw))


@pytest.mark.parametrize("value", [[1, 2, 3], "a string", 7, None])
def test_header_that_is_not_a_map(value):
    assert_refused(frames_with(WORKER_LINK, Command.DISCONNECT, msgpack.packb(value)))


def test_header_with_non_string_keys():
    assert_refused(frames_with(WORKER_LINK, Command.DISCONNECT, msgpack.packb({1: "x", "reason": "r"})))


@pytest.mark.parametrize("path", [("request_id",), ("params",), ("params", "prompt"), ("params", "width"),
                                  ("deadline_s",)])
def test_missing_required_field(path):
    h = header_of(generate())
    target = h
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    assert_refused(frames_with(WORKER_LINK, Command.GENERATE, h))


@pytest.mark.parametrize(
    "field, value",
    [
        ("width", "512"),  # str for int
        ("width", True),  # bool for int
        ("seed", True),  # bool for int, where 1 would be in range
        ("num_inference_steps", True),
        ("width", 512.0),  # float for int
        ("seed", None),  # None for a non-optional field
        ("guidance_scale", float("nan")),
        ("guidance_scale", float("inf")),
        ("guidance_scale", float("-inf")),
        ("guidance_scale", "7.5"),
        ("guidance_scale", False),
        ("prompt", 123),  # int for str
        ("prompt", b"bytes"),  # bin for str
        ("prompt", ["a"]),
        ("negative_prompt", 0),
    ],
)
def test_wrong_type(field, value):
    assert_refused(frames_with(WORKER_LINK, Command.GENERATE, generate_header(**{field: value})))


def test_nested_message_that_is_not_a_map():
    h = header_of(generate())
    h["params"] = ["a", 512]
    assert_refused(frames_with(WORKER_LINK, Command.GENERATE, h))


def test_bool_field_refuses_int():
    h = header_of(register())
    h["batching"]["enable_batching"] = 1
    assert_refused(frames_with(WORKER_LINK, Command.REGISTER, h))


def test_stats_that_are_not_a_map():
    assert_refused(frames_with(CLIENT_LINK, Command.STATS_REPLY, {"query_id": "q", "stats": [1, 2]}), CLIENT_LINK)


@pytest.mark.parametrize(
    "field, value",
    [
        ("width", 0),
        ("width", 7),
        ("width", 8193),
        ("height", -512),
        ("num_inference_steps", 0),
        ("num_inference_steps", 5000),
        ("seed", -1),
        ("guidance_scale", -0.1),
        ("guidance_scale", 100.5),
    ],
)
def test_out_of_range_value(field, value):
    assert_refused(frames_with(WORKER_LINK, Command.GENERATE, generate_header(**{field: value})))


def test_value_at_the_bounds_is_accepted():
    h = generate_header(width=8, height=8192, num_inference_steps=1000, guidance_scale=0.0, seed=0)
    decoded, _ = decode(frames_with(WORKER_LINK, Command.GENERATE, h), WORKER_LINK)
    assert (decoded.params.width, decoded.params.height, decoded.params.num_inference_steps) == (8, 8192, 1000)


def test_seed_above_max_is_refused():
    assert_refused(frames_with(WORKER_LINK, Command.GENERATE, generate_header(seed=2**63)))


def test_deadline_out_of_range():
    h = header_of(generate())
    h["deadline_s"] = -1.0
    assert_refused(frames_with(WORKER_LINK, Command.GENERATE, h))


def test_over_long_prompt_is_refused_and_the_limit_itself_is_accepted():
    assert_refused(frames_with(WORKER_LINK, Command.GENERATE, generate_header(prompt="x" * (MAX_PROMPT_CHARS + 1))))
    decoded, _ = decode(frames_with(WORKER_LINK, Command.GENERATE, generate_header(prompt="x" * MAX_PROMPT_CHARS)),
                        WORKER_LINK)
    assert len(decoded.params.prompt) == MAX_PROMPT_CHARS


def test_over_long_request_id_is_refused():
    h = header_of(generate())
    h["request_id"] = "r" * (protocol.MAX_ID_CHARS + 1)
    assert_refused(frames_with(WORKER_LINK, Command.GENERATE, h))


def test_header_over_max_header_bytes_is_refused():
    h = header_of(Disconnect("bye"))
    h["padding"] = "x" * MAX_HEADER_BYTES  # an ignored key, so only the size can refuse it
    raw = msgpack.packb(h)
    assert len(raw) > MAX_HEADER_BYTES
    assert_refused(frames_with(WORKER_LINK, Command.DISCONNECT, raw))


def test_header_just_under_max_header_bytes_is_accepted():
    h = header_of(Disconnect("bye"))
    h["padding"] = ""
    overhead = len(msgpack.packb(h))
    h["padding"] = "x" * (MAX_HEADER_BYTES - overhead - 8)
    raw = msgpack.packb(h)
    assert len(raw) <= MAX_HEADER_BYTES
    decoded, _ = decode(frames_with(WORKER_LINK, Command.DISCONNECT, raw), WORKER_LINK)
    assert decoded == Disconnect("bye")


def test_msgpack_array_bomb_is_refused():
    assert_refused(frames_with(WORKER_LINK, Command.DISCONNECT, b"\xdd\xff\xff\xff\xff"))


def test_msgpack_map_bomb_is_refused():
    assert_refused(frames_with(WORKER_LINK, Command.DISCONNECT, b"\xdf\xff\xff\xff\xff"))


def test_msgpack_str_bomb_is_refused():
    assert_refused(frames_with(WORKER_LINK, Command.DISCONNECT, b"\x81\xa6reason\xdb\xff\xff\xff\xff"))


@pytest.mark.parametrize("header", [b"\x91" * 100_000, b"\x91" * 100_000 + b"\xc0", b"\x81\xa1a" * 100_000])
def test_deeply_nested_header_is_refused(header):
    assert_refused(frames_with(WORKER_LINK, Command.DISCONNECT, header))


@pytest.mark.parametrize("depth", [600, 1000])
def test_deeply_nested_stats_are_refused_not_a_recursion_error(depth):
    # msgpack itself accepts ~1000 levels; decode must still answer ProtocolError, not RecursionError.
    nested: object = 0
    for _ in range(depth):
        nested = [nested]
    raw = msgpack.packb({"query_id": "q", "stats": {"deep": nested}})
    assert_refused(frames_with(CLIENT_LINK, Command.STATS_REPLY, raw), CLIENT_LINK)


def test_moderately_nested_stats_still_round_trip():
    nested: object = 0
    for _ in range(10):
        nested = [nested, {"k": nested}]
    decoded, _ = decode(encode(CLIENT_LINK, StatsReply("q", {"deep": nested})), CLIENT_LINK)
    assert decoded.stats == {"deep": nested}


def test_msgpack_ext_type_is_refused():
    h = header_of(Disconnect("bye"))
    h["extra"] = msgpack.ExtType(5, b"\x00\x01")  # even in an ignored key
    assert_refused(frames_with(WORKER_LINK, Command.DISCONNECT, msgpack.packb(h)))


def test_msgpack_timestamp_ext_is_refused():
    raw = msgpack.packb({"reason": msgpack.Timestamp(1, 0)})
    assert_refused(frames_with(WORKER_LINK, Command.DISCONNECT, raw))


def test_result_without_payload_is_refused():
    assert_refused(encode(WORKER_LINK, result()))


def test_result_with_two_payload_frames_is_refused():
    assert_refused(encode(WORKER_LINK, result(), [PNG, PNG]))


@pytest.mark.parametrize("message", [generate(), Heartbeat(status()), Disconnect("bye")],
                         ids=lambda m: type(m).__name__)
def test_message_without_payload_refuses_a_payload_frame(message):
    assert_refused(encode(WORKER_LINK, message, [PNG]))


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


def test_refusal_says_why_the_other_end_would_drop_a_message_built_here():
    """encode() does not check bounds (the receiver does); refusal() runs the receiver's check on a
    message before it is ever sent, so a process can stop at start instead of being ignored."""
    params = protocol.GenerationParams("p", 64, 64, 1, 1.0, 1)
    assert protocol.refusal(protocol.CLIENT_LINK, protocol.Generate("r", params, protocol.MAX_DEADLINE_S)) is None
    why = protocol.refusal(protocol.CLIENT_LINK, protocol.Generate("r", params, protocol.MAX_DEADLINE_S + 1))
    assert why is not None and "deadline_s" in why and "86400" in why


def test_request_id_of_a_refused_generate_is_read_when_it_can_be():
    params = protocol.GenerationParams("p", 64, 64, 1, 1.0, 1)
    frames = protocol.encode(protocol.WORKER_LINK, protocol.Generate("r-7", params, 10.0))
    header = protocol.unpack_header(frames[2])
    out_of_bounds = [*frames[:2], msgpack.packb({**header, "deadline_s": 1e9}, use_bin_type=True)]
    assert protocol.request_id_of_refused(out_of_bounds, protocol.WORKER_LINK) == "r-7"
    assert protocol.request_id_of_refused([*frames[:2], b"\xc1"], protocol.WORKER_LINK) is None  # unreadable
    long_id = [*frames[:2], msgpack.packb({**header, "request_id": "x" * (protocol.MAX_ID_CHARS + 1)})]
    assert protocol.request_id_of_refused(long_id, protocol.WORKER_LINK) is None
    assert protocol.request_id_of_refused(out_of_bounds, protocol.CLIENT_LINK) is None  # another link's tag
    cancel = protocol.encode(protocol.WORKER_LINK, protocol.Cancel("r-7"))
    assert protocol.request_id_of_refused(cancel, protocol.WORKER_LINK) is None  # only requests are answered
