"""The broker sends a request to a worker that has its image size warm (runs it compiled without
compiling), when one with credit does: broker.balancing (Candidate.preferred) and broker.state
(WorkerRecord.warm_sizes, WorkerRecord.compile_state, WorkerRecord.has_warm); and /stats shows each
worker's sizes (broker.stats). Pure: every call takes ``now`` from a fake clock (plain floats)."""

from __future__ import annotations

from broker.balancing import Balancer, Candidate
from broker.state import BrokerPolicy, BrokerState, ToWorker
from broker.stats import build_stats
from imagegen.protocol import (
    BatchingConfig,
    Generate,
    GenerationParams,
    Heartbeat,
    ImageSize,
    Register,
    WorkerStatus,
)

T0 = 100.0
CLIENT = b"gateway-1"
A, B, C = b"a", b"b", b"c"
S512, S768, S640 = ImageSize(512, 512), ImageSize(768, 768), ImageSize(640, 640)
LISTED = (S512, S768)


def reg(name: str, sizes=(), warm=(), capacity: int = 4, gpu_id: int = 0, unlisted: str = "eager") -> Register:
    batching = BatchingConfig(enable_batching=True, max_batch_size=8, max_wait_time=0.1, min_batch_size=1,
                              min_wait_time=0.05, adaptive_batching=True, adaptive_threshold=10)
    return Register(worker_name=name, host="host-a", gpu_id=gpu_id, pid=1000 + gpu_id, model_id="tiny/sd",
                    device=f"cuda:{gpu_id}", capacity=capacity, batching=batching, sizes=tuple(sizes),
                    warm_sizes=tuple(warm), unlisted_size=unlisted)


def hb(compile_state: str = "off", warm=(), **counters) -> Heartbeat:
    return Heartbeat(WorkerStatus("ready", 0, 0, 0, 0, 0, 0, 0.0, 0.0, compile_state=compile_state,
                                  warm_sizes=tuple(warm), **counters))


def gen(request_id: str, size: ImageSize) -> Generate:
    return Generate(request_id, GenerationParams("a cat", size.width, size.height, 25, 7.5, 1, None), 600.0)


def state(*workers: tuple[bytes, Register]) -> BrokerState:
    s = BrokerState(BrokerPolicy(strategy="queue-depth", fair_share=False), epoch="epoch-1")
    for routing_id, registration in workers:
        s.register(routing_id, registration, T0)
    return s


def send(s: BrokerState, request_id: str, size: ImageSize, now: float = T0) -> bytes | None:
    """Submit one request; the worker it was dispatched to (None: it stays queued)."""
    actions = s.submit(CLIENT, gen(request_id, size), now)
    chosen = [a.routing_id for a in actions if isinstance(a, ToWorker) and isinstance(a.message, Generate)]
    return chosen[0] if chosen else None


# ------------------------------------------------------------------ the balancer alone


def test_the_balancer_picks_a_preferred_candidate_with_credit_before_a_less_loaded_one():
    b = Balancer("queue-depth")
    assert b.choose([Candidate("a", 0, 4, preferred=False), Candidate("b", 3, 4)]) == "b"
    assert b.choose([Candidate("a", 0, 4, preferred=False), Candidate("b", 4, 4)]) == "a"  # b is full
    assert b.choose([Candidate("a", 0, 4, preferred=False), Candidate("b", 0, 4, over_share=True)]) == "a"
    assert b.choose([Candidate("a", 0, 4, preferred=False), Candidate("b", 4, 4, preferred=False)]) == "a"


def test_the_strategy_still_decides_among_the_preferred():
    b = Balancer("queue-depth")
    cands = [Candidate("a", 1, 4), Candidate("b", 0, 4, preferred=False), Candidate("c", 2, 4)]
    assert b.choose(cands) == "a"  # fewest held among the preferred
    rr = Balancer("round-robin")
    cands = [Candidate("a", 0, 4), Candidate("b", 0, 4, preferred=False), Candidate("c", 0, 4)]
    assert [rr.choose(cands) for _ in range(4)] == ["a", "c", "a", "c"]


# ------------------------------------------------------------------ the broker's routing


def test_a_size_warm_only_on_b_goes_to_b_though_a_is_less_loaded_and_to_a_once_b_is_full():
    s = state((A, reg("a", LISTED, warm=[S512])), (B, reg("b", LISTED, warm=LISTED, capacity=2, gpu_id=1)))
    assert [send(s, f"r{i}", S768) for i in range(3)] == [B, B, A]  # A holds none; B is full after two


