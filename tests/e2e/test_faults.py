"""Faults with real processes and sockets: every accepted request ends with its image or a clear
error within its deadline, never a hang or a silent drop.

Workers run the FAKE backend (gpu_worker/model/fake_backend.py: no model, a fixed delay per batch), since
what is under test is the serving layer's behaviour when processes die, hang or restart.
Heartbeats every 0.2 s with a liveness of 5 put the detection window at 1 s.
"""

from __future__ import annotations

import signal
import time

import msgpack
import pytest
import zmq

from imagegen import protocol
from imagegen.protocol import WORKER_LINK, Command, Failure, Generate, GenerationParams, Register, Welcome
from tests.support.cluster import Cluster, post, request_body, send_concurrently
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(120)


def results(futures) -> list[tuple[int, dict, float]]:
    return [f.result() for f in futures]


def test_sigkill_of_a_worker_under_load_loses_no_request(make_cluster):
    c = make_cluster(MAX_BATCH_SIZE="2").start_all(workers=2)
    pool, futures = send_concurrently(c.url, 16)
    time.sleep(0.5)
    c.signal("worker0", signal.SIGKILL)
    done = results(futures)
    assert [status for status, _, _ in done] == [200] * 16, done
    stats = c.stats()
    assert stats["broker"]["workers_expired"] == 1 and stats["broker"]["requeued"] >= 1, stats
    assert {r["worker"] for _, r, _ in done} >= {"worker1"}


def test_sigstop_worker_is_detected_within_the_liveness_window_and_its_work_requeued(make_cluster):
    c = make_cluster(MAX_BATCH_SIZE="2", MODEL_ID="fake:delay=0.5").start_all(workers=2)
    pool, futures = send_concurrently(c.url, 12)
    time.sleep(0.3)
    stopped_at = time.monotonic()
    c.signal("worker0", signal.SIGSTOP)
    c.wait_for(lambda s: s["broker"]["workers_expired"] == 1, 5, "the stopped worker to expire")
    detection_s = time.monotonic() - stopped_at
    print(f"SIGSTOP detected after {detection_s:.2f}s")  # for docs/reliability.md (pytest -s)
    assert detection_s < 1.0 + 0.2 + 0.5, detection_s  # liveness window + one check interval + polling
    done = results(futures)
    assert [status for status, _, _ in done] == [200] * 12, done
    # Woken up, it learns the broker forgot it, drops its stale queue and registers again.
    c.signal("worker0", signal.SIGCONT)
    c.wait_for_workers(2, timeout_s=10)
    assert post(c.url, request_body(99))[0] == 200


def test_broker_restart_under_load_resumes_service_and_nothing_hangs(make_cluster):
    c = make_cluster(MAX_BATCH_SIZE="2", REQUEST_TIMEOUT_S="20").start_all(workers=1)
    pool, futures = send_concurrently(c.url, 8, timeout_s=30)
    time.sleep(0.4)
    c.signal("broker", signal.SIGKILL)
    c.processes["broker"].wait()
    time.sleep(0.5)
    c.start("broker", "broker")
    done = results(futures)
    statuses = [status for status, _, _ in done]
    assert set(statuses) <= {200, 503}, done  # answered (a hung request would end in the client's timeout)
    assert all(body["error"]["code"] == "broker_restarted" for status, body, _ in done if status == 503), done
    assert statuses.count(200) >= 6, done  # resent once with the same id, most are served
    c.wait_for_workers(1, timeout_s=15)
    assert post(c.url, request_body(99))[0] == 200


def test_sigterm_drains_a_worker_with_zero_loss(make_cluster):
    c = make_cluster(MAX_BATCH_SIZE="2", MODEL_ID="fake:delay=0.4").start_all(workers=2)
    pool, futures = send_concurrently(c.url, 16)
    time.sleep(0.5)
    c.signal("worker0", signal.SIGTERM)
    done = results(futures)
    assert [status for status, _, _ in done] == [200] * 16, done
    assert c.processes["worker0"].wait(timeout=30) == 0
    assert "worker0 leaves: worker shutting down" in (c.dir / "broker.log").read_text()


def test_sigterm_drains_the_broker_refusing_new_work_meanwhile(make_cluster):
    c = make_cluster(MAX_BATCH_SIZE="4", MODEL_ID="fake:delay=1.0").start_all(workers=1)
    pool, futures = send_concurrently(c.url, 4)
    time.sleep(0.3)
    c.signal("broker", signal.SIGTERM)
    time.sleep(0.2)
    status, body, _ = post(c.url, request_body(50))
    assert status == 503 and body["error"]["code"] == "shutting_down", body
    done = results(futures)
    assert [s for s, _, _ in done] == [200] * 4, done
    assert c.processes["broker"].wait(timeout=30) == 0


