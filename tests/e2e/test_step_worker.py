"""The worker under BATCH_POLICY=step (gpu_worker/shell/step_loop.py) with real processes: a broker, a
gateway and a worker running the real tiny pipeline on the CPU (a step takes about a tenth of a
second).

* requests of different step counts and guidance scales, sent together, share the steps of one
  cohort, and each image equals the one run-to-completion draws for the same request;
* a request that arrives while another runs joins it: the two jobs' progress (the job API's status
  and event stream) shows each its own step; cancelling the first frees its row: the second's last
  steps run alone;
* a high-priority request that arrives while a normal one runs pauses it (job status and event
  ``paused`` at the step it reached) and runs alone; the normal one then resumes where it stopped;
* a worker told BATCH_POLICY=step with the fake backend (no step engine) refuses to start, saying why.

No test asserts a duration: each waits for what must happen."""

from __future__ import annotations

import io
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest

from tests.e2e.test_jobs import delete, job, read_events, submit, wait_for_job, wait_for_worker_log
from tests.support.cluster import Cluster, call

pytestmark = pytest.mark.timeout(300)

TINY = {"MODEL_ID": "tiny", "LOG_LEVEL": "DEBUG", "WORKER_WARMUP": "0", "MAX_INFERENCE_STEPS": "1000", "PROGRESS_EVENT_INTERVAL_S": "0",
        "MAX_BATCH_SIZE": "8", "REQUEST_TIMEOUT_S": "240"}
# A pixel of one image may differ by this much between a lone run and a run in a batch: the UNet
# sums a batch in another order (tests/integration/test_step_engine.py bounds the latents).
PIXEL_TOLERANCE = 2

MIXED = [  # (steps, guidance): three step counts, with and without classifier-free guidance
    (6, 7.5),
    (10, 1.0),
    (8, 3.0),
]


def body(seed: int, steps: int, guidance: float, size: int = 64) -> dict:
    return {"prompt": f"step request {seed}", "width": size, "height": size, "num_inference_steps": steps,
            "guidance_scale": guidance, "seed": seed}


def image(answer: dict) -> np.ndarray:
    with urllib.request.urlopen(answer["image_url"], timeout=30) as response:
        picture = PIL.Image.open(io.BytesIO(response.read()))
        picture.load()
    return np.asarray(picture.convert("RGB")).astype(int)


def generate(c: Cluster, request: dict) -> dict:
    status, answer, _ = call(c.url, "/generate", request, timeout_s=240)
    assert status == 200, (answer, c.logs())
    return answer


def test_mixed_steps_and_guidance_share_a_cohort_and_draw_run_to_completions_images(make_cluster):
    step = make_cluster(**TINY, BATCH_POLICY="step").start_all(1, timeout_s=120)
    requests = [body(seed, steps, guidance) for seed, (steps, guidance) in enumerate(MIXED, 1)]
    with ThreadPoolExecutor(len(requests)) as pool:
        step_answers = list(pool.map(lambda request: generate(step, request), requests))
    step_images = [image(answer) for answer in step_answers]
    step.stop()
    # They arrived within milliseconds: one cohort, whatever their steps and guidance.
    assert len({answer["batch_id"] for answer in step_answers}) == 1, (step_answers, step.logs())
    # Each row's last step had only the rows with at least as many steps: 6 steps with all three,
    # 8 with two, 10 alone.
    by_steps = {answer["num_inference_steps"]: answer["batch_size"] for answer in step_answers}
    assert by_steps == {6: 3, 8: 2, 10: 1}, (step_answers, step.logs())

    whole = make_cluster(**TINY, BATCH_POLICY="run-to-completion").start_all(1, timeout_s=120)
    whole_answers = [generate(whole, request) for request in requests]  # one at a time: each alone
    for request, made_by_steps, drawn, made_whole in zip(requests, step_answers, step_images, whole_answers):
        assert made_whole["batch_size"] == 1
        assert made_by_steps["seed"] == made_whole["seed"] == request["seed"]
        difference = np.abs(drawn - image(made_whole))
        assert difference.max() <= PIXEL_TOLERANCE, (request, difference.max(), difference.mean())