def test_without_a_warm_worker_the_balancer_decides_as_before():
    s = state((A, reg("a", LISTED, warm=[S512])), (B, reg("b", LISTED, warm=[S512], gpu_id=1)))
    assert [send(s, f"r{i}", S768) for i in range(4)] == [A, B, A, B]  # fewest held, ties round-robin


def test_a_worker_with_compile_off_has_every_size_warm():
    s = state((A, reg("a", LISTED, warm=[S768])), (B, reg("b", gpu_id=1)))  # B lists no sizes: compile off
    assert s.workers[B].compile_state == "off" and s.workers[B].has_warm(S640)
    assert [send(s, f"r{i}", S640) for i in range(3)] == [B, B, B]  # warm nowhere else
    assert [send(s, f"s{i}", S768) for i in range(2)] == [A, A]  # both warm: A holds fewer
    s.heartbeat(B, hb("off"), T0 + 1)
    assert s.workers[B].has_warm(S768)


def test_a_heartbeat_saying_compile_off_makes_every_size_warm_on_a_worker_that_lists_sizes():
    s = state((A, reg("a", LISTED, warm=[S768])), (B, reg("b", LISTED, warm=[S512], gpu_id=1)))
    assert [send(s, f"r{i}", S768) for i in range(2)] == [A, A]  # cold on B
    s.heartbeat(B, hb("off"), T0 + 1)
    assert send(s, "r2", S768) == B  # B counts as warm now: fewest held decides


def test_a_registration_listing_sizes_with_none_warm_counts_as_compile_off_until_its_first_heartbeat():
    """A worker that compiles warms a size before it registers; one listing sizes with none warm
    runs every size alike (TORCH_COMPILE off, or no warm-up), and its heartbeats say so."""
    s = state((A, reg("a", LISTED, warm=[S512])), (B, reg("b", LISTED, warm=[], gpu_id=1)))
    assert s.workers[B].compile_state == "off" and s.workers[B].has_warm(S768)
    assert [send(s, f"r{i}", S768) for i in range(2)] == [B, B]  # cold on A, every size warm on B
    s.heartbeat(B, hb("warming", warm=[S512]), T0 + 1)  # it compiles after all: its heartbeat decides
    assert s.workers[B].compile_state == "warming" and not s.workers[B].has_warm(S768)


def test_the_registrations_warm_sizes_count_until_the_first_heartbeat_then_the_heartbeats():
    s = state((A, reg("a", LISTED, warm=[S512])), (B, reg("b", LISTED, warm=LISTED, gpu_id=1)))
    assert (s.workers[A].compile_state, s.workers[B].compile_state) == ("warming", "warm")
    assert s.workers[A].warm_sizes == (S512,)
    assert send(s, "r0", S768) == B  # before any heartbeat: A registered 768 cold
    s.heartbeat(A, hb("warming", warm=[S512]), T0 + 1)
    assert send(s, "r1", S768) == B
    s.heartbeat(A, hb("warm", warm=LISTED), T0 + 2)  # A finished its warm-up
    assert s.workers[A].warm_sizes == LISTED and s.workers[A].compile_state == "warm"
    assert send(s, "r2", S768, T0 + 2) == A  # now both have it warm and A holds fewer


def test_stats_show_each_workers_sizes_compile_state_and_eager_counts():
    s = state((A, reg("a", LISTED, warm=[S512], unlisted="snap")), (B, reg("b", gpu_id=1)))
    document = build_stats(s, T0)
    a, b = document["per_gpu_stats"]
    assert (a["sizes"], a["warm_sizes"], a["compile_state"], a["unlisted_size"]) == (
        ["512x512", "768x768"], ["512x512"], "warming", "snap")
    assert (b["sizes"], b["warm_sizes"], b["compile_state"], b["unlisted_size"]) == ([], [], "off", "eager")
    s.heartbeat(A, hb("warm", warm=LISTED, eager_batches=3, eager_images=7, unlisted_refused=0,
                      unlisted_snapped=2), T0 + 1)
    a = build_stats(s, T0 + 1)["per_gpu_stats"][0]
    assert (a["warm_sizes"], a["compile_state"]) == (["512x512", "768x768"], "warm")
    assert (a["eager_batches"], a["eager_images"], a["unlisted_refused"], a["unlisted_snapped"]) == (3, 7, 0, 2)
    single = state((C, reg("c", [S640], warm=[S640], unlisted="refuse")))
    single.heartbeat(C, hb("warm", warm=[S640], unlisted_refused=5), T0)
    worker = build_stats(single, T0)["worker"]
    assert (worker["sizes"], worker["warm_sizes"], worker["unlisted_refused"]) == (["640x640"], ["640x640"], 5)