def test_sigterm_to_the_gateway_lets_requests_in_progress_finish(make_cluster):
    c = make_cluster(MAX_BATCH_SIZE="4", MODEL_ID="fake:delay=1.5").start_all(workers=1)
    pool, futures = send_concurrently(c.url, 3)
    time.sleep(0.5)
    c.signal("gateway", signal.SIGTERM)
    done = results(futures)
    assert [s for s, _, _ in done] == [200] * 3, done
    assert c.processes["gateway"].wait(timeout=30) == 0


def test_out_of_memory_batches_are_split_and_the_worker_lowers_its_batch_size(make_cluster):
    c = make_cluster(MAX_BATCH_SIZE="8", MAX_BATCH_WAIT_TIME="1.0",
                     MODEL_ID="fake:delay=0.1,oom_above=2").start_all(workers=1)
    pool, futures = send_concurrently(c.url, 8)
    done = results(futures)
    assert [s for s, _, _ in done] == [200] * 8, done
    assert len({body["image_id"] for _, body, _ in done}) == 8
    c.wait_for(lambda s: s["config"]["max_batch_size"] == 2, 5, "the lowered batch size in /stats")
    assert "max batch size lowered to 2" in (c.dir / "worker0.log").read_text()


def test_deadline_passed_answers_504_and_the_request_is_dropped(make_cluster):
    c = make_without_workers(make_cluster, REQUEST_TIMEOUT_S="1")
    status, body, seconds = post(c.url, request_body(1))
    # The broker answers it itself at its deadline, saying where it was (the gateway waits a grace for
    # that; its own answer would not say where the request was).
    assert status == 504 and body["error"]["code"] == "deadline_exceeded", (status, body, seconds)
    assert "no GPU worker is registered" in body["error"]["message"], body
    c.wait_for(lambda s: s["broker"]["in_progress"] == 0 and s["broker"]["deadline_expired"] == 1, 3,
               "the broker to drop the late request")


def test_client_disconnect_cancels_its_queued_request(make_cluster):
    c = make_without_workers(make_cluster)
    with pytest.raises(OSError):  # urllib gives up after 0.5 s and closes the connection
        post(c.url, request_body(1), timeout_s=0.5)
    c.wait_for(lambda s: s["broker"]["cancelled"] == 1 and s["broker"]["queue_depth"] == 0, 5,
               "the disconnected client's request to be cancelled")


def make_without_workers(make_cluster, **settings: str) -> Cluster:
    c = make_cluster(**settings)
    c.start("broker", "broker")
    c.start("gateway", "gateway")
    c.wait_for(lambda s: s["num_gpus"] == 0, 30, "the gateway and broker to answer")
    return c


def scripted_broker_receives(router: zmq.Socket, wanted: type, timeout_s: float = 10.0) -> tuple[bytes, protocol.Message]:
    """The next message of type ``wanted`` a worker sent the test's raw ROUTER (heartbeats and the
    rest skipped), within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if router.poll(100):
            peer, *frames = router.recv_multipart()
            message, _ = protocol.decode(frames, WORKER_LINK)
            if isinstance(message, wanted):
                return peer, message
    raise AssertionError(f"the worker sent no {wanted.__name__} within {timeout_s}s")


def test_a_request_the_worker_cannot_read_is_answered_at_once_not_left_to_its_deadline(make_cluster):
    """The real worker process against a scripted broker (a raw ROUTER): a GENERATE beyond the
    worker's bounds (as from a broker or gateway of another build) gets a Failure naming the field at
    once; its client would otherwise wait out its deadline. An unreadable header has no id to answer."""
    c = make_cluster()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    address = f"tcp://127.0.0.1:{free_port()}"
    router.bind(address)
    try:
        c.start_worker(0, BROKER_WORKER_ADDRESS=address)
        peer, _ = scripted_broker_receives(router, Register)
        router.send_multipart([peer, *protocol.encode(WORKER_LINK, Welcome("epoch-1", 0.2))])
        router.send_multipart([peer, WORKER_LINK, Command.GENERATE.value, b"\xc1"])  # no id to answer
        frames = protocol.encode(WORKER_LINK, Generate("r-1", GenerationParams("p", 64, 64, 1, 1.0, 1), 30.0))
        header = protocol.unpack_header(frames[2])
        header["params"] = {**header["params"], "num_inference_steps": 5000}  # the protocol allows 1000
        frames[2] = msgpack.packb(header, use_bin_type=True)
        sent = time.monotonic()
        router.send_multipart([peer, *frames])
        _, failure = scripted_broker_receives(router, Failure)
        assert time.monotonic() - sent < 5
        assert failure.request_id == "r-1" and failure.code == "generation_failed"
        assert "could not read this request" in failure.message and "num_inference_steps" in failure.message
    finally:
        router.close(linger=0)
        ctx.term()
