"""Property-based fuzzing of the HTTP gateway (Hypothesis): hostile input never gets a 5xx.

The gateway runs in-process on aiohttp's TestServer with `WireCheckingFakeBroker`
(tests/support/fake_brokers.py), a FAKE standing in for the broker: no ZeroMQ, no worker, no GPU.
It does what the real link does with a request that passed validation -- encode it with the wire
protocol and check that the broker would accept it -- and answers with a tiny PNG of the requested
size.

Hypothesis drives synchronous tests; each example runs on one event loop per module (``Harness``),
on which the server was created, so no example ever touches a loop that is not its server's.

Properties:
  (a) arbitrary JSON values as the body -> never 5xx; 4xx answers have the documented error shape;
  (b) arbitrary bytes as the body -> never 5xx;
  (c) bodies generated from the OpenAPI request schema -> 200, and the answer validates against
      the response schema;
  (d) a valid body with one field replaced by a random JSON value -> 200, or 400 naming that field;
  (e) random paths under /images/ -> 404 JSON, never a file's contents.
The request and response schemas are the ones GET /openapi.json serves (gateway/openapi.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import urllib.parse
from typing import Any

import jsonschema
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.images import PNG_SIGNATURE, png_size
from gateway.openapi import openapi_document, openapi_handler
from gateway.validation import KNOWN_FIELDS
from tests.support.fake_brokers import WireCheckingFakeBroker

pytestmark = pytest.mark.timeout(120)

FUZZ = dict(deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])

# Bounds on the generated JSON. Beyond them json.dumps (here) and json.loads (in the gateway) both
# fail: integer literals over sys.get_int_max_str_digits() (4300) raise ValueError, nesting deeper
# than the recursion limit raises RecursionError. The gateway answers both with 400; the two
# regression tests at the end send such bodies as raw bytes.
JSON_INT_DIGITS = 4300
JSON_MAX_DEPTH = 300

SECRET = b"TOP-SECRET-CONTENTS-OUTSIDE-THE-IMAGE-FOLDER"


class Harness:
    """One gateway on a TestServer, created on (and always driven from) its own event loop."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.broker = WireCheckingFakeBroker()
        self.loop = asyncio.new_event_loop()
        self.client: TestClient = self.loop.run_until_complete(self._start())

    async def _start(self) -> TestClient:
        app = create_app(self.settings, broker_client=self.broker)
        if not any(route.resource is not None and route.resource.canonical == "/openapi.json"
                   for route in app.router.routes()):
            app.router.add_get("/openapi.json", openapi_handler)
        client = TestClient(TestServer(app))
        await client.start_server()
        response = await client.get("/openapi.json")
        assert response.status == 200
        self.document = await response.json()
        return client

    def __repr__(self) -> str:
        return "Harness()"

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.close()

    async def post_raw(self, data: bytes, content_type: str | None = "application/json") -> tuple[int, Any, Any]:
        headers = {"Content-Type": content_type} if content_type else {}
        response = await self.client.post("/generate", data=data, headers=headers)
        payload = await response.read()
        return response.status, response, payload

    def post(self, data: bytes, content_type: str | None = "application/json") -> tuple[int, Any, bytes]:
        return self.run(self.post_raw(data, content_type))

    async def raw_get(self, target: str) -> tuple[int, dict[str, str], bytes]:
        """GET exactly ``target`` (no client-side URL normalisation); reads the answer to EOF."""
        reader, writer = await asyncio.open_connection(self.client.server.host, self.client.server.port)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode("ascii"))
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = _dechunk(body)
        return int(lines[0].split()[1]), headers, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Harness:
    root = tmp_path_factory.mktemp("fuzz-gateway")
    (root / "secret.png").write_bytes(SECRET)
    (root / "secret").write_bytes(SECRET)
    h = Harness(GatewaySettings(image_dir=str(root / "images")))
    try:
        yield h
    finally:
        h.close()
    assert h.broker.wire_errors == []


@pytest.fixture(scope="module")
def document(harness: Harness) -> dict:
    """The served OpenAPI document (and a check that it is what openapi_document builds)."""
    assert harness.document == json.loads(json.dumps(openapi_document(harness.settings)))
    return harness.document


def component(document: dict, name: str) -> dict:
    return document["components"]["schemas"][name]


_validators: dict[tuple[int, str], jsonschema.Draft202012Validator] = {}


