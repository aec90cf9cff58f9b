"""Live previews (gpu_worker/model/previews.py): the latent-to-RGB map, the encoded image, which steps and
rows get one, the fake backend's stand-in, and the PREVIEW message and the preview flag on the wire."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import replace

import msgpack
import numpy as np
import PIL.Image
import pytest
import torch

from gpu_worker.decisions.preemption import Preemption
from gpu_worker.model import previews
from gpu_worker.model.fake_backend import FakeBackend
from gpu_worker.model.pipelines import GenerationJob
from gpu_worker.model.previews import LATENT_RGB, LatentPreviewer, PreviewPlan, latents_to_rgb
from imagegen.batch_key import BatchKey
from imagegen.protocol import (
    WORKER_LINK,
    Command,
    GenerationParams,
    Generate,
    Preview,
    ProtocolError,
    decode,
    encode,
)


def decoded(image: bytes) -> PIL.Image.Image:
    picture = PIL.Image.open(io.BytesIO(image))
    picture.load()
    return picture


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_latents_become_uint8_rgb_at_the_latent_resolution(architecture):
    latents = torch.randn(3, 4, 16, 24, generator=torch.Generator().manual_seed(1)) * 3  # far outside [-1, 1] too
    rgb = latents_to_rgb(latents, architecture)
    assert rgb.shape == (3, 16, 24, 3) and rgb.dtype == torch.uint8
    assert rgb.min() == 0 and rgb.max() == 255  # clamped, not wrapped
    assert len(torch.unique(rgb)) > 100  # a picture, not a flat colour


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_an_all_zero_latent_gives_the_bias_colour(architecture):
    rgb = latents_to_rgb(torch.zeros(2, 4, 8, 8), architecture)
    bias = torch.tensor(LATENT_RGB[architecture][1])
    expected = ((bias + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(rgb, expected.expand(2, 8, 8, 3))
    if architecture == "sdxl":
        assert expected.tolist() == [141, 125, 127]


def test_the_map_is_the_published_linear_one():
    latent = torch.tensor([0.5, -0.25, 0.125, -0.5]).reshape(1, 4, 1, 1)
    factors, bias = (torch.tensor(part) for part in LATENT_RGB["sdxl"])
    expected = ((latent.reshape(4) @ factors + bias).clamp(-1, 1) + 1) * 127.5
    assert latents_to_rgb(latent, "sdxl").reshape(3).tolist() == expected.round().to(torch.uint8).tolist()


def test_each_row_depends_only_on_its_own_latent_and_rows_are_chosen_by_index():
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    whole = latents_to_rgb(latents, "sd15")
    changed = latents.clone()
    changed[1] = torch.randn(4, 8, 8, generator=generator)
    other = latents_to_rgb(changed, "sd15")
    assert torch.equal(whole[[0, 2, 3]], other[[0, 2, 3]]) and not torch.equal(whole[1], other[1])
    assert torch.equal(latents_to_rgb(latents, "sd15", rows=[3, 1]), whole[[3, 1]])
    assert torch.equal(latents_to_rgb(latents[2:3], "sd15"), whole[2:3])  # alone = in its batch


def test_an_unknown_family_or_shape_is_refused():
    with pytest.raises(ValueError, match="no latent-to-RGB map"):
        latents_to_rgb(torch.zeros(1, 4, 8, 8), "flux")
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        latents_to_rgb(torch.zeros(1, 16, 8, 8), "sdxl")


@pytest.mark.parametrize("side", [8, 128])
def test_the_encoded_preview_decodes_to_an_image_of_the_latent_size(side):
    pixels = latents_to_rgb(torch.randn(1, 4, side, side // 2), "sdxl")[0].numpy()
    image = previews.encode_preview(pixels)
    picture = decoded(image)
    assert picture.format == previews.PREVIEW_FORMAT and picture.size == (side // 2, side) and picture.mode == "RGB"
    if side == 128:
        assert len(image) < 16 * 1024  # small: a JPEG, not a PNG of noise
    flat = previews.encode_preview(np.full((16, 16, 3), (200, 40, 90), np.uint8))
    assert np.abs(np.asarray(decoded(flat)).astype(int) - (200, 40, 90)).max() <= 3


def plan(rows=(0,), every=5, steps=25, unwanted=frozenset()):
    got: list = []
    return PreviewPlan(tuple(rows), every, steps, lambda step, images: got.append((step, images)),
                       unwanted=lambda: unwanted), got


def test_previews_are_due_every_n_steps_never_at_the_last_and_once_per_step():
    p, _ = plan(every=5, steps=25)
    assert [step for step in range(0, 27) if p.due(step)] == [5, 10, 15, 20] == previews.due_steps(25, 5)
    assert not p.due(5)  # already made
    p, _ = plan(every=5, steps=4)
    assert not any(p.due(step) for step in range(6))
    p, _ = plan(every=1, steps=3)
    assert [step for step in range(5) if p.due(step)] == [1, 2]
    with pytest.raises(ValueError):
        plan(every=0)


def test_the_previewer_sends_the_rows_that_asked_and_are_still_wanted_in_step_order():
    unwanted: set[int] = set()
    got: list = []
    p = PreviewPlan((0, 2, 3), 2, 6, lambda step, images: got.append((step, images)), unwanted=lambda: unwanted)
    previewer = LatentPreviewer(p, "sd15")
    latents = torch.randn(4, 4, 8, 8)
    for step in range(1, 7):
        if step == 3:
            unwanted.add(2)
        previewer.on_step_end(step, latents)
    previewer.finish()
    assert [(step, [row for row, _ in images]) for step, images in got] == [(2, [0, 2, 3]), (4, [0, 3])]
    for _, images in got:
        for _, image in images:
            assert decoded(image).size == (8, 8)
    assert p.images == 5 and p.seconds > 0


def test_the_previewer_applies_prepare_to_the_chosen_rows_only():
    seen: list = []
    p, got = plan(rows=(1,), every=1, steps=2)

    def prepare(rows: torch.Tensor) -> torch.Tensor:
        seen.append(rows.shape[0])
        return rows * 0  # the bias colour
    LatentPreviewer(p, "sd15").on_step_end(1, torch.randn(3, 4, 8, 8), prepare)
    assert seen == [1]
    assert np.abs(np.asarray(decoded(got[0][1][0][1])).astype(int) - 128).max() <= 2


def test_the_fake_backend_sends_flat_previews_for_the_rows_that_asked():
    p, got = plan(rows=(1,), every=2, steps=5)
    preemption = Preemption(None, lambda: 0.0, rows=2, steps=5, previews=p)
    jobs = [GenerationJob("a", None, 1), GenerationJob("b", None, 2)]
    FakeBackend().generate(jobs, BatchKey(64, 32, 5, 7.5), preemption=preemption)
    assert [(step, [row for row, _ in images]) for step, images in got] == [(2, [1]), (4, [1])]
    assert decoded(got[0][1][0][1]).size == (8, 4)
    p, got = plan(rows=(), every=1, steps=5)  # nobody asked: nothing, and no step loop needed
    FakeBackend().generate(jobs, BatchKey(64, 32, 5, 7.5), preemption=Preemption(None, lambda: 0.0, previews=p))
    assert got == []


def test_the_preview_message_carries_one_payload_frame():
    frames = encode(WORKER_LINK, Preview("r1", 5, 25), [b"\xff\xd8jpeg"])
    assert frames[1] == Command.PREVIEW.value
    message, payload = decode(frames, WORKER_LINK)
    assert message == Preview("r1", 5, 25) and payload == [b"\xff\xd8jpeg"]
    with pytest.raises(ProtocolError, match="payload"):
        decode(encode(WORKER_LINK, Preview("r1", 5, 25)), WORKER_LINK)
    with pytest.raises(ProtocolError):
        decode(encode(WORKER_LINK, Preview("r1", 0, 25), [b"x"]), WORKER_LINK)  # steps count from 1


def test_the_preview_flag_is_off_by_default_travels_and_does_not_split_batches():
    params = GenerationParams("a cat", 512, 512, 25, 7.5, 1)
    assert params.preview is False
    asked = replace(params, preview=True)
    message, _ = decode(encode(WORKER_LINK, Generate("r1", asked, 30.0)), WORKER_LINK)
    assert message.params.preview is True
    assert BatchKey.of(asked) == BatchKey.of(params)
    # a sender of an older build sends no such field: off
    header = dataclasses.asdict(Generate("r1", params, 30.0))
    del header["params"]["preview"]
    old, _ = decode([WORKER_LINK, Command.GENERATE.value, msgpack.packb(header)], WORKER_LINK)
    assert old.params.preview is False


# ------------------------------------------------------------------ the broker passes previews on


def broker_with_one_request():
    from broker.state import BrokerPolicy, BrokerState
    from imagegen.protocol import BatchingConfig, Register

    s = BrokerState(BrokerPolicy(), epoch="epoch-1")
    for routing_id, name in ((b"w1", "w1"), (b"w2", "w2")):
        s.register(routing_id, Register(name, "host-a", 0, 1000, "tiny", "cpu", 1, BatchingConfig(
            True, 8, 5.0, 1, 0.5, True, 10)), 100.0)
    s.submit(b"gateway-1", Generate("r1", GenerationParams("a cat", 512, 512, 25, 7.5, 1, preview=True), 600.0), 100.0)
    holder = next(w for w in s.workers.values() if w.in_flight).routing_id
    return s, holder, (b"w2" if holder == b"w1" else b"w1")


def test_the_broker_passes_a_preview_to_the_requests_client_as_it_came_and_counts_it_as_progress():
    from broker.state import ToClient, ToWorker
    from broker.stats import build_stats

    s, holder, other = broker_with_one_request()
    actions = s.preview(holder, Preview("r1", 5, 25), 130.0)
    assert [(a.client_id, a.message) for a in actions if isinstance(a, ToClient)] == [(b"gateway-1", Preview("r1", 5, 25))]
    assert s.workers[holder].last_progress == 130.0  # the progress deadline counts from here
    assert s.preview(other, Preview("r1", 10, 25), 131.0) == []  # not its request
    assert [type(a) for a in s.preview(b"nobody", Preview("r1", 10, 25), 131.0)] == [ToWorker]
    assert s.counters.previews_forwarded == 1 == build_stats(s, 132.0)["broker"]["previews_forwarded"]


def test_a_preview_travels_to_the_gateway_with_its_payload():
    from imagegen.protocol import CLIENT_LINK

    message, payload = decode(encode(CLIENT_LINK, Preview("r1", 5, 25), [b"jpeg"]), CLIENT_LINK)
    assert message == Preview("r1", 5, 25) and payload == [b"jpeg"]
