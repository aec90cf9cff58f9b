"""The GPU benchmarks (bench/), run as commands on the CPU: the raw-pipeline half with the tiny model,
the service half with the FAKE backend (MODEL_ID=fake: no model; it says so), their clean-up and
saved results when killed, and bench.unet_variants and bench.profile_batch with the tiny models.
Their pure parts, in one process: tests/unit/test_bench_scripts.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.support.paths import REPO
from tests.support.procs import kill_all, processes_with

ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def run_script(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout_s, start_new_session=True)


def test_raw_half_measures_each_variant_and_batch_size(tmp_path):
    out = tmp_path / "raw.json"
    result = run_script("-m", "bench.gpu", "raw", "--model", "tiny", "--size", "64", "--steps", "2",
                        "--batches", "1,2", "--variants", "eager,layout", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    variants = document["raw"]["variants"]
    assert list(variants) == ["eager", "layout"] and all(list(rows) == ["1", "2"] for rows in variants.values())
    assert all(row["seconds"] > 0 and row["images_per_s"] > 0 for rows in variants.values() for row in rows.values())
    assert set(document["raw"]["png_encode_s"]) >= {"pil_level1", "striped_1"}
    summary = document["summary"]
    assert summary["model"] == "tiny" and summary["resolution"] == "64x64" and summary["gpus"] == 1
    assert summary["batch_size"] in (1, 2) and summary["raw_batch1_s"] == min(
        variants[v]["1"]["seconds"] for v in variants)
    assert "service_images_per_s" not in summary  # no service half was run


def test_the_preemptible_variant_calls_the_pipeline_as_the_worker_does(tmp_path):
    """``preemptible``: each timed call of batch 1 gets a preemption window (the UNet's pre-step check
    runs before every step) and a handover callback that receives the image; timed like the others."""
    out = tmp_path / "raw.json"
    result = run_script("-m", "bench.gpu", "raw", "--model", "tiny", "--size", "64", "--steps", "2",
                        "--batches", "1,2", "--variants", "eager,preemptible", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    variants = json.loads(out.read_text())["raw"]["variants"]
    assert list(variants) == ["eager", "preemptible"]
    assert all("worker_call" not in row for row in variants["eager"].values())
    assert list(variants["preemptible"]) == ["1"]  # the worker starts only a lone request preemptibly
    row = variants["preemptible"]["1"]
    assert row["seconds"] > 0
    # PNDM (the tiny model's scheduler) calls the UNet once more than its steps: 3 checks for 2 steps
    assert row["worker_call"] == {"steps_checked": 3, "images_handed_over": 1}, row


def test_all_measures_raw_then_the_service_after_giving_the_memory_back(tmp_path):
    """``all``: the raw half, then its GPU memory given back (the service's worker sizes its batches
    from the free memory; on the CPU there is none to report), then the service on the same model."""
    out = tmp_path / "all.json"
    result = run_script("-m", "bench.gpu", "all", "--model", "tiny", "--size", "64", "--steps", "2",
                        "--batches", "1", "--variants", "eager", "--service-runs", "lone", "--lone-repeats", "1",
                        "--out", str(out), "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert "gpu_memory_held_after_gib" in document["raw"] and document["raw"]["gpu_memory_held_after_gib"] is None
    assert [row["mode"] for row in document["service"]["rows"]] == ["lone"]
    summary = document["summary"]
    assert summary["raw_batch1_s"] > 0 and summary["lone_latency_s"] > 0 and summary["lone_over_raw_batch1"] > 0


def test_paired_rounds_alternate_a_raw_call_and_a_lone_request_beside_each_other(tmp_path):
    """``all --paired 3 --service-runs none``: the raw half, then three rounds, raw first then lone
    first, each with its own difference; the summary carries the paired ratio; no other service run."""
    out = tmp_path / "paired.json"
    result = run_script("-m", "bench.gpu", "all", "--model", "tiny", "--size", "64", "--steps", "2",
                        "--batches", "1", "--variants", "eager", "--service-runs", "none", "--paired", "3",
                        "--trace", "--out", str(out), "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    paired = document["paired"]
    assert [r["order"] for r in paired["rounds"]] == ["raw,lone", "lone,raw", "raw,lone"]
    for r in paired["rounds"]:
        assert r["raw_s"] > 0 and r["lone_s"] > 0 and r["worker_batch_ms"] > 0
        assert r["difference_ms"] == pytest.approx((r["lone_s"] - r["raw_s"]) * 1000, abs=0.01)
        assert r["stages"]["requests"] == 1  # --trace: each lone request's hops
    assert paired["lone_over_raw"] == pytest.approx(paired["lone_median_s"] / paired["raw_median_s"], abs=1e-3)
    assert document["summary"]["paired_lone_over_raw"] == paired["lone_over_raw"]
    assert "service" not in document
    assert (tmp_path / "logs" / "paired" / "worker0.log").exists()


def test_paired_needs_mode_all():
    refused = run_script("-m", "bench.gpu", "raw", "--model", "tiny", "--paired", "2")
    assert refused.returncode == 2 and "--paired needs mode all" in refused.stderr


def test_cuda_graphs_listed_alone_get_the_compiled_unet_untimed(tmp_path):
    """``--variants graphs``: the compile that CUDA graphs need is applied without being timed (it
    used to fail: no compiled UNet to record graphs of); on the CPU the graphs are not recorded."""
    out = tmp_path / "raw.json"
    result = run_script("-m", "bench.gpu", "raw", "--model", "tiny", "--size", "64", "--steps", "2",
                        "--batches", "1", "--variants", "graphs", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    variants = json.loads(out.read_text())["raw"]["variants"]
    assert list(variants) == ["graphs"] and variants["graphs"]["1"]["seconds"] > 0


def raw_batch1_of_tiny(tmp_path, *args: str) -> dict:
    """bench.gpu raw on the tiny model, batch 1 at 64x64, 2 steps, eager, plus ``args``: its raw half."""
    out = tmp_path / "raw.json"
    result = run_script("-m", "bench.gpu", "raw", "--model", "tiny", "--size", "64", "--steps", "2",
                        "--batches", "1", "--variants", "eager", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())["raw"]


def test_several_raw_pauses_are_each_timed(tmp_path):
    """The pauses reach the raw half and each has its median row (the figures themselves are the
    machine's; their timing is the fake-clock tests' above)."""
    raw = raw_batch1_of_tiny(tmp_path, "--repeats", "2", "--pause-s", "0,0.3")
    assert raw["pauses_s"] == [0.0, 0.3] and raw["pause_s"] == 0.0
    row = raw["variants"]["eager"]["1"]
    assert set(row["seconds_by_pause_s"]) == {"0", "0.3"}
    assert row["seconds"] == row["seconds_by_pause_s"]["0"]
    assert all(seconds > 0 for seconds in row["seconds_by_pause_s"].values())


def test_a_pause_list_must_be_seconds():
    result = run_script("-m", "bench.gpu", "raw", "--model", "tiny", "--pause-s", "0,fast")
    assert result.returncode == 2 and "--pause-s" in result.stderr and "0,0.65" in result.stderr


def test_a_raw_run_cut_off_has_already_saved_what_it_measured(tmp_path):
    # A device call has a time limit: every finished batch size is in --out before the next starts.
    out = tmp_path / "raw.json"
    bench = subprocess.Popen([sys.executable, "-m", "bench.gpu", "raw", "--model", "tiny", "--size", "64",
                              "--steps", "2", "--batches", "1,2", "--variants", "eager,layout", "--out", str(out)],
                             cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        for line in bench.stderr:
            if line.startswith("eager batch 1:"):
                os.killpg(bench.pid, signal.SIGKILL)  # the moment the first size is reported
                break
        bench.wait(timeout=60)
        assert bench.returncode == -signal.SIGKILL
        variants = json.loads(out.read_text())["raw"]["variants"]
        assert list(variants) == ["eager"] and "1" in variants["eager"]
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait(timeout=10)


def test_unet_variants_times_each_variant_on_the_same_inputs(tmp_path):
    out = tmp_path / "variants.json"
    result = run_script("-m", "bench.unet_variants", "--model", "tiny", "--size", "64", "--batch", "2", "--repeats",
                        "2", "--variants", "eager,eager-layout,compiled-nolayout", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["unet_rows"] == 4  # classifier-free guidance: two rows per image
    rows = document["variants"]
    assert list(rows) == ["eager", "eager-layout", "compiled-nolayout"]
    assert all(row["ms_per_step"] > 0 and row["graph_breaks"] == 0 for row in rows.values()), rows
    assert rows["eager"]["relative_error_vs_first"] == 0
    assert 0 <= rows["compiled-nolayout"]["relative_error_vs_first"] < 1e-3  # compiled: same outputs, float32 CPU


def test_service_half_reports_the_promised_fields(tmp_path):
    out, logs = tmp_path / "service.json", tmp_path / "logs"
    result = run_script("-m", "bench.gpu", "service", "--model", "fake:delay=0.02", "--size", "64", "--steps",
                        "2", "--lone-repeats", "2", "--out", str(out), "--log-dir", str(logs))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    modes = [row["mode"] for row in document["service"]["rows"]]
    assert modes == ["lone", "lone", "burst50", "users10x5", "burst50_no_batching"]
    assert all(row["successful"] == row["images"] for row in document["service"]["rows"])
    assert all("gpu_before" in row and "gpu_during" in row for row in document["service"]["rows"])  # None: no GPU
    summary = document["summary"]
    for field in ("card", "model", "resolution", "steps", "gpus", "lone_latency_s", "burst50_s",
                  "service_images_per_s", "users10x5_images_per_s", "no_batching_images_per_s"):
        assert summary[field] is not None, field
    assert summary["burst50_s"] > 0 and summary["service_avg_batch_size"] > 1
    # Where a lone request's time went: its batch (the fake backend sleeps 20 ms), the queue, the rest.
    parts = document["service"]["rows"][0]["median_ms"]
    assert parts["generation"] >= 20 and parts["queue_wait"] >= 0 and parts["rest"] > 0
    # The workers' own per-batch times, read from their logs: 2 lone + burst + users batches.
    batches = document["service"]["worker_batches"]
    sizes = [size for size, _, _ in batches]
    assert sizes[:2] == [1, 1] and sum(sizes) == 2 + 50 + 50
    # Each batch's time in the GPU thread (the 20 ms sleep and the fake images) within the batch's time
    # as the event loop saw it (the log rounds both to the millisecond).
    assert all(0.02 <= gpu_thread_s <= seconds + 0.001 for _, seconds, gpu_thread_s in batches), batches


def test_service_half_runs_only_the_runs_asked_for(tmp_path):
    out = tmp_path / "service.json"
    result = run_script("-m", "bench.gpu", "service", "--model", "fake:delay=0.02", "--size", "64", "--steps",
                        "2", "--service-runs", "burst50", "--out", str(out), "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert [row["mode"] for row in document["service"]["rows"]] == ["burst50"]
    summary = document["summary"]
    assert summary["service_images_per_s"] > 0 and summary["lone_latency_s"] is None
    assert summary["users10x5_images_per_s"] is None and summary["no_batching_images_per_s"] is None
    refused = run_script("-m", "bench.gpu", "service", "--model", "fake", "--service-runs", "burst5")
    assert refused.returncode == 2 and "unknown burst5" in refused.stderr


@pytest.mark.parametrize("when", ["under load", "while it starts"])
def test_a_killed_benchmark_stops_the_service_it_started(tmp_path, when):
    """Killed (timeout, a device call's limit) at any time, the benchmark leaves no process behind: not
    under load, and not while it waits for the service to be ready (a worker's warm-up is minutes)."""
    marker = f"BENCH_TEST_MARKER={uuid.uuid4().hex}"
    # A worker sent to a port where no broker listens never registers: the service never gets ready.
    never_ready = ["--set", "BROKER_WORKER_ADDRESS=tcp://127.0.0.1:9"] if when == "while it starts" else []
    bench = subprocess.Popen([sys.executable, "-m", "bench.service", "scaling", "--model", "fake:delay=2",
                              "--size", "64", "--steps", "2", "--gpus", "1", "--per-gpu", "50", "--set", marker,
                              *never_ready, "--log-dir", str(tmp_path)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(processes_with(marker)) < 3 and time.monotonic() < deadline:  # broker, gateway, worker
            time.sleep(0.2)
        started = processes_with(marker)
        assert len(started) >= 3, "the benchmark did not start its service"
        time.sleep(2)  # the load test is running against it, or the benchmark still waits for readiness
        assert bench.poll() is None, "the benchmark ended by itself"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_with(marker) == [], "service processes outlived the killed benchmark"
    finally:
        kill_all(processes_with(marker) + [bench.pid])
        bench.wait(timeout=10)


def test_the_automatic_batch_size_never_plans_past_the_measured_memory():
    """bench.batch_size_table: per card, the worker's automatic MAX_BATCH_SIZE (its own function)
    against the largest batch the committed H100 memory measurements say fits."""
    result = run_script("-m", "bench.batch_size_table", timeout_s=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "GB)" in line]
    assert [row.split("|")[1].strip().split(" (")[0] for row in rows] == [
        "RTX 3060", "RTX 3090", "RTX 4090", "L40S", "A100", "H100", "H200"]
    for row in rows:
        for cell in row.split("|")[2:4]:
            auto, fits = (int(part) for part in cell.split("/"))
            assert 1 <= auto <= fits, row


@pytest.mark.parametrize("model, extra, unet_calls, encoder_calls", [
    ("tiny", ["--trace"], 4, 2),  # SD-1.5's PNDM scheduler: one UNet call more than steps; prompt + negative
    ("tiny-sdxl", ["--compile"], 3, 4),  # Euler: one per step; SDXL's two text encoders, twice each
])
def test_profile_batch_accounts_for_every_phase(tmp_path, model, extra, unet_calls, encoder_calls):
    out = tmp_path / "phases.json"
    if extra == ["--trace"]:
        extra = ["--trace", str(tmp_path / "trace.json.gz")]
    result = run_script("-m", "bench.profile_batch", "--model", model, "--size", "64", "--batch", "2", "--steps", "3",
                        "--out", str(out), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    calls = {phase: row["calls"] for phase, row in document["phases"].items()}
    assert calls == {"unet": unet_calls, "scheduler_step": unet_calls, "vae_decode": 1,
                     "text_encoders": encoder_calls, "to_8bit_images": 1}
    timed = sum(row["seconds"] for row in document["phases"].values())
    assert 0 < timed <= document["phased_s"] and document["rest_s"] >= 0
    assert document["compiled"] == ("--compile" in extra)
    if "--trace" in extra:
        assert (tmp_path / "trace.json.gz").stat().st_size > 0 and document["top_gpu_operators"]


def test_bench_png_times_each_encoder_on_the_same_images(tmp_path):
    """bench.png: PIL, this checkout's encoder and a git revision's, on noise and on a smooth
    image; every PNG decodes to the pixels (the script checks), sizes and times come back per encoder."""
    out = tmp_path / "png.json"
    result = run_script("-m", "bench.png", "--sizes", "16,40", "--repeats", "3", "--stripes", "2",
                        "--baseline", "HEAD", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["size"], row["image"]) for row in rows] == [(16, "noise"), (16, "smooth"), (40, "noise"),
                                                              (40, "smooth")]
    for row in rows:
        assert set(row["encoders"]) == {"pil_level1", "current", "current_2_stripes", "baseline",
                                        "baseline_2_stripes"}
        assert all(timing["ms"] > 0 and timing["bytes"] > 0 for timing in row["encoders"].values())
        assert row["current_over_baseline"] > 0
    noise, smooth = rows[2]["encoders"], rows[3]["encoders"]
    assert smooth["current"]["bytes"] < noise["current"]["bytes"]  # the smooth image compresses


def test_bench_png_takes_a_baseline_file_where_there_is_no_git_history(tmp_path):
    """The GPU machines get the working tree without .git: --baseline also takes a png.py's path."""
    baseline = tmp_path / "old_png.py"
    baseline.write_text((REPO / "gpu_worker" / "model" / "png.py").read_text())
    out = tmp_path / "png.json"
    result = run_script("-m", "bench.png", "--sizes", "16", "--repeats", "2", "--baseline", str(baseline),
                        "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert all({"current", "baseline"} <= set(row["encoders"]) for row in rows)


def test_compare_serving_alternates_both_trees_and_reports_their_hops(tmp_path):
    """bench/compare_serving.sh against a baseline tree (here this one): both sides' lone requests
    through real services on the fake backend, each side's hops, and the PNG timings of both."""
    env = {**ENV, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "LONE_REPEATS": "2", "PNG_REPEATS": "1"}
    result = subprocess.run(["bash", "bench/compare_serving.sh", str(REPO), "1", "64"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if ": lone " in line] == ["old-1", "new-1"]
    assert sum("worker_batch_started -> worker_batch_done" in line for line in lines) == 2  # one table per side
    assert {path.name for path in (tmp_path / "out").iterdir()} == {
        "fake-old-1.json", "fake-new-1.json", "png-6.json", "png-14.json"}
