"""bench/resolutions.py's pure parts, in this process: the Poisson arrivals and the mix drawn over
them, the percentile, what a compiled worker's log says about its start, the targets and the result
file's shape. The harness itself runs as a command: tests/e2e/test_resolutions_bench.py."""

from __future__ import annotations

import argparse
import statistics

import pytest

from bench import resolutions as res

# A compiled worker's start as it logs it (gpu_worker/__main__.py, gpu_worker/shell/worker.py).
WORKER_LOG = """\
2026-12-05 01:42:30,679 INFO gpu_worker[15411] gpu_worker: settings: MODEL_ID='sd15' TORCH_COMPILE=True SIZES='auto'
2026-12-05 01:42:30,680 INFO gpu_worker[15411] gpu_worker: loaded MODEL_ID=sd15 (sd15) on cuda:0 as torch.bfloat16 in 4.2s
2026-12-05 01:42:30,681 INFO gpu_worker[15411] gpu_worker: warm-up at 512x512, batch sizes [16, 1, 2]
2026-12-05 01:42:31,083 INFO gpu_worker[15411] gpu_worker: warm-up at 512x512 took 12.3s (seconds per batch size: {})
2026-12-05 01:42:31,083 INFO gpu_worker[15411] gpu_worker: size 512x512 warm 12.3s after the model loaded (1 of 3 \
sizes warm); the others warm in the background: 512x768, 768x512
2026-12-05 01:42:31,493 INFO gpu_worker[15411] gpu_worker.shell.worker: size 512x768 warm 20.1s after the model \
loaded (2 of 3 sizes warm)
"""
LAST_SIZE = ("2026-12-05 01:42:31,894 INFO gpu_worker[15411] gpu_worker.shell.worker: size 768x512 warm 31.5s after "
             "the model loaded (3 of 3 sizes warm)\n")
ALL_WARM = ("2026-12-05 01:42:31,894 INFO gpu_worker[15411] gpu_worker.shell.worker: every listed size is warm 31.5s "
            "after the model loaded: 512x512, 512x768, 768x512\n")


def test_poisson_arrivals_are_open_loop_times_at_the_rate_from_the_seed():
    times = res.poisson_arrivals(50.0, 200.0, seed=7)
    assert times == res.poisson_arrivals(50.0, 200.0, seed=7)  # reproducible
    assert times != res.poisson_arrivals(50.0, 200.0, seed=8)
    assert times == sorted(times) and 0 < times[0] and times[-1] < 200.0
    assert abs(len(times) - 10_000) < 400  # 4 standard deviations of a Poisson count of 10,000
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 50.0, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50.0, rel=0.05)  # exponential: sd = mean
    with pytest.raises(ValueError, match="positive"):
        res.poisson_arrivals(0.0, 10.0, seed=1)


def test_the_mix_is_drawn_by_weight_from_the_seed():
    mix = {"512x512": 0.6, "512x768": 0.2, "768x512": 0.2}
    sizes = res.assign_sizes(20_000, mix, seed=3)
    assert sizes == res.assign_sizes(20_000, mix, seed=3)
    shares = {size: sizes.count(size) / len(sizes) for size in mix}
    assert shares == pytest.approx(mix, abs=0.015)
    assert set(res.assign_sizes(50, {"64x64": 1.0}, seed=3)) == {"64x64"}


def test_percentile_is_the_nearest_rank():
    values = list(range(1, 21))
    assert res.percentile(values, 95) == 19 and res.percentile(values, 50) == 10
    assert res.percentile([3.0, 1.0, 2.0], 50) == 2.0 and res.percentile([5.0], 95) == 5.0
    assert res.percentile(values, 100) == 20 and res.percentile(values, 0) == 1
    with pytest.raises(ValueError):
        res.percentile([], 50)
    with pytest.raises(ValueError):
        res.percentile([1.0], 101)


def test_a_mix_is_sizes_with_weights_normalised():
    assert res.parse_mix("512x512:3,512x768:1") == {"512x512": 0.75, "512x768": 0.25}
    for bad, says in (("512x512", "with its weight"), ("512x51:1", "multiples of 8"), ("512x512:x", "not a number"),
                      ("512x512:-1", "positive"), ("512x512:1,512x512:2", "twice"), ("", "lists no size")):
        with pytest.raises(ValueError, match=says):
            res.parse_mix(bad)


