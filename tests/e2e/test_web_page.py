"""The web page at GET / (gateway/static/index.html), end to end in headless Chromium.

Debian's Chromium (/usr/bin/chromium) driven by Playwright's Python driver; Playwright never
downloads a browser here. The page talks to a real cluster of processes (tests/support/cluster.py:
broker, two gateways, workers on the FAKE image backend, since the page and the serving layer are
under test, not a model): one gateway is open, the other needs an API key. The page makes images
through the job API: each job has a card with its queue state, a progress bar fed by the job's
event stream, previews when asked for, the image, and a Cancel button.

Without /usr/bin/chromium the tests are skipped, except under CI (CI=true), where .ci/run installs
it and a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request

import pytest

from gateway.config import GatewaySettings
from tests.support.cluster import Cluster, call
from tests.support.fake_brokers import RecordingFakeBroker
from tests.support.gateway import start_client
from tests.support.paths import REPO
from tests.support.procs import free_port, get_json

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying to reach Google on a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
API_KEY = "page-key-0123456789abcdef"
WAIT_MS = 20_000


async def test_page_is_served_without_a_key_and_loads_nothing_from_other_sites(tmp_path):
    settings = GatewaySettings(image_dir=str(tmp_path / "images"), api_keys=(API_KEY,))
    client = await start_client(settings, RecordingFakeBroker())
    try:
        response = await client.get("/")
        assert response.status == 200 and response.content_type == "text/html"
        html = await response.text()
        assert (await client.head("/")).status == 200
        assert (await client.get("/stats")).status == 401  # only the page is exempt
    finally:
        await client.close()
    assert 'id="prompt"' in html and 'id="queue-depth"' in html and 'id="gpus"' in html
    # Offline: no script, style, image or font from another origin.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must be self-contained"
    assert "@import" not in html and "url(" not in html


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; under CI the browser test must run")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright  # the test extra has it

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def cluster(make_module_cluster):
    """Broker, one worker, and two gateways on it: ``c.url`` open, ``c.keyed_url`` with API keys."""
    # step_delay: denoising steps that take time, so a job's progress can be seen advancing.
    c = make_module_cluster(MODEL_ID="fake:delay=0.2,step_delay=0.2", MAX_BATCH_WAIT_TIME="0.05")
    keyed_port = free_port()
    c.keyed_url = f"http://127.0.0.1:{keyed_port}"
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    # Its own STATE_DIR: two gateways on one would share one identity (gateway/identity.py refuses it).
    c.start("gateway-keyed", "gateway", GATEWAY_PORT=str(keyed_port), GATEWAY_API_KEYS=API_KEY,
            STATE_DIR=str(c.dir / "state-keyed"))
    c.start_worker(0)
    c.wait_for_workers(1)
    deadline = time.monotonic() + 30
    while _status(f"{c.keyed_url}/healthz") != 200:
        assert time.monotonic() < deadline, c.logs()
        time.sleep(0.1)
    return c


def _status(url: str) -> int | None:
    try:
        return get_json(url, timeout_s=2)[0]
    except (OSError, ValueError):
        return None


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    context.close()


def generate_and_wait_for_image(page, prompt: str, size: str = "64x64") -> str:
    """Type a prompt, click Generate, wait until the image has loaded; returns its caption."""
    page.fill("#prompt", prompt)
    page.select_option("#size", size)
    page.fill("#steps", "2")
    page.click("#generate")
    width = int(size.split("x")[0])
    page.wait_for_function(f"""() => {{
        const img = document.querySelector("#gallery img.result");
        return img && img.complete && img.naturalWidth === {width};
    }}""", timeout=WAIT_MS)
    return page.inner_text("#gallery figcaption")


def gpu_lines(page) -> list[str]:
    return page.locator("#gpus li").all_inner_texts()


def test_prompt_to_image_with_live_stats_single_and_multi_gpu(page, cluster):
    response = page.goto(f"{cluster.url}/")
    assert response.status == 200 and "text/html" in response.headers["content-type"]
    page.wait_for_function("() => /^[0-9]+$/.test(document.querySelector('#queue-depth').textContent)",
                           timeout=WAIT_MS)
    assert re.fullmatch(r"GPU \(single worker\): \d+ batches, .*queue \d+.*", gpu_lines(page)[0]), gpu_lines(page)

    caption = generate_and_wait_for_image(page, "a red lighthouse on a cliff")
    assert re.search(r"64×64, 2 steps, seed \d+ · batch of \d+ on worker0", caption), caption
    assert page.inner_text("#status") == ""
    # The stats poll (every 1.5 s) catches up with the batch that made the image.
    page.wait_for_function("() => /[1-9][0-9]* batches/.test(document.querySelector('#gpus').textContent)",
                           timeout=WAIT_MS)

    # A second worker switches /stats to its multi-GPU shape: one line per GPU.
    cluster.start_worker(1)
    page.wait_for_function("() => document.querySelectorAll('#gpus li').length === 2", timeout=WAIT_MS)
    lines = gpu_lines(page)
    assert [line.split(" (")[0] for line in lines] == ["GPU 0", "GPU 1"], lines
    assert all(re.search(r"\d+ batches, avg size [0-9.]+, queue \d+", line) for line in lines), lines
    assert page.inner_text("#queue-depth").isdigit()
    assert page.errors == []


def test_page_needs_no_key_but_asks_for_one_and_keeps_it(page, cluster):
    response = page.goto(f"{cluster.keyed_url}/")
    assert response.status == 200  # GET / is exempt from API keys
    page.wait_for_function("() => document.querySelector('#stats-error').textContent.includes('API key')",
                           timeout=WAIT_MS)
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => /^[0-9]+$/.test(document.querySelector('#queue-depth').textContent)",
                           timeout=WAIT_MS)
    assert page.inner_text("#stats-error") == ""
    generate_and_wait_for_image(page, "a blue boat", size="128x128")
    page.reload()
    assert page.input_value("#api-key") == API_KEY  # kept in localStorage
    assert page.errors == []


def test_a_cpu_worker_is_shown_as_cpu(page, tmp_path_factory):
    """gpu_id -1 is a CPU worker: the page says CPU, not GPU, in its stats (both shapes) and captions."""
    c = Cluster(tmp_path_factory.mktemp("web-cpu"), MODEL_ID="fake:delay=0.1", MAX_BATCH_WAIT_TIME="0.05",
                PYTHONPATH=str(REPO))  # this checkout's code, whichever is installed
    try:
        c.start("broker", "broker")
        c.start("gateway", "gateway")
        c.start("cpu0", "gpu_worker", GPU_ID="-1", WORKER_NAME="cpu0")
        c.wait_for_workers(1)
        assert c.stats()["worker"]["gpu_id"] == -1
        page.goto(f"{c.url}/")
        page.wait_for_function("() => document.querySelectorAll('#gpus li').length === 1", timeout=WAIT_MS)
        assert re.fullmatch(r"CPU \(single worker\): \d+ batches, .*", gpu_lines(page)[0]), gpu_lines(page)
        caption = generate_and_wait_for_image(page, "a green kite")
        assert "on cpu0 (CPU)" in caption and "GPU" not in caption, caption

        c.start("cpu1", "gpu_worker", GPU_ID="-1", WORKER_NAME="cpu1")
        page.wait_for_function("() => document.querySelectorAll('#gpus li').length === 2", timeout=WAIT_MS)
        lines = gpu_lines(page)
        assert [line.split(" (")[0] for line in lines] == ["CPU", "CPU"], lines
        assert "GPU" not in page.inner_text("#gpus") + page.inner_text("#totals")
        assert page.errors == []
    finally:
        c.stop()


# ------------------------------------------------------------------------------- jobs on the page

# Records, in the page, every step value its newest card's progress bar shows and every state text,
# as they change (the test reads them afterwards, so nothing depends on polling fast enough).
WATCH_NEWEST_CARD = """() => {
    window.seen = { steps: [], states: [] };
    new MutationObserver(() => {
        const card = document.querySelector("#gallery .job");
        if (!card) return;
        const step = Number(card.dataset.step);
        if (seen.steps[seen.steps.length - 1] !== step) seen.steps.push(step);
        const state = card.querySelector(".job-state").textContent;
        if (seen.states[seen.states.length - 1] !== state) seen.states.push(state);
    }).observe(document.querySelector("#gallery"), { subtree: true, childList: true, attributes: true,
                                                     characterData: true });
}"""


def job_status(base_url: str, job_id: str, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(f"{base_url}/v1/jobs/{job_id}", headers=headers),
                                timeout=5) as response:
        return json.loads(response.read())


def submit(page, prompt: str, steps: int, preview: bool = False, size: str = "64x64") -> None:
    page.fill("#prompt", prompt)
    page.select_option("#size", size)
    page.fill("#steps", str(steps))
    page.set_checked("#preview", preview)
    page.click("#generate")


def test_a_job_card_shows_its_queue_state_progress_and_image(page, cluster):
    page.goto(f"{cluster.url}/")
    page.evaluate(WATCH_NEWEST_CARD)
    steps = 15  # 3 s of fake denoising: progress events come at most every 0.5 s
    submit(page, "a lighthouse, step by step", steps)
    page.wait_for_function("""() => {
        const img = document.querySelector("#gallery .job img.result");
        return img && img.complete && img.naturalWidth === 64;
    }""", timeout=WAIT_MS)
    card = page.locator("#gallery .job").first
    seen = page.evaluate("window.seen")
    # Queued first, then running; the bar advanced through steps before the last, never backwards.
    assert seen["states"][0] == "Submitting…" and any(s.startswith("Queued") for s in seen["states"]), seen
    assert any(s.startswith("Running on worker") for s in seen["states"]), seen
    assert seen["states"][-1].startswith("Done in"), seen
    positive = [step for step in seen["steps"] if step > 0]
    assert len(set(positive)) >= 2 and min(positive) < steps and positive[-1] == steps, seen
    assert positive == sorted(positive), seen
    assert card.locator("progress").get_attribute("value") == str(steps)
    assert card.locator("img.preview").is_hidden() and card.locator("button.cancel").is_hidden()
    assert re.search(r"64×64, 15 steps, seed \d+ · batch of \d+ on worker0", card.locator("figcaption").inner_text())
    assert job_status(cluster.url, card.get_attribute("data-job-id"))["status"] == "succeeded"
    assert page.inner_text("#status") == ""
    assert page.errors == []


def job_events(base_url: str, job_id: str) -> list[str]:
    """The types of a finished job's events (its stream sends them all, then ends)."""
    with urllib.request.urlopen(f"{base_url}/v1/jobs/{job_id}/events", timeout=10) as response:
        text = response.read().decode()
    return re.findall(r"^event: (\w+)$", text, flags=re.M)