@pytest.mark.timeout(900)  # a loaded 2-core machine ran the newcomer's 200 steps at under 2 a second
def test_a_newcomer_joins_the_running_row_at_its_own_step_and_a_cancel_frees_the_row(make_cluster):
    c = make_cluster(**TINY, BATCH_POLICY="step").start_all(1, timeout_s=120)
    # Step counts long enough for the polls below to see both running whether a step takes 10 ms
    # or 200 ms of this machine's CPU. The newcomer joins while the merge pays: with costs linear in
    # the rows, while the long one has more than twice the newcomer's steps left (more than 400 of
    # 900), however slowly this machine lets the test send it.
    long = submit(c, body(1, steps=900, guidance=7.5))
    first = wait_for_job(c, long["id"], lambda d: d["status"] == "running" and d["progress"]["step"] >= 1,
                         "running", timeout_s=120)
    short = submit(c, body(2, steps=200, guidance=7.5))
    # The newcomer joins the running row (a short request behind a long one: the merge pays) and
    # starts at its own step 0, while the long one is past its own.
    running = wait_for_job(c, short["id"], lambda d: d["status"] == "running" and d["progress"]["step"] >= 1,
                           "running", timeout_s=120)
    assert job(c, long["id"])["status"] == "running", c.logs()
    # The heartbeat reports both rows running, none queued.
    c.wait_for(lambda stats: (stats["worker"]["running"], stats["worker"]["current_queue_depth"]) == (2, 0), 60,
               "the worker's heartbeat reporting two running rows")
    status, cancelled = delete(c, long["id"])
    assert status == 200 and cancelled["status"] == "cancelled", cancelled
    done = wait_for_job(c, short["id"], lambda d: d["status"] in ("succeeded", "failed", "cancelled"), "finished",
                        timeout_s=600)
    assert done["status"] == "succeeded", (done, c.logs())
    long_events, short_events = read_events(long["events_url"]), read_events(short["events_url"])
    assert long_events[-1][1] == "cancelled"
    # The newcomer's step 0 is its "started" event: it started in a step of two rows, the long one's,
    # which had reported a step of its own before the newcomer was even sent: each row at its own step.
    started = [data for _, kind, data in short_events if kind == "started"]
    assert len(started) == 1 and started[0]["batch_size"] == 2, short_events
    assert first["progress"]["step"] >= 1 and running["progress"]["step"] >= 1
    long_steps = [data["step"] for _, kind, data in long_events if kind == "progress"]
    assert long_steps and long_steps == sorted(long_steps) and max(long_steps) < 900, long_steps
    short_steps = [data["step"] for _, kind, data in short_events if kind == "progress"]
    assert short_steps == sorted(short_steps) and 0 < short_steps[0] and max(short_steps) < 200, short_steps
    # ...and once the long one was cancelled, its row left: the short one's last step ran alone.
    assert done["result"]["batch_size"] == 1, done
    log = (c.dir / "worker0.log").read_text(errors="replace")
    assert "cancelled: dropped at step" in log, c.logs()