def test_the_default_mix_is_half_the_native_square_or_the_issues_sd15_mix():
    sdxl = ["1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344", "1536x640",
            "640x1536"]
    mix = res.default_mix("sdxl", sdxl, "1024x1024")
    assert mix["1024x1024"] == 0.5 and set(mix) == set(sdxl)
    assert all(mix[size] == 0.0625 for size in sdxl[1:]) and sum(mix.values()) == pytest.approx(1)
    sd15 = ["512x512", "512x768", "768x512", "576x448", "448x576"]
    assert res.default_mix("sd15", sd15, "512x512") == {"512x512": 0.6, "512x768": 0.2, "768x512": 0.2}
    assert res.default_mix("tiny", ["64x64", "64x96", "96x64"], "64x64") == {"64x64": 0.5, "64x96": 0.25,
                                                                              "96x64": 0.25}
    assert res.default_mix("sd15", ["512x512"], "512x512") == {"512x512": 1.0}


def test_a_run_is_summarised_from_its_requests():
    def request(size, sent, received, ok=True, batch="b1", error=None):
        return {"size": size, "sent_at": sent, "received_at": received, "ok": ok, "error": error, "batch_id": batch}

    outcomes = [request("64x64", 0.0, 1.0, batch="b1"), request("64x64", 0.5, 1.0, batch="b1"),
                request("64x96", 1.0, 3.0, batch="b2"), request("64x96", 1.5, 4.0, ok=False, batch=None,
                                                                error="503 overloaded")]
    run = res.summarize_run(outcomes, rate=2.0)
    assert run["rate"] == 2.0 and run["requests"] == 4 and run["served"] == 3
    assert run["throughput_img_s"] == 0.75  # 3 served from the first sent (0.0) to the last answer (4.0)
    assert run["p50_s"] == 1.0 and run["p95_s"] == 2.0 and run["max_s"] == 2.0
    assert run["failed"] == {"503 overloaded": 1} and run["avg_batch_size"] == 1.5
    assert run["p50_by_size_s"] == {"64x64": 0.5, "64x96": 2.0}


def test_the_worker_log_says_when_its_first_size_and_every_size_were_warm():
    warming = res.parse_warm_log(WORKER_LOG)
    assert warming["load_s"] == 4.2 and warming["first_size"] == "512x512" and warming["first_warm_s"] == 12.3
    assert warming["sizes"] == 3 and warming["warm_s_by_size"] == {"512x512": 12.3, "512x768": 20.1}
    assert warming["all_warm_s"] is None  # not said yet: the harness keeps waiting
    done = res.parse_warm_log(WORKER_LOG + LAST_SIZE + ALL_WARM)
    assert done["all_warm_s"] == 31.5 and done["could_not_warm"] == [] and done["first_warm_s"] == 12.3
    failed = res.parse_warm_log(WORKER_LOG + ALL_WARM.rstrip("\n") + "; could not warm 768x512, 576x448\n")
    assert failed["all_warm_s"] == 31.5 and failed["could_not_warm"] == ["768x512", "576x448"]
    # A worker serving one size logs no background warm-up: its first size is every size.
    alone = res.parse_warm_log("... size 512x512 warm 9.0s after the model loaded (1 of 1 sizes warm); the others "
                               "warm in the background: none\n")
    assert alone["first_warm_s"] == alone["all_warm_s"] == 9.0


def measured(**changes) -> dict:
    document = res.new_document("NVIDIA H200", "sd15", "python -m bench.resolutions --model sd15 --work w")
    document["square_only"] = {"rate": 4.0, "throughput_img_s": 4.0, "p50_s": 0.34, "p95_s": 0.72}
    document["mixed"] = {"rate": 4.0, "throughput_img_s": 4.0, "p50_s": 0.4, "p95_s": 1.0, "mix": {"512x512": 1.0}}
    document["lone_by_size"] = {"512x512": {"service_s": 0.21, "raw_batch1_s": 0.2},
                                "512x768": {"service_s": 0.3, "raw_batch1_s": 0.29}}
    document["ready_s"].update(cold=190.0, restart_with_cache=20.0, new_host_with_cache=25.0, all_sizes_warm=400.0,
                               all_sizes_warm_after={"cold": 400.0, "restart_with_cache": 90.0,
                                                     "new_host_with_cache": 110.0})
    return res.merge(document, changes)