def test_live_previews_are_shown_on_the_card_while_the_job_runs(page, cluster):
    page.goto(f"{cluster.url}/")
    # Every preview the card shows, as the browser decoded it.
    page.evaluate("""() => {
        window.previews = [];
        document.querySelector("#gallery").addEventListener("load", (event) => {
            if (event.target.matches("img.preview")) {
                previews.push({ width: event.target.naturalWidth, hidden: event.target.hidden,
                                title: event.target.title });
            }
        }, true);
    }""")
    submit(page, "a lighthouse, previewed", steps=15, preview=True)
    page.wait_for_function("""() => {
        const img = document.querySelector("#gallery .job img.result");
        return img && img.complete && img.naturalWidth === 64;
    }""", timeout=WAIT_MS)
    card = page.locator("#gallery .job").first
    assert "preview" in job_events(cluster.url, card.get_attribute("data-job-id"))
    previews = page.evaluate("window.previews")
    # Decoded (the browser knows its size), shown while the job ran, each of a step before the last.
    assert previews and all(p["width"] > 0 and not p["hidden"] for p in previews), previews
    steps = [int(re.fullmatch(r"preview at step (\d+) of 15", p["title"])[1]) for p in previews]
    assert steps == sorted(steps) and all(0 < step < 15 for step in steps), previews
    assert card.locator("img.preview").is_hidden()  # the image replaced it
    assert page.errors == []