def validator(document: dict, name: str) -> jsonschema.Draft202012Validator:
    key = (id(document), name)
    if key not in _validators:
        _validators[key] = jsonschema.Draft202012Validator(component(document, name))
    return _validators[key]


# --------------------------------------------------------------------------- answer checks


def check_error_answer(document: dict, status: int, response, payload: bytes) -> dict:
    assert response.content_type == "application/json", (status, payload[:200])
    body = json.loads(payload)
    validator(document, "Error").validate(body)
    if status == 503:
        assert int(response.headers["Retry-After"]) >= 0
    return body


def check_answer(document: dict, status: int, response, payload: bytes) -> dict:
    """Any answer of POST /generate: never 5xx; JSON in the documented shape for its status."""
    assert status < 500, (status, payload[:500])
    documented = document["paths"]["/generate"]["post"]["responses"]
    assert str(status) in documented, (status, payload[:500])
    if status == 200:
        body = json.loads(payload)
        validator(document, "GenerateResponse").validate(body)
        return body
    return check_error_answer(document, status, response, payload)


# --------------------------------------------------------------------------- strategies

# Characters that tend to break things: lone surrogates, NUL, BOM, odd whitespace, RTL, emoji.
SPECIAL_CHARS = ["\ud800", "\udfff", "\udbff", "\x00", "\ufeff", "\u2028", "\x1c", "\x85", "\xa0", "\u202e",
                 "\U0001f600", "\\", '"', "%", "\n", " "]
# (a list joined, not st.text: st.text never yields lone surrogates, whatever its alphabet)
any_text = st.lists(st.one_of(st.characters(exclude_categories=()), st.sampled_from(SPECIAL_CHARS)),
                    max_size=40).map("".join)
keys = st.one_of(st.sampled_from(KNOWN_FIELDS), any_text)
huge_ints = st.integers(min_value=1, max_value=JSON_INT_DIGITS - 1).flatmap(
    lambda digits: st.integers(min_value=-(10**digits - 1), max_value=10**digits - 1))
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),  # NaN, Infinity: json.dumps(allow_nan=True) writes them
    any_text, st.text(max_size=3000),
)
json_values = st.recursive(leaves, lambda children: st.one_of(
    st.lists(children, max_size=6), st.dictionaries(keys, children, max_size=6)), max_leaves=25)


@st.composite
def deeply_nested(draw) -> Any:
    value = draw(leaves)
    for _ in range(draw(st.integers(min_value=1, max_value=JSON_MAX_DEPTH))):
        value = [value] if draw(st.booleans()) else {draw(keys): value}
    return value


# Values aimed at one field: type confusion, boundary numbers, hostile strings, or anything at all.
field_values = st.one_of(
    json_values, any_text,
    st.sampled_from([0, -1, 1, 7, 8, 63, 64, 2048, 2056, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
                     -(2**63), 0.5, -0.0, 1e-300, 1e300, 7.5, 30.0, 30.000001, "", " ", "512", True, False,
                     None, [], {}]),
)
bodies = st.one_of(
    json_values,
    st.dictionaries(keys, json_values, max_size=12),  # objects that look like requests
    st.fixed_dictionaries({"prompt": field_values}, optional={k: field_values for k in KNOWN_FIELDS[1:]}),
    deeply_nested(),
)