def test_the_targets_say_which_are_met_with_their_figures():
    targets = res.evaluate_targets(measured(), cold_baseline_s=190.0)
    assert targets["mixed_p95_within_1_5x_square"] == {"met": True, "ratio": 1.389, "limit": 1.5}
    assert targets["lone_within_10pct_of_raw_batch1"]["met"] is True
    assert targets["lone_within_10pct_of_raw_batch1"]["ratios"] == {"512x512": 1.05, "512x768": 1.034}
    assert targets["restart_first_size_within_30s"] == {"met": True, "seconds": 20.0, "limit": 30.0}
    assert targets["new_host_all_sizes_within_120s"] == {"met": True, "seconds": 110.0, "limit": 120.0}
    assert targets["cold_no_slower"]["met"] is True and targets["all_met"] is True and not targets["not_evaluated"]

    slow = measured(mixed={"p95_s": 1.1}, lone_by_size={"512x768": {"service_s": 0.33}},
                    ready_s={"restart_with_cache": 31.0, "all_sizes_warm_after": {"new_host_with_cache": 121.0}})
    targets = res.evaluate_targets(slow, cold_baseline_s=150.0)
    assert targets["mixed_p95_within_1_5x_square"]["met"] is False
    assert targets["lone_within_10pct_of_raw_batch1"]["met"] is False
    assert targets["restart_first_size_within_30s"]["met"] is False
    assert targets["restart_all_sizes_within_120s"]["met"] is True
    assert targets["new_host_all_sizes_within_120s"]["met"] is False
    assert targets["cold_no_slower"] == {"met": False, "seconds": 190.0, "baseline_s": 150.0, "ratio": 1.267}
    assert targets["all_met"] is False


def test_a_target_not_measured_is_not_evaluated_rather_than_met():
    partial = res.new_document("cpu", "tiny", "c")
    partial["lone_by_size"] = {"64x64": {"service_s": 0.1, "raw_batch1_s": 0.1}, "64x96": {"service_s": 0.1}}
    targets = res.evaluate_targets(partial)
    assert targets["all_met"] is None
    assert set(targets["not_evaluated"]) == {
        "mixed_p95_within_1_5x_square", "lone_within_10pct_of_raw_batch1", "restart_first_size_within_30s",
        "restart_all_sizes_within_120s", "new_host_first_size_within_30s", "new_host_all_sizes_within_120s",
        "cold_no_slower"}


def test_the_file_has_the_issues_fields_and_a_later_call_adds_its_phases():
    document = measured()
    assert list(document)[:7] == ["card", "model", "square_only", "mixed", "lone_by_size", "ready_s", "command"]
    assert set(document["ready_s"]) >= {"cold", "restart_with_cache", "new_host_with_cache", "all_sizes_warm"}
    assert set(document["mixed"]) >= {"rate", "throughput_img_s", "p50_s", "p95_s", "mix"}
    assert all(set(row) == {"service_s", "raw_batch1_s"} for row in document["lone_by_size"].values())

    # A call that ran the raw phase only: its figures over the earlier call's, nothing else lost.
    later = res.merge(document, {"lone_by_size": {"512x512": {"raw_batch1_s": 0.19}},
                                 "ready_s": {"cold": None}, "command": "raw only"})
    assert later["lone_by_size"]["512x512"] == {"service_s": 0.21, "raw_batch1_s": 0.19}
    assert later["lone_by_size"]["512x768"] == document["lone_by_size"]["512x768"]
    assert later["ready_s"]["cold"] == 190.0 and later["command"] == "raw only"


def test_the_file_is_named_by_card_and_model():
    assert res.file_name("NVIDIA H200", "sd15") == "resolutions-h200-sd15.json"
    assert res.file_name("NVIDIA H100 80GB HBM3", "sdxl") == "resolutions-h100-80gb-hbm3-sdxl.json"
    assert res.file_name("cpu", "fake:delay=0.05") == "resolutions-cpu-fake-delay-0-05.json"


def test_phases_run_in_their_order_and_unknown_ones_are_refused():
    assert res.parse_phases("raw,cold") == ["cold", "raw"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown phase.*warm.*choose from cold"):
        res.parse_phases("cold,warm")