def test_jobs_submitted_together_each_get_their_own_card(page, cluster):
    page.goto(f"{cluster.url}/")
    for index in range(3):
        submit(page, f"kite number {index}", steps=4)
    page.wait_for_function("""() => {
        const cards = document.querySelectorAll("#gallery .job");
        return cards.length === 3 && [...cards].every((card) => {
            const img = card.querySelector("img.result");
            return img && img.complete && img.naturalWidth === 64;
        });
    }""", timeout=WAIT_MS)
    cards = page.locator("#gallery .job")
    ids = {cards.nth(i).get_attribute("data-job-id") for i in range(3)}
    assert len(ids) == 3 and None not in ids
    # Newest first, each with its own prompt, bar and image.
    assert [cards.nth(i).locator(".job-prompt").inner_text() for i in range(3)] == \
        ["kite number 2", "kite number 1", "kite number 0"]
    assert all(cards.nth(i).get_attribute("data-status") == "succeeded" for i in range(3))
    assert page.inner_text("#status") == ""
    assert page.errors == []


def test_cancel_on_the_page_cancels_the_job_with_an_api_key(page, cluster):
    page.goto(f"{cluster.keyed_url}/")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    submit(page, "a slow sunset", steps=150)  # 30 s of fake steps: it is running when cancelled
    card = page.locator("#gallery .job").first
    page.wait_for_function("""() => {
        const card = document.querySelector("#gallery .job");
        return card && card.dataset.status === "running" && Number(card.dataset.step) > 0;
    }""", timeout=WAIT_MS)
    job_id = card.get_attribute("data-job-id")
    card.locator("button.cancel").click()
    page.wait_for_function("""() => document.querySelector("#gallery .job").dataset.status === "cancelled" """,
                           timeout=WAIT_MS)
    assert card.locator(".job-state").inner_text() == "Cancelled"
    assert card.locator("img.result").count() == 0 and card.locator("button.cancel").is_hidden()
    document = job_status(cluster.keyed_url, job_id, API_KEY)
    assert document["status"] == "cancelled", document
    # The worker is free again: the next job on the page runs to its image.
    generate_and_wait_for_image(page, "after the cancel")
    assert page.errors == []