def test_a_high_priority_arrival_pauses_the_running_row_which_says_so_and_resumes_where_it_stopped(make_cluster):
    c = make_cluster(**TINY, BATCH_POLICY="step").start_all(1, timeout_s=120)
    normal = submit(c, body(1, steps=600, guidance=7.5))
    wait_for_job(c, normal["id"], lambda d: d["status"] == "running" and d["progress"]["step"] >= 1, "running",
                 timeout_s=120)
    urgent = submit(c, {**body(2, steps=20, guidance=7.5), "priority": "high"})
    # No step costs say the normal row would ride free: it waits, latents kept, while the high one runs.
    paused = wait_for_job(c, normal["id"], lambda d: d["status"] == "paused", "paused", timeout_s=120)
    done = wait_for_job(c, urgent["id"], lambda d: d["status"] in ("succeeded", "failed", "cancelled"), "finished",
                        timeout_s=120)
    assert done["status"] == "succeeded" and done["result"]["batch_size"] == 1, (done, c.logs())
    resumed = wait_for_job(c, normal["id"], lambda d: d["status"] == "running", "running again", timeout_s=120)
    status, cancelled = delete(c, normal["id"])
    assert status == 200 and cancelled["status"] == "cancelled", cancelled
    events = read_events(normal["events_url"])
    kinds = [kind for _, kind, _ in events]
    assert kinds.count("paused") == 1 and kinds.count("resumed") == 1 and "restarted" not in kinds, kinds
    paused_at = next(data["step"] for _, kind, data in events if kind == "paused")
    resumed_at = next(data["step"] for _, kind, data in events if kind == "resumed")
    assert 1 <= paused_at == paused["progress"]["step"] <= resumed_at <= resumed["progress"]["step"], events
    # No step ran for it while it was paused: the steps before the pause, the steps after the resume.
    steps = [data["step"] for _, kind, data in events if kind in ("progress", "paused", "resumed")]
    assert steps == sorted(steps), steps
    assert resumed_at <= paused_at + 1, (paused_at, resumed_at)
    assert resumed["attempt"] == 1


def test_cancelling_the_only_running_row_frees_its_memory_on_the_device(make_cluster):
    c = make_cluster(**TINY, BATCH_POLICY="step").start_all(1, timeout_s=120)
    alone = submit(c, body(1, steps=600, guidance=7.5))
    wait_for_job(c, alone["id"], lambda d: d["status"] == "running" and d["progress"]["step"] >= 1, "running",
                 timeout_s=120)
    status, cancelled = delete(c, alone["id"])
    assert status == 200 and cancelled["status"] == "cancelled", cancelled
    # Nothing else to run: the plan is idle, and the row still leaves the engine (LOG_LEVEL=DEBUG).
    wait_for_worker_log(c, "dropped 1 rows from the step engine; 0 rows left in it", timeout_s=60)
    assert "cancelled: dropped at step" in (c.dir / "worker0.log").read_text(errors="replace")


def test_a_drained_worker_finishes_its_running_row_with_its_previews(make_cluster):
    c = make_cluster(**TINY, BATCH_POLICY="step", PREVIEW_EVERY_STEPS="25").start_all(1, timeout_s=120)
    running = submit(c, {**body(1, steps=100, guidance=7.5), "preview": True})  # long enough to see it run
    wait_for_job(c, running["id"], lambda d: d["status"] == "running" and d["progress"]["step"] >= 1, "running",
                 timeout_s=120)
    c.signal("worker0", signal.SIGTERM)
    # A loaded 2-core machine takes minutes for the rest of the steps: the wait is generous, not a measure.
    done = wait_for_job(c, running["id"], lambda d: d["status"] in ("succeeded", "failed", "cancelled"),
                        "finished", timeout_s=240)
    assert done["status"] == "succeeded", (done, c.logs())
    events = read_events(running["events_url"])
    previews = [data for _, kind, data in events if kind == "preview"]
    assert [(data["step"], data["steps"]) for data in previews] == [(25, 100), (50, 100), (75, 100)], events
    assert all(data["image"].startswith("data:image/jpeg;base64,") for data in previews)
    assert c.processes["worker0"].wait(timeout=60) == 0, c.logs()


def test_the_fake_backend_has_no_step_engine_and_the_worker_says_so(make_cluster):
    c = make_cluster(MODEL_ID="fake", BATCH_POLICY="step")
    worker = c.start_worker(0)
    assert worker.wait(timeout=60) == 2
    log = (c.dir / "worker0.log").read_text(errors="replace")
    assert "BATCH_POLICY=step needs a model with a step-level engine" in log, log
    assert "BATCH_POLICY=run-to-completion" in log, log
