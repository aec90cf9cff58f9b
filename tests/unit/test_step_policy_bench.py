"""bench/step_policy.py's pure parts, in this process: the ratios of step over run-to-completion, the
issue's targets (met, not met, not measurable), the recompile count read from the worker's own log
message, the drawn step counts and the open-loop summary. The harness itself runs as a command:
tests/e2e/test_bench_step_policy.py."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from bench import step_policy as sp


def row(throughput=1.0, p50=2.0, p95=3.0, images=10, successful=10, median=None):
    return {"service_images_per_s": throughput, "latency_p50_s": p50, "latency_p95_s": p95, "images": images,
            "successful": successful, "median_s": median}


def policy(throughput=1.0, p50=2.0, p95=3.0, lone_s=1.0, recompiles=0, successful=10):
    return {"lone": row(p50=lone_s, p95=lone_s, images=3, successful=3, median=lone_s),
            "burst": row(throughput, successful=successful), "users": row(throughput),
            "staggered": row(p50=p50, p95=p95), "mixed_steps": row(p50=p50, p95=p95),
            "recompiles": {"count": recompiles, "lines": []}}


def test_the_ratios_are_step_over_run_to_completion_and_lone_over_raw():
    policies = {"run-to-completion": policy(throughput=1.318, p50=4.0, p95=8.0, lone_s=3.0),
                "step": policy(throughput=1.3, p50=3.0, p95=10.0, lone_s=3.1)}
    ratios = sp.compute_ratios(policies, raw_batch1_s=3.0)
    assert ratios["burst_throughput"] == round(1.3 / 1.318, 4) == ratios["users_throughput"]
    assert ratios["staggered_p50"] == 0.75 and ratios["staggered_p95"] == 1.25
    assert ratios["mixed_steps_p50"] == 0.75 and ratios["mixed_steps_p95"] == 1.25
    assert ratios["lone_latency"] == round(3.1 / 3.0, 4)
    assert ratios["lone_over_raw_batch1"] == {"run-to-completion": 1.0, "step": round(3.1 / 3.0, 4)}


def test_a_ratio_without_both_rows_or_without_raw_is_none():
    ratios = sp.compute_ratios({"run-to-completion": policy()}, raw_batch1_s=None)
    assert ratios["burst_throughput"] is None and ratios["staggered_p95"] is None
    assert ratios["lone_over_raw_batch1"] == {"run-to-completion": None, "step": None}


def test_the_targets_are_met_within_their_limits():
    policies = {"run-to-completion": policy(throughput=1.0, lone_s=3.0), "step": policy(throughput=0.98, lone_s=3.15)}
    targets = sp.evaluate_targets(policies, sp.compute_ratios(policies, 3.0), compiled=True)
    assert targets["burst_throughput_within_2pct"] == {"met": True, "ratio": 0.98, "floor": 0.98}
    assert targets["users_throughput_within_2pct"]["met"] is True
    assert targets["lone_within_5pct_of_raw_batch1"] == {"met": True, "ratio": 1.05, "limit": 1.05}
    assert targets["no_recompiles_in_step"] == {"met": True, "recompiles": 0}
    assert targets["every_request_served"] == {"met": True, "failed": 0}
    assert targets["staggered_and_mixed_steps_measured_beside"] == {"met": True}
    assert targets["not_evaluated"] == [] and targets["all_met"] is True


def test_a_target_missed_says_so():
    policies = {"run-to-completion": policy(throughput=1.0, lone_s=3.0),
                "step": policy(throughput=0.97, lone_s=3.2, recompiles=2, successful=9)}
    targets = sp.evaluate_targets(policies, sp.compute_ratios(policies, 3.0), compiled=True)
    assert targets["burst_throughput_within_2pct"]["met"] is False
    assert targets["users_throughput_within_2pct"]["met"] is False
    assert targets["lone_within_5pct_of_raw_batch1"]["met"] is False
    assert targets["no_recompiles_in_step"] == {"met": False, "recompiles": 2}
    assert targets["every_request_served"] == {"met": False, "failed": 1}
    assert targets["all_met"] is False


def test_a_target_not_measurable_is_none_rather_than_met():
    policies = {"run-to-completion": policy(), "step": policy()}
    targets = sp.evaluate_targets(policies, sp.compute_ratios(policies, None), compiled=False)
    assert targets["lone_within_5pct_of_raw_batch1"]["met"] is None  # no raw batch of one (no GPU)
    recompiles = targets["no_recompiles_in_step"]
    assert recompiles["met"] is None and "TORCH_COMPILE" in recompiles["note"]  # nothing compiles
    assert targets["not_evaluated"] == ["lone_within_5pct_of_raw_batch1", "no_recompiles_in_step"]
    assert targets["all_met"] is None
    alone = sp.evaluate_targets({"run-to-completion": policy()}, sp.compute_ratios({"run-to-completion": policy()},
                                                                                     None), compiled=True)
    assert alone["burst_throughput_within_2pct"]["met"] is None and alone["every_request_served"]["met"] is None
    assert alone["staggered_and_mixed_steps_measured_beside"]["met"] is False


def test_recompiles_are_counted_from_the_workers_own_message(caplog):
    from gpu_worker.model import acceleration

    def refuses(*args, **kwargs):
        raise RuntimeError(f"Detected recompile when torch.compile stance is '{acceleration.RECOMPILE_REFUSED}'")

    eager_shapes: set = set()
    with caplog.at_level(logging.INFO, logger=acceleration.log.name):
        for shape in [(3, 4, 8, 8), (3, 4, 8, 8), (5, 4, 8, 8)]:  # said once per shape
            acceleration._compiled_or_eager(refuses, lambda: "eager", "UNet", shape, eager_shapes, (), {})
    log = "\n".join(f"2026-01-01 00:00:00,000 INFO gpu_worker[1] {r.name}: {r.getMessage()}" for r in caplog.records)
    found = sp.count_recompiles(log + "\n2026-01-01 00:00:00,000 INFO gpu_worker[1] x: warm-up: batch of 2 took 1.0s")
    assert found["count"] == 2 and all("is not warm" in line for line in found["lines"])
    assert sp.count_recompiles("")["count"] == 0


def test_mixed_steps_are_drawn_from_the_choices_by_seed():
    steps = sp.assign_steps(300, [10, 25, 50], seed=4)
    assert steps == sp.assign_steps(300, [10, 25, 50], seed=4) and steps != sp.assign_steps(300, [10, 25, 50], seed=5)
    assert set(steps) == {10, 25, 50}
    assert sp.parse_steps("10, 25,50") == [10, 25, 50]
    for bad in ("", "10,x", "0,10"):
        with pytest.raises(argparse.ArgumentTypeError):
            sp.parse_steps(bad)
    assert sp.parse_policies("step,run-to-completion") == ["run-to-completion", "step"]
    with pytest.raises(argparse.ArgumentTypeError):
        sp.parse_policies("window")


def test_open_loop_outcomes_become_the_load_tests_summary_and_steps_are_grouped():
    def outcome(sent, received, steps, ok=True, batch="b1"):
        return {"size": "64x64", "steps": steps, "sent_at": sent, "received_at": received, "ok": ok,
                "error": None if ok else "503 overloaded", "batch_id": batch if ok else None}

    outcomes = [outcome(0.0, 1.0, 10), outcome(0.5, 2.5, 50, batch="b2"), outcome(1.0, 4.0, 10, ok=False)]
    summary = sp.load_summary(outcomes)
    assert summary["successful"] == 2 and summary["total"] == 3 and summary["throughput"] == 0.5
    assert summary["latency_p50_s"] == 1.0 and summary["latency_max_s"] == 2.0 and summary["avg_batch_size"] == 1.0
    assert sp.by_steps(outcomes) == {"p50_by_steps_s": {"10": 1.0, "50": 2.0},
                                     "requests_by_steps": {"10": 2, "50": 1}}
    assert sp.load_summary([])["throughput"] == 0.0


def test_the_file_is_named_by_card_and_model_and_a_step_only_call_finds_the_earlier_half(tmp_path):
    assert sp.file_name("NVIDIA H200", "sdxl") == "step-policy-h200-sdxl.json"
    assert sp.file_name("cpu", "tiny") == "step-policy-cpu-tiny.json"
    document = {"card": "NVIDIA H200", "model": "sdxl", "size": "1024x1024", "steps": 25}
    out = tmp_path / "step-policy.json"
    assert sp.earlier_document(out, document) is None
    out.write_text(json.dumps({**document, "policies": {"run-to-completion": policy()}, "rate": {"per_s": 0.8}}))
    assert sp.earlier_document(out, document)["rate"] == {"per_s": 0.8}
    assert sp.earlier_document(out, {**document, "steps": 30}) is None  # another measurement