def encode_json(value: Any, ascii_only: bool) -> bytes:
    text = json.dumps(value, allow_nan=True, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")  # lone surrogates written raw: invalid UTF-8, on purpose


def from_schema(schema: dict, document: dict) -> st.SearchStrategy:
    """Values valid against ``schema``, for the JSON Schema keywords gateway/openapi.py uses."""
    if "$ref" in schema:
        return from_schema(component(document, schema["$ref"].rsplit("/", 1)[1]), document)
    if "anyOf" in schema:
        return st.one_of(*(from_schema(branch, document) for branch in schema["anyOf"]))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    options = []
    for kind in types:
        if kind == "null":
            options.append(st.none())
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "integer":
            step = schema.get("multipleOf", 1)
            low, high = math.ceil(schema.get("minimum", -(2**64)) / step), schema.get("maximum", 2**64) // step
            options.append(st.integers(low, high).map(lambda n, step=step: n * step))
        elif kind == "number":
            low, high = schema.get("minimum"), schema.get("maximum")
            options.append(st.floats(low, high, allow_nan=False, allow_infinity=False))
            options.append(st.integers(math.ceil(low), math.floor(high)))
        elif kind == "string":
            low, high = schema.get("minLength", 0), schema.get("maxLength", 200)
            # Short strings, and strings at the length limit (a random piece repeated: cheap to draw).
            at_limit = st.tuples(st.integers(max(low, high - 2), high), st.text(min_size=1, max_size=8)).map(
                lambda pair: (pair[1] * pair[0])[:pair[0]])
            text = st.one_of(st.text(min_size=low, max_size=min(high, 60)), at_limit)
            if "pattern" in schema:
                text = text.filter(re.compile(schema["pattern"]).search)
            options.append(text)
        elif kind == "object":
            required = set(schema.get("required", ()))
            props = schema["properties"]
            options.append(st.fixed_dictionaries(
                {k: from_schema(v, document) for k, v in props.items() if k in required},
                optional={k: from_schema(v, document) for k, v in props.items() if k not in required}))
        else:
            raise AssertionError(f"from_schema: unsupported type {kind!r}")
    return st.one_of(*options)


_valid_bodies: dict[int, st.SearchStrategy] = {}


def valid_bodies(document: dict) -> st.SearchStrategy:
    """Bodies valid against the request schema (and the pixel limit, which JSON Schema cannot state)."""
    if id(document) not in _valid_bodies:
        request = component(document, "GenerateRequest")
        limit = request["x-max-image-pixels"]
        width, height = request["properties"]["width"]["default"], request["properties"]["height"]["default"]
        _valid_bodies[id(document)] = from_schema(request, document).filter(
            lambda b: (b.get("width") or width) * (b.get("height") or height) <= limit)
    return _valid_bodies[id(document)]


# --------------------------------------------------------------------------- the document itself


def test_openapi_document_is_well_formed(document: dict, harness: Harness):
    assert document["openapi"].startswith("3.1")
    for name, schema in document["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
    # Every $ref points at something that exists.
    refs = re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(document))
    assert refs
    for ref in refs:
        node = document
        for part in ref.split("/"):
            node = node[part]
    request = component(document, "GenerateRequest")
    s = harness.settings
    assert set(request["properties"]) == set(KNOWN_FIELDS)
    assert request["required"] == ["prompt"] and request["additionalProperties"] is False
    props = request["properties"]
    for side in ("width", "height"):
        assert (props[side]["minimum"], props[side]["maximum"], props[side]["multipleOf"]) == (
            s.min_image_side, s.max_image_side, 8)
    assert props["prompt"]["maxLength"] == props["negative_prompt"]["maxLength"] == s.max_prompt_chars
    assert (props["num_inference_steps"]["minimum"], props["num_inference_steps"]["maximum"]) == (
        1, s.max_inference_steps)
    assert (props["guidance_scale"]["minimum"], props["guidance_scale"]["maximum"]) == (0, s.max_guidance_scale)
    assert (props["seed"]["minimum"], props["seed"]["maximum"]) == (0, 2**63 - 1)
    responses = document["paths"]["/generate"]["post"]["responses"]
    assert {"200", "400", "413", "500", "503", "504"} <= set(responses)
    assert "Retry-After" in responses["503"]["headers"]
    assert set(document["paths"]) >= {"/generate", "/stats", "/healthz", "/readyz", "/images/{name}"}


def test_prompt_pattern_is_the_validators_idea_of_blank():
    """The prompt's pattern (one non-whitespace character) agrees with str.strip() on every character."""
    pattern = re.compile(component(openapi_document(GatewaySettings()), "GenerateRequest")
                         ["properties"]["prompt"]["pattern"])
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    assert set(pattern.findall(everything)) == {c for c in everything if not c.isspace()}


def test_openapi_document_follows_settings():
    custom = GatewaySettings(max_prompt_chars=10, min_image_side=128, max_image_side=256, max_inference_steps=5,
                             max_guidance_scale=2.0, max_image_pixels=256 * 128, default_width=128,
                             default_height=128, max_request_bytes=1000)
    request = openapi_document(custom)["components"]["schemas"]["GenerateRequest"]
    props = request["properties"]
    assert props["prompt"]["maxLength"] == 10
    assert (props["width"]["minimum"], props["width"]["maximum"]) == (128, 256)
    assert props["num_inference_steps"]["maximum"] == 5 and props["guidance_scale"]["maximum"] == 2.0
    assert request["x-max-image-pixels"] == 256 * 128
    assert openapi_document(custom)["paths"]["/generate"]["post"]["x-max-request-bytes"] == 1000


def test_other_routes_match_the_document(harness: Harness, document: dict):
    async def get(path):
        response = await harness.client.get(path)
        return response.status, await response.json()

    for path, name in [("/healthz", "Health"), ("/readyz", "Ready"), ("/stats", "Stats")]:
        status, body = harness.run(get(path))
        assert status == 200
        validator(document, name).validate(body)


# --------------------------------------------------------------------------- (a) arbitrary JSON


@settings(max_examples=250, **FUZZ)
@given(value=bodies, ascii_only=st.booleans())
@example(value={"prompt": "\ud800"}, ascii_only=True)  # lone surrogate: msgpack cannot encode it
@example(value={"prompt": "a", "width": float("nan")}, ascii_only=True)
@example(value={"prompt": "a", "seed": 10**4000}, ascii_only=True)
@example(value={"prompt": "a", "guidance_scale": float("inf")}, ascii_only=True)
@example(value={"prompt": "a", "seed": 1e300}, ascii_only=True)
def test_arbitrary_json_never_5xx(harness: Harness, value: Any, ascii_only: bool):
    data = encode_json(value, ascii_only)
    calls = harness.broker.calls
    status, response, payload = harness.post(data)
    body = check_answer(harness.document, status, response, payload)
    assert status in (200, 400, 413), (status, body)
    if status != 200:
        assert harness.broker.calls == calls  # refused before reaching the broker
    if status == 413:
        assert len(data) > harness.settings.max_request_bytes


# --------------------------------------------------------------------------- (b) arbitrary bytes


raw_bodies = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda head, tail: head + tail,
              st.sampled_from([b'{"prompt": ', b'{"prompt": "a", "width": ', b"[", b'{"', b"\xef\xbb\xbf{"]),
              st.binary(max_size=200)),
    st.text(max_size=500).map(lambda t: t.encode("utf-8")),
)


