"""Arrival patterns: what the clients send, and when (seeded, so every policy sees the same one).

A :class:`Workload` schedules its submissions on a :class:`~simulator.engine.Simulation`; closed-loop
ones (users who wait for an answer before asking again) submit from ``on_done`` callbacks.
A "simultaneous" burst reaches the broker ``spacing_s`` apart (2 ms): the gateway parses,
validates and forwards requests one by one, and that spread is what a policy sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from gpu_worker.decisions.batcher import BatchKey
from simulator.costs import CostModel
from simulator.engine import RequestRecord, Simulation

BURST_SPACING_S = 0.002


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    schedule: Callable[[Simulation], None]


def burst(n: int, key: BatchKey, spacing_s: float = BURST_SPACING_S, name: str | None = None) -> Workload:
    def schedule(sim: Simulation) -> None:
        for i in range(n):
            sim.submit(key, i * spacing_s)
    return Workload(name or f"burst-{n}", f"{n} requests at once ({spacing_s * 1000:.0f} ms apart)", schedule)


def lone(key: BatchKey) -> Workload:
    def schedule(sim: Simulation) -> None:
        sim.submit(key, 0.0)
    return Workload("lone", "one request on an idle cluster", schedule)


def users(n_users: int, per_user: int, key: BatchKey, think_s: float = 0.0,
          spacing_s: float = BURST_SPACING_S) -> Workload:
    """``n_users`` start together; each sends its next request when the previous answer arrives."""
    def schedule(sim: Simulation) -> None:
        for user in range(n_users):
            _user_loop(sim, key, per_user, think_s, user * spacing_s)
    return Workload(f"users-{n_users}x{per_user}", f"{n_users} users x {per_user} sequential requests", schedule)


def _user_loop(sim: Simulation, key: BatchKey, remaining: int, think_s: float, at_s: float) -> None:
    def next_request(_: RequestRecord) -> None:
        if remaining > 1:
            _user_loop(sim, key, remaining - 1, think_s, sim.now + think_s)
    sim.submit(key, at_s, on_done=next_request)


def poisson(rate_img_s: float, n: int, keys: Sequence[BatchKey], weights: Sequence[float] | None = None,
            seed: int = 1, name: str = "poisson", description: str = "") -> Workload:
    """``n`` open-loop arrivals at ``rate_img_s`` (exponential gaps), each key drawn by ``weights``."""
    def schedule(sim: Simulation) -> None:
        rng = random.Random(seed)
        at_s = 0.0
        for _ in range(n):
            at_s += rng.expovariate(rate_img_s)
            sim.submit(rng.choices(keys, weights)[0] if len(keys) > 1 else keys[0], at_s)
    return Workload(name, description or f"Poisson arrivals at {rate_img_s:.3g} images/s", schedule)


# Several sizes, step counts and guidance scales, as a game's players would send (weights sum to 1).
MIXED_KEYS: tuple[tuple[BatchKey, float], ...] = (
    (BatchKey(1024, 1024, 25, 5.0), 0.30),
    (BatchKey(1024, 1024, 25, 7.5), 0.20),
    (BatchKey(1024, 1024, 40, 5.0), 0.10),
    (BatchKey(768, 768, 25, 5.0), 0.20),
    (BatchKey(512, 512, 20, 5.0), 0.10),
    (BatchKey(1024, 1024, 8, 1.0), 0.10),  # few steps, no CFG: a distilled ("turbo") style request
)


# Mixed resolutions (docs/batching.md, "Mixed resolutions in the simulator"): keys that differ only in size,
# so every size is a group of its own. SDXL's standard aspect-ratio buckets (about one megapixel
# each), 1024x1024 the most common; SD-1.5 at 512x512 and its two 2:3 portrait/landscape sizes.
SDXL_BUCKET_KEYS: tuple[tuple[BatchKey, float], ...] = (
    (BatchKey(1024, 1024, 25, 5.0), 0.40),
    (BatchKey(1152, 896, 25, 5.0), 0.10),
    (BatchKey(896, 1152, 25, 5.0), 0.10),
    (BatchKey(1216, 832, 25, 5.0), 0.08),
    (BatchKey(832, 1216, 25, 5.0), 0.08),
    (BatchKey(1344, 768, 25, 5.0), 0.07),
    (BatchKey(768, 1344, 25, 5.0), 0.07),
    (BatchKey(1536, 640, 25, 5.0), 0.05),
    (BatchKey(640, 1536, 25, 5.0), 0.05),
)
SD15_MIXED_KEYS: tuple[tuple[BatchKey, float], ...] = (
    (BatchKey(512, 512, 25, 7.5), 0.60),
    (BatchKey(512, 768, 25, 7.5), 0.20),
    (BatchKey(768, 512, 25, 7.5), 0.20),
)
# Mix name -> its keys and weights (the mixed-resolution workloads of --compare).
SIZE_MIXES: dict[str, tuple[tuple[BatchKey, float], ...]] = {
    "sdxl-buckets": SDXL_BUCKET_KEYS,
    "sd15-mixed": SD15_MIXED_KEYS,
}


def mixed_capacity_img_s(costs: CostModel, max_batch: int, gpus: int = 1,
                         keys: Sequence[tuple[BatchKey, float]] = MIXED_KEYS) -> float:
    """Images per second the cluster sustains on a mix (``keys``: key, weight) if every key ran in
    full batches."""
    mean_s_per_image = sum(w * costs.batch_s(k, max_batch) / max_batch for k, w in keys)
    return gpus / mean_s_per_image


def mixed(rate_img_s: float, n: int, seed: int = 3, name: str = "mixed") -> Workload:
    keys, weights = zip(*MIXED_KEYS)
    return poisson(rate_img_s, n, keys, weights, seed, name,
                   f"Poisson at {rate_img_s:.3g} images/s over {len(keys)} sizes/steps/guidance scales")


def size_mix(mix: str, rate_img_s: float, n: int, seed: int = 5, name: str | None = None) -> Workload:
    """Poisson arrivals over the sizes of :data:`SIZE_MIXES` ``[mix]``, each drawn by its weight."""
    keys, weights = zip(*SIZE_MIXES[mix])
    return poisson(rate_img_s, n, keys, weights, seed, name or mix,
                   f"Poisson at {rate_img_s:.3g} images/s over {len(keys)} sizes ({mix})")


# ---------------------------------------------------------------------------------------------
# Workloads of the step-level policy (docs/scheduling.md, "Step-level scheduling"); every policy runs them.

# One shape at three step counts (a fast draft, the usual, a slow final render), equally often.
STEP_MIX_STEPS = (10, 25, 50)
# One shape and step count at four guidance scales, one of them without CFG.
GUIDANCE_MIX = (1.0, 3.5, 5.0, 7.5)
# priority-80: the share of each class.
PRIORITY_MIX = (("high", 0.1), ("normal", 0.6), ("low", 0.3))
CANCEL_FRACTION = 0.2  # cancel-20: a fifth of the requests are cancelled


def steps_mix(key: BatchKey) -> tuple[tuple[BatchKey, float], ...]:
    """``key`` at each of STEP_MIX_STEPS, equally weighted."""
    return tuple((BatchKey(key.width, key.height, s, key.guidance_scale), 1 / len(STEP_MIX_STEPS))
                 for s in STEP_MIX_STEPS)


def guidance_mix(key: BatchKey) -> tuple[tuple[BatchKey, float], ...]:
    """``key`` at each of GUIDANCE_MIX, equally weighted."""
    return tuple((BatchKey(key.width, key.height, key.num_inference_steps, g), 1 / len(GUIDANCE_MIX))
                 for g in GUIDANCE_MIX)


def prioritised(rate_img_s: float, n: int, key: BatchKey, seed: int = 7, name: str = "priority",
                classes: Sequence[tuple[str, float]] = PRIORITY_MIX) -> Workload:
    """Poisson arrivals of one key, each request's priority drawn by ``classes`` (class, weight)."""
    labels, weights = zip(*classes)

    def schedule(sim: Simulation) -> None:
        rng = random.Random(seed)
        at_s = 0.0
        for _ in range(n):
            at_s += rng.expovariate(rate_img_s)
            sim.submit(key, at_s, priority=rng.choices(labels, weights)[0])
    return Workload(name, f"Poisson at {rate_img_s:.3g} images/s, priorities {dict(classes)}", schedule)


def cancelling(rate_img_s: float, n: int, key: BatchKey, cancel_within_s: float, seed: int = 9,
               fraction: float = CANCEL_FRACTION, name: str = "cancel") -> Workload:
    """Poisson arrivals of one key; a ``fraction`` of the requests are cancelled by their client
    (CANCEL through the broker) a uniform time in (0, ``cancel_within_s``) after sending, unless
    answered by then: some while queued, most while their rows run."""
    def schedule(sim: Simulation) -> None:
        rng = random.Random(seed)
        at_s = 0.0
        for _ in range(n):
            at_s += rng.expovariate(rate_img_s)
            cancel = rng.random() < fraction
            after = rng.uniform(0.0, cancel_within_s)
            sim.submit(key, at_s, cancel_after_s=after if cancel else None)
    return Workload(name, f"Poisson at {rate_img_s:.3g} images/s, {fraction:.0%} cancelled", schedule)