def test_a_card_refused_an_event_stream_follows_its_job_by_status(page, cluster):
    """A gateway that allows one event stream at once: the second job's card is refused one (503
    too_many_streams, Retry-After: 1), reads the job's status meanwhile, and still shows its end."""
    port = free_port()
    cluster.start("gateway-one-stream", "gateway", GATEWAY_PORT=str(port), JOB_EVENT_STREAMS_MAX="1",
                  RETRY_AFTER_S="1", STATE_DIR=str(cluster.dir / "state-one-stream"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while _status(f"{url}/healthz") != 200:
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.1)
    page.goto(f"{url}/")
    submit(page, "the first job holds the one stream", steps=20)
    page.wait_for_function("() => document.querySelector('#gallery .job').dataset.jobId", timeout=WAIT_MS)
    submit(page, "the second job waits for one", steps=4)
    page.wait_for_function("""() => {
        const cards = document.querySelectorAll("#gallery .job");
        return cards.length === 2 && [...cards].every((card) => {
            const img = card.querySelector("img.result");
            return card.dataset.status === "succeeded" && img && img.complete && img.naturalWidth === 64;
        });
    }""", timeout=WAIT_MS)
    second = page.locator("#gallery .job").first.get_attribute("data-job-id")
    log = (cluster.dir / "gateway-one-stream.log").read_text()
    assert re.search(rf'"GET /v1/jobs/{second}/events HTTP/1\.1" 503', log), log[-3000:]
    assert page.errors == []


@pytest.mark.timeout(400)
def test_a_card_says_its_job_is_paused_while_a_high_priority_request_runs_and_then_running(page, tmp_path_factory):
    """BATCH_POLICY=step on the real tiny pipeline (the fake backend has no step engine): a long job
    from the page, then a high-priority job from the API: the card says paused at the step it
    reached, then running again, and its bar never goes back."""
    c = Cluster(tmp_path_factory.mktemp("web-paused"), MODEL_ID="tiny", WORKER_WARMUP="0", BATCH_POLICY="step",
                MAX_INFERENCE_STEPS="1000", PROGRESS_EVENT_INTERVAL_S="0", PYTHONPATH=str(REPO))
    try:
        c.start("broker", "broker")
        c.start("gateway", "gateway")
        c.start_worker(0)
        c.wait_for_workers(1, timeout_s=120)
        page.goto(f"{c.url}/")
        page.evaluate(WATCH_NEWEST_CARD)
        submit(page, "a patient heron", steps=150)  # the most the page allows
        page.wait_for_function("""() => {
            const card = document.querySelector("#gallery .job");
            return card && card.dataset.status === "running" && Number(card.dataset.step) > 0;
        }""", timeout=120_000)
        status, urgent, _ = call(c.url, "/v1/jobs", {"prompt": "urgent", "width": 64, "height": 64,
                                                     "num_inference_steps": 20, "seed": 2, "priority": "high"})
        assert status == 202, urgent
        page.wait_for_function("""() => document.querySelector("#gallery .job").dataset.status === "running"
                                        && seen.states.some((s) => s.startsWith("Paused"))""", timeout=120_000)
        card = page.locator("#gallery .job").first
        seen = page.evaluate("window.seen")
        pause = next(s for s in seen["states"] if s.startswith("Paused"))
        assert re.fullmatch(r"Paused at step \d+ of 150: higher-priority requests run first", pause), seen
        assert seen["states"][-1].startswith("Running on worker"), seen  # running again, as before the pause
        assert seen["steps"] == sorted(seen["steps"]), seen
        assert job_status(c.url, urgent["id"])["status"] == "succeeded"
        card.locator("button.cancel").click()
        page.wait_for_function("""() => document.querySelector("#gallery .job").dataset.status === "cancelled" """,
                               timeout=WAIT_MS)
        assert page.errors == []
    finally:
        c.stop()
