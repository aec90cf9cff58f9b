"""The web page at GET / (gateway/static/index.html), end to end in headless Chromium.

Debian's Chromium (/usr/bin/chromium) driven by Playwright's Python driver; Playwright never
downloads a browser here. The page talks to a real cluster of processes (tests/support/cluster.py:
broker, two gateways, workers on the FAKE image backend, since the page and the serving layer are
under test, not a model): one gateway is open, the other needs an API key.

Without /usr/bin/chromium the tests are skipped, except under CI (CI=true), where .ci/run installs
it and a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from gateway.config import GatewaySettings
from tests.support.cluster import Cluster
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
    c = make_module_cluster(MODEL_ID="fake:delay=0.2", MAX_BATCH_WAIT_TIME="0.05")
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
