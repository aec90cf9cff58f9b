"""gpu_worker/decisions/sizes.py: the sizes served, what happens to others, and the warm-up plan."""

from __future__ import annotations

import pytest

from gpu_worker.config import WorkerSettings
from gpu_worker.decisions.batcher import BatchPolicyConfig
from gpu_worker.decisions.sizes import (
    BUCKETS,
    SizeRule,
    WarmUpPlan,
    WarmUpUnit,
    batch_sizes_at,
    default_sizes,
    nearest_size,
    parse_sizes,
)
from gpu_worker.decisions.worker_state import Queued, SendFailure, UnlistedSize, WorkerState
from imagegen import settings as settings_lib
from imagegen.protocol import FailureCode, Generate, GenerationParams, ImageSize

SDXL = default_sizes("sdxl", 1024)


def sizes(text: str) -> tuple[ImageSize, ...]:
    parsed = parse_sizes(text)
    assert parsed is not None
    return parsed


def test_the_default_sizes_are_each_familys_buckets_at_its_native_size():
    assert [str(size) for size in SDXL] == ["1024x1024", "1152x896", "896x1152", "1216x832", "832x1216",
                                            "1344x768", "768x1344", "1536x640", "640x1536"]
    assert [str(size) for size in default_sizes("sd15", 512)] == ["512x512", "512x768", "768x512", "576x448",
                                                                  "448x576"]


def test_a_model_of_another_native_size_gets_the_same_shapes_at_its_scale():
    # The built-in tiny model draws 64 x 64: SD-1.5's buckets an eighth of the size, sides multiples of 8.
    assert [str(size) for size in default_sizes("sd15", 64)] == ["64x64", "64x96", "96x64", "72x56", "56x72"]
    scaled = default_sizes("sdxl", 64)
    assert scaled[0] == ImageSize(64, 64) and len(set(scaled)) == len(scaled)
    assert all(size.width % 8 == 0 and size.height % 8 == 0 for size in scaled)


def test_an_unknown_architecture_serves_its_native_square():
    assert default_sizes("fake", 64) == (ImageSize(64, 64),)


@pytest.mark.parametrize("text, expected", [
    ("auto", None), (" AUTO ", None),
    ("1024x1024", (ImageSize(1024, 1024),)),
    ("1024x1024, 1152X896,1024x1024", (ImageSize(1024, 1024), ImageSize(1152, 896))),
])
def test_sizes_parse(text, expected):
    assert parse_sizes(text) == expected


@pytest.mark.parametrize("text, error", [
    ("1024", "is not WIDTHxHEIGHT"), ("axb", "is not WIDTHxHEIGHT"), ("1004x1024", "multiple of 8"),
    ("0x8", "multiple of 8"), ("16384x8", "between 8 and 8192"), (",", "lists no size"),
    (",".join(f"{8 * n}x8" for n in range(1, 66)), "at most 64"),
])
def test_malformed_sizes_say_what_is_wrong(text, error):
    with pytest.raises(ValueError, match=error):
        parse_sizes(text)


def test_the_setting_refuses_a_malformed_list_at_start():
    with pytest.raises(settings_lib.SettingsError, match="SIZES: '1024' is not WIDTHxHEIGHT"):
        settings_lib.load(WorkerSettings, [], {"SIZES": "1024"})
    with pytest.raises(settings_lib.SettingsError, match="UNLISTED_SIZE: must be one of eager, refuse, snap"):
        settings_lib.load(WorkerSettings, [], {"UNLISTED_SIZE": "crop"})


@pytest.mark.parametrize("width, height, expected", [
    (1024, 1024, ImageSize(1024, 1024)), (1000, 1000, ImageSize(1024, 1024)), (2048, 2048, ImageSize(1024, 1024)),
    (1920, 1080, ImageSize(1344, 768)), (1080, 1920, ImageSize(768, 1344)), (2000, 800, ImageSize(1536, 640)),
    (1200, 900, ImageSize(1152, 896)),
])
def test_snap_picks_the_nearest_aspect_ratio_then_area(width, height, expected):
    assert nearest_size(width, height, SDXL) == expected


def test_the_rule_runs_listed_sizes_as_asked_and_applies_unlisted_size_to_others():
    assert SizeRule(SDXL, "refuse").decide(1152, 896).refusal is None
    eager = SizeRule(SDXL, "eager").decide(1000, 1000)
    assert eager.unlisted and eager.size is None and eager.refusal is None
    refused = SizeRule(SDXL, "refuse").decide(1000, 1000)
    assert refused.refusal.startswith("1000x1000 is not a size this service draws; ask for one of 1024x1024, ")
    assert SizeRule(SDXL, "snap").decide(1000, 1000).size == ImageSize(1024, 1024)
    assert not SizeRule((), "refuse").decide(1000, 1000).unlisted  # nothing listed: everything as asked
    with pytest.raises(ValueError, match="UNLISTED_SIZE must be one of"):
        SizeRule(SDXL, "crop")


def generate(request_id: str, width: int, height: int) -> Generate:
    params = GenerationParams(prompt="p", width=width, height=height, num_inference_steps=2, guidance_scale=7.5,
                              seed=1)
    return Generate(request_id, params, deadline_s=60.0)