@settings(max_examples=400, **FUZZ)
@given(data=raw_bodies, content_type=st.sampled_from(["application/json", "text/plain", None,
                                                      "application/x-www-form-urlencoded", "multipart/form-data"]))
@example(data=b"", content_type=None)
@example(data=b'{"prompt": "a"}\x00', content_type="application/json")
def test_arbitrary_bytes_never_5xx(harness: Harness, data: bytes, content_type: str | None):
    status, response, payload = harness.post(data, content_type)
    check_answer(harness.document, status, response, payload)
    assert status in (200, 400, 413), status


# --------------------------------------------------------------------------- (c) bodies from the schema


@settings(max_examples=150, **FUZZ)
@given(data=st.data())
def test_schema_valid_bodies_succeed(harness: Harness, data):
    body = data.draw(valid_bodies(harness.document), label="body")
    s = harness.settings
    status, response, payload = harness.post(encode_json(body, ascii_only=data.draw(st.booleans())))
    assert status == 200, (body, payload[:500])
    answer = check_answer(harness.document, status, response, payload)
    expected = {"width": s.default_width, "height": s.default_height, "num_inference_steps": s.default_steps,
                "guidance_scale": s.default_guidance_scale}
    for field, default in expected.items():
        given_value = body.get(field)
        assert answer[field] == (default if given_value is None else given_value), field
    if body.get("seed") is not None:
        assert answer["seed"] == body["seed"]
    for label in ("game_id", "round_id", "player_id"):
        assert answer[label] == (None if body.get(label) is None else str(body[label]))
    origin = str(harness.client.make_url("/").origin())
    assert answer["image_url"] == f"{origin}/images/{answer['image_id']}.png"


