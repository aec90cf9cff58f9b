"""One table of request bounds (imagegen/bounds.py), read by everything that checks or describes them.

The wire protocol refuses just beyond each of its bounds; the gateway's settings default to the
table's values and may not widen the wire's; the gateway's validator refuses just beyond its
settings; the OpenAPI document states the same numbers; and the web page's form starts from them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from gateway.config import GatewaySettings
from gateway.openai_api import parse_images_request
from gateway.openapi import openapi_document
from gateway.validation import FieldError, parse_generate_request
from gateway.web_page import INDEX_HTML
from imagegen.bounds import GATEWAY_DEFAULTS, IMAGE_SIDE_MULTIPLE, MAX_IMAGES_PER_REQUEST, WIRE
from imagegen.protocol import CLIENT_LINK, WORKER_LINK, Generate, GenerationParams, refusal
from imagegen.settings import SettingsError

NUMERIC_WIRE_FIELDS = {
    "width": WIRE.image_side,
    "height": WIRE.image_side,
    "num_inference_steps": WIRE.inference_steps,
    "guidance_scale": WIRE.guidance_scale,
    "seed": WIRE.seed,
}


def generate(**overrides) -> Generate:
    values = dict(prompt="a lighthouse", width=512, height=512, num_inference_steps=25, guidance_scale=7.5,
                  seed=1, negative_prompt=None)
    return Generate("req-1", GenerationParams(**{**values, **overrides}), deadline_s=60.0)


def just_outside(value: int | float, direction: int) -> int | float:
    """The nearest value beyond ``value``: one more integer, or the next float."""
    return value + direction if isinstance(value, int) else math.nextafter(value, direction * math.inf)


# ------------------------------------------------------------------------------- the wire


@pytest.mark.parametrize("link", [WORKER_LINK, CLIENT_LINK])
@pytest.mark.parametrize("field", sorted(NUMERIC_WIRE_FIELDS))
def test_the_protocol_takes_each_bound_and_refuses_just_beyond_it(link, field):
    span = NUMERIC_WIRE_FIELDS[field]
    assert refusal(link, generate(**{field: span.low})) is None
    assert refusal(link, generate(**{field: span.high})) is None
    assert field in refusal(link, generate(**{field: just_outside(span.low, -1)}))
    assert field in refusal(link, generate(**{field: just_outside(span.high, +1)}))


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_the_protocol_takes_the_longest_prompt_and_refuses_one_character_more(field):
    assert refusal(CLIENT_LINK, generate(**{field: "x" * WIRE.prompt_chars})) is None
    assert field in refusal(CLIENT_LINK, generate(**{field: "x" * (WIRE.prompt_chars + 1)}))


# ------------------------------------------------------------------------------- the gateway's settings


def test_the_settings_default_to_the_table():
    defaults = GatewaySettings()
    for name, value in dataclasses.asdict(GATEWAY_DEFAULTS).items():
        assert getattr(defaults, name) == value and type(getattr(defaults, name)) is type(value), name


def test_the_default_limits_lie_within_the_wire():
    GatewaySettings().validate()
    assert GATEWAY_DEFAULTS.max_prompt_chars <= WIRE.prompt_chars
    assert WIRE.image_side.low <= GATEWAY_DEFAULTS.min_image_side <= GATEWAY_DEFAULTS.max_image_side \
        <= WIRE.image_side.high
    assert GATEWAY_DEFAULTS.max_inference_steps <= WIRE.inference_steps.high
    assert GATEWAY_DEFAULTS.max_guidance_scale <= WIRE.guidance_scale.high


def test_settings_may_reach_the_wire_bounds():
    GatewaySettings(max_prompt_chars=WIRE.prompt_chars, min_image_side=WIRE.image_side.low,
                    max_image_side=WIRE.image_side.high, max_inference_steps=WIRE.inference_steps.high,
                    max_guidance_scale=WIRE.guidance_scale.high).validate()


@pytest.mark.parametrize("overrides, env", [
    ({"max_prompt_chars": WIRE.prompt_chars + 1}, "MAX_PROMPT_LENGTH"),
    ({"min_image_side": WIRE.image_side.low - IMAGE_SIDE_MULTIPLE}, "MAX_IMAGE_SIDE"),
    ({"max_image_side": WIRE.image_side.high + IMAGE_SIDE_MULTIPLE}, "MAX_IMAGE_SIDE"),
    ({"max_inference_steps": WIRE.inference_steps.high + 1}, "MAX_INFERENCE_STEPS"),
    ({"max_guidance_scale": just_outside(WIRE.guidance_scale.high, +1)}, "MAX_GUIDANCE_SCALE"),
    ({"max_guidance_scale": WIRE.guidance_scale.low}, "MAX_GUIDANCE_SCALE"),
    ({"default_width": GATEWAY_DEFAULTS.default_width + IMAGE_SIDE_MULTIPLE // 2}, "DEFAULT_WIDTH"),
])
def test_settings_may_not_widen_the_wire_bounds(overrides, env):
    with pytest.raises(SettingsError, match=env):
        GatewaySettings(**overrides).validate()


# ------------------------------------------------------------------------------- the gateway's validator


OK = {"prompt": "a lighthouse", "width": 512, "height": 512, "num_inference_steps": 25, "guidance_scale": 7.5,
      "seed": 1}


@pytest.mark.parametrize("field, value", [
    ("prompt", "x" * (GATEWAY_DEFAULTS.max_prompt_chars + 1)),
    ("negative_prompt", "x" * (GATEWAY_DEFAULTS.max_prompt_chars + 1)),
    ("width", GATEWAY_DEFAULTS.min_image_side - IMAGE_SIDE_MULTIPLE),
    ("width", GATEWAY_DEFAULTS.max_image_side + IMAGE_SIDE_MULTIPLE),
    ("height", GATEWAY_DEFAULTS.default_height + 1),
    ("num_inference_steps", WIRE.inference_steps.low - 1),
    ("num_inference_steps", GATEWAY_DEFAULTS.max_inference_steps + 1),
    ("guidance_scale", just_outside(WIRE.guidance_scale.low, -1)),
    ("guidance_scale", just_outside(GATEWAY_DEFAULTS.max_guidance_scale, +1)),
    ("seed", WIRE.seed.low - 1),
    ("seed", WIRE.seed.high + 1),
])
def test_the_validator_refuses_just_beyond_each_bound(field, value):
    with pytest.raises(FieldError) as caught:
        parse_generate_request({**OK, field: value}, GatewaySettings())
    assert caught.value.field == field


def test_the_validator_takes_every_bound():
    edges = {"prompt": "x" * GATEWAY_DEFAULTS.max_prompt_chars, "width": GATEWAY_DEFAULTS.min_image_side,
             "height": GATEWAY_DEFAULTS.min_image_side, "num_inference_steps": GATEWAY_DEFAULTS.max_inference_steps,
             "guidance_scale": GATEWAY_DEFAULTS.max_guidance_scale, "seed": WIRE.seed.high}
    parse_generate_request(edges, GatewaySettings())
    biggest = GATEWAY_DEFAULTS.max_image_side
    assert biggest * biggest <= GATEWAY_DEFAULTS.max_image_pixels
    parse_generate_request({**edges, "width": biggest, "height": biggest, "num_inference_steps": 1,
                            "guidance_scale": WIRE.guidance_scale.low, "seed": WIRE.seed.low}, GatewaySettings())


def test_the_openai_route_takes_the_most_images_and_refuses_one_more():
    assert len(parse_images_request({"prompt": "x", "n": MAX_IMAGES_PER_REQUEST}, GatewaySettings()).images) \
        == MAX_IMAGES_PER_REQUEST
    with pytest.raises(FieldError) as caught:
        parse_images_request({"prompt": "x", "n": MAX_IMAGES_PER_REQUEST + 1}, GatewaySettings())
    assert caught.value.field == "n"


# ------------------------------------------------------------------------------- the OpenAPI document


def schemas() -> dict:
    return openapi_document(GatewaySettings())["components"]["schemas"]


def test_the_generate_request_schema_states_the_table():
    request = schemas()["GenerateRequest"]
    props, d = request["properties"], GATEWAY_DEFAULTS
    assert props["prompt"]["maxLength"] == props["negative_prompt"]["maxLength"] == d.max_prompt_chars
    for side, default in (("width", d.default_width), ("height", d.default_height)):
        assert (props[side]["minimum"], props[side]["maximum"], props[side]["multipleOf"], props[side]["default"]) \
            == (d.min_image_side, d.max_image_side, IMAGE_SIDE_MULTIPLE, default)
    steps, guidance, seed = props["num_inference_steps"], props["guidance_scale"], props["seed"]
    assert (steps["minimum"], steps["maximum"], steps["default"]) \
        == (WIRE.inference_steps.low, d.max_inference_steps, d.default_steps)
    assert (guidance["minimum"], guidance["maximum"], guidance["default"]) \
        == (WIRE.guidance_scale.low, d.max_guidance_scale, d.default_guidance_scale)
    assert (seed["minimum"], seed["maximum"]) == (WIRE.seed.low, WIRE.seed.high)
    assert request["x-max-image-pixels"] == d.max_image_pixels


def test_the_generate_response_schema_states_the_table():
    props, d = schemas()["GenerateResponse"]["properties"], GATEWAY_DEFAULTS
    for side in ("width", "height"):
        assert (props[side]["minimum"], props[side]["maximum"], props[side]["multipleOf"]) \
            == (d.min_image_side, d.max_image_side, IMAGE_SIDE_MULTIPLE)
    assert (props["num_inference_steps"]["minimum"], props["num_inference_steps"]["maximum"]) \
        == (WIRE.inference_steps.low, d.max_inference_steps)
    assert (props["guidance_scale"]["minimum"], props["guidance_scale"]["maximum"]) \
        == (WIRE.guidance_scale.low, d.max_guidance_scale)
    assert (props["seed"]["minimum"], props["seed"]["maximum"]) == (WIRE.seed.low, WIRE.seed.high)


def test_the_openai_request_schema_states_the_table():
    all_schemas, d = schemas(), GATEWAY_DEFAULTS
    props = all_schemas["ImagesRequest"]["properties"]
    assert props["prompt"]["maxLength"] == props["negative_prompt"]["maxLength"] == d.max_prompt_chars
    assert (props["n"]["minimum"], props["n"]["maximum"]) == (1, MAX_IMAGES_PER_REQUEST)
    assert all_schemas["ImagesResponse"]["properties"]["data"]["maxItems"] == MAX_IMAGES_PER_REQUEST
    assert props["size"]["default"] == f"{d.default_width}x{d.default_height}"
    assert (props["num_inference_steps"]["minimum"], props["num_inference_steps"]["maximum"],
            props["num_inference_steps"]["default"]) == (WIRE.inference_steps.low, d.max_inference_steps,
                                                         d.default_steps)
    assert (props["guidance_scale"]["minimum"], props["guidance_scale"]["maximum"],
            props["guidance_scale"]["default"]) == (WIRE.guidance_scale.low, d.max_guidance_scale,
                                                    d.default_guidance_scale)
    assert (props["seed"]["minimum"], props["seed"]["maximum"]) == (WIRE.seed.low, WIRE.seed.high)


# ------------------------------------------------------------------------------- the web page


def test_the_web_page_form_starts_from_the_default_bounds():
    """gateway/static/index.html is a static file (no template): its form's limits are copies, kept
    equal to the defaults here."""
    html = Path(INDEX_HTML).read_text(encoding="utf-8")
    prompt = re.search(r'<textarea id="prompt"[^>]*>', html)[0]
    assert f'maxlength="{GATEWAY_DEFAULTS.max_prompt_chars}"' in prompt
    steps = re.search(r'<input id="steps"[^>]*>', html)[0]
    assert f'min="{WIRE.inference_steps.low}"' in steps
    assert f'max="{GATEWAY_DEFAULTS.max_inference_steps}"' in steps
    assert f'value="{GATEWAY_DEFAULTS.default_steps}"' in steps
    sizes = [tuple(map(int, size)) for size in re.findall(r'<option value="(\d+)x(\d+)"', html)]
    assert sizes, "the page offers image sizes"
    for width, height in sizes:
        for side in (width, height):
            assert side % IMAGE_SIDE_MULTIPLE == 0
            assert GATEWAY_DEFAULTS.min_image_side <= side <= GATEWAY_DEFAULTS.max_image_side
        assert width * height <= GATEWAY_DEFAULTS.max_image_pixels
    selected = re.search(r'<option value="(\d+)x(\d+)" selected', html)
    assert (int(selected[1]), int(selected[2])) == (GATEWAY_DEFAULTS.default_width, GATEWAY_DEFAULTS.default_height)