def state(unlisted: str) -> WorkerState:
    return WorkerState(BatchPolicyConfig(max_batch_size=4), sizes=SizeRule(sizes("64x64,64x96"), unlisted))


def test_a_refused_size_fails_at_once_and_is_never_queued():
    worker = state("refuse")
    actions = worker.accept(generate("r1", 96, 96), now=0.0)
    assert actions[0] == UnlistedSize("r1", "refused")
    failure = actions[1]
    assert isinstance(failure, SendFailure) and failure.code is FailureCode.SIZE_NOT_SERVED
    assert "ask for one of 64x64, 64x96" in failure.text
    assert worker.queue_depth == 0


def test_a_snapped_request_is_queued_at_the_listed_size():
    worker = state("snap")
    actions = worker.accept(generate("r1", 64, 104), now=0.0)
    assert actions[0] == UnlistedSize("r1", "snapped", ImageSize(64, 96))
    queued = next(action for action in actions if isinstance(action, Queued))
    assert (queued.request.params.width, queued.request.params.height) == (64, 96)
    batch = worker.start_batch(now=100.0)
    assert (batch.key.width, batch.key.height) == (64, 96)


def test_an_unlisted_size_runs_eager_as_asked_and_is_noted():
    worker = state("eager")
    actions = worker.accept(generate("r1", 96, 96), now=0.0)
    assert actions[0] == UnlistedSize("r1", "eager")
    assert worker.start_batch(now=100.0).key.width == 96
    assert not any(isinstance(action, UnlistedSize) for action in worker.accept(generate("r2", 64, 96), now=2.0))


@pytest.mark.parametrize("max_batch, pixels, graphs, expected", [
    (4, None, 0, [4, 1, 2, 3]),
    (4, None, 4, [1, 2, 3, 4]),
    (8, 4 * 1024 * 1024, 0, [4, 1, 2, 3]),  # the pixel budget of 4 native images at 1024²
    (8, 4 * 1024 * 1024 - 1, 0, [3, 1, 2]),
])
def test_the_batch_sizes_that_warm_a_size_respect_the_pixel_budget(max_batch, pixels, graphs, expected):
    assert batch_sizes_at(ImageSize(1024, 1024), max_batch, pixels, graphs) == expected


def plan(max_defer_s: float = 30.0) -> WarmUpPlan:
    listed = sizes("64x64,64x96,96x64")
    return WarmUpPlan.after_first(listed, listed[0], lambda size: [2, 1], max_defer_s, now=0.0)


def run_all(warm: WarmUpPlan, now: float) -> list[WarmUpUnit]:
    ran = []
    while (unit := warm.next_unit(now, queue_empty=True)) is not None:
        ran.append(unit)
        warm.unit_done(unit, now)
    return ran


def test_the_plan_warms_every_other_size_unit_by_unit_while_the_queue_is_empty():
    warm = plan()
    assert warm.state == "warming" and warm.warm == [ImageSize(64, 64)]
    ran = run_all(warm, now=1.0)
    assert [(str(unit.size), unit.batch_size) for unit in ran] == [("64x96", 2), ("64x96", 1), ("96x64", 2),
                                                                   ("96x64", 1)]
    assert warm.state == "warm" and warm.warm == list(sizes("64x64,64x96,96x64"))
    assert warm.next_unit(2.0, queue_empty=True) is None and warm.next_due_at() is None


def test_a_size_is_warm_only_once_every_batch_size_has_run():
    warm = plan()
    unit = warm.next_unit(1.0, queue_empty=True)
    assert warm.unit_done(unit, 1.0) is False and not warm.is_warm(unit.size)
    assert warm.unit_done(warm.next_unit(1.0, queue_empty=True), 1.0) is True and warm.is_warm(unit.size)


def test_with_requests_queued_a_unit_waits_until_the_last_is_max_defer_s_old():
    warm = plan(max_defer_s=30.0)
    assert warm.next_unit(29.9, queue_empty=False) is None
    assert warm.next_due_at() == 30.0
    unit = warm.next_unit(30.0, queue_empty=False)
    assert unit is not None
    warm.unit_done(unit, 31.0)
    assert warm.next_unit(60.9, queue_empty=False) is None and warm.next_unit(61.0, queue_empty=False) is not None


def test_a_size_requests_ask_for_is_warmed_next():
    warm = plan()
    warm.note_demand(ImageSize(96, 64))
    assert warm.next_unit(1.0, queue_empty=True).size == ImageSize(96, 64)
    warm.note_demand(ImageSize(64, 96))  # the size being warmed is finished first
    assert warm.next_unit(1.0, queue_empty=True).size == ImageSize(96, 64)


def test_a_size_whose_warm_up_fails_stays_eager_and_the_plan_goes_on():
    warm = plan()
    unit = warm.next_unit(1.0, queue_empty=True)
    warm.unit_failed(unit, 2.0)
    assert warm.failed == [unit.size] and not warm.is_warm(unit.size)
    ran = run_all(warm, now=3.0)
    assert {unit.size for unit in ran} == {ImageSize(96, 64)} and warm.state == "warm"


def test_every_bucket_table_lists_its_native_square_first():
    assert all(buckets[0][0] == buckets[0][1] for buckets in BUCKETS.values())