@settings(max_examples=40, **FUZZ)
@given(field=st.sampled_from(["width", "height", "num_inference_steps", "seed"]), data=st.data())
def test_integral_floats_count_as_integers(harness: Harness, field: str, data):
    """The schema says "integer", which JSON Schema takes to include 512.0: so must the gateway."""
    schema = component(harness.document, "GenerateRequest")["properties"][field]
    step = schema.get("multipleOf", 1)
    high = min(schema["maximum"], 2**53)  # exactly representable as a float
    value = data.draw(st.integers(math.ceil(schema["minimum"] / step), high // step)) * step
    status, response, payload = harness.post(json.dumps({"prompt": "p", field: float(value)}).encode())
    assert status == 200, payload
    assert json.loads(payload)[field] == value


# --------------------------------------------------------------------------- (d) mutations


@settings(max_examples=250, **FUZZ)
@given(data=st.data())
def test_one_mutated_field_is_named(harness: Harness, data):
    body = dict(data.draw(valid_bodies(harness.document), label="valid body"))
    field = data.draw(st.one_of(st.sampled_from(KNOWN_FIELDS), any_text.filter(lambda k: k not in KNOWN_FIELDS)),
                      label="field")
    value = data.draw(field_values, label="value")
    body[field] = value
    data_bytes = encode_json(body, ascii_only=True)
    calls = harness.broker.calls
    status, response, payload = harness.post(data_bytes)
    answer = check_answer(harness.document, status, response, payload)
    if len(data_bytes) > harness.settings.max_request_bytes:
        assert status == 413
        return
    assert status in (200, 400), (status, answer)
    if field not in KNOWN_FIELDS:
        assert status == 400
    if status == 400:
        assert answer["error"]["code"] == "invalid_request"
        # (a surrogate pair written as two escapes arrives as one character)
        assert answer["error"]["field"] == json.loads(json.dumps(field)), (field, value, answer)
        assert harness.broker.calls == calls


# --------------------------------------------------------------------------- (e) image paths


def _quote(name: str) -> str:
    return urllib.parse.quote(name.encode("utf-8", "surrogatepass"), safe="")


path_chars = st.sampled_from(list("abcdef0123456789ABCDEFxyz-._~!$&'()*+,;=:@") + ["/", "%2F", "%2E", "%00",
                                                                                    "%0A", "%5C", "..", "%25"])
raw_names = st.lists(path_chars, max_size=40).map("".join)


@st.composite
def image_targets(draw, real_id: str) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # any text, percent-encoded: the server decodes it into {name}
        return "/images/" + _quote(draw(st.one_of(any_text, st.text(max_size=80))))
    if kind == 1:  # raw bytes, percent-encoded
        return "/images/" + urllib.parse.quote(draw(st.binary(max_size=60)), safe="")
    if kind == 2:  # path-ish soup: separators, dots, escapes
        return "/images/" + draw(raw_names)
    # near misses of a real image name
    prefix = draw(st.sampled_from(["", "..%2F", "../", "%2E%2E%2F", "./", "x"]))
    name = draw(st.sampled_from([real_id[:-1], real_id.upper(), real_id + "0", real_id[1:]]))
    suffix = draw(st.sampled_from(["", ".PNG", ".png.png", "%0A.png", ".png%00", ".pn", "/"]))
    return "/images/" + prefix + name + suffix


@pytest.fixture(scope="module")
def real_image(harness: Harness) -> str:
    status, _, payload = harness.post(b'{"prompt": "a real image", "width": 64, "height": 64}')
    assert status == 200
    image_id = json.loads(payload)["image_id"]
    status, headers, content = harness.run(harness.raw_get(f"/images/{image_id}.png"))
    assert status == 200 and headers["content-type"] == "image/png" and png_size(content) == (64, 64)
    return image_id


@settings(max_examples=300, **FUZZ)
@given(data=st.data())
@example(data=None)
def test_random_image_paths_are_404_json(harness: Harness, real_image: str, data):
    target = "/images/../secret.png" if data is None else data.draw(image_targets(real_image), label="target")
    assert target != f"/images/{real_image}.png"
    status, headers, payload = harness.run(harness.raw_get(target))
    assert status == 404, (target, status, payload[:200])
    assert headers["content-type"].startswith("application/json"), (target, headers)
    assert SECRET not in payload and not payload.startswith(PNG_SIGNATURE)
    body = json.loads(payload)
    validator(harness.document, "Error").validate(body)
    assert body["error"]["code"] == "not_found"


# --------------------------------------------------------------------------- regressions found by fuzzing


def test_integer_literal_over_4300_digits_is_400(harness: Harness, document: dict):
    status, response, payload = harness.post(b'{"prompt": "a", "seed": ' + b"9" * 4301 + b"}")
    check_answer(document, status, response, payload)
    assert status == 400


def test_deeply_nested_json_is_400(harness: Harness, document: dict):
    status, response, payload = harness.post(b"[" * 30_000 + b"]" * 30_000)
    check_answer(document, status, response, payload)
    assert status == 400
