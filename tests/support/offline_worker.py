"""A gpu_worker Worker built in the test's process with no broker behind its link, for tests of its
event-loop logic (tests/integration/test_preemption.py, tests/integration/test_oom.py), and its clean-up."""

from __future__ import annotations

from typing import Any

from gpu_worker.decisions.batcher import BatchPolicyConfig
from gpu_worker.shell.worker import Worker, WorkerIdentity


def offline_worker(backend: Any, config: BatchPolicyConfig, batcher: Any, capacity: int) -> Worker:
    """A worker of ``backend`` whose status messages go nowhere (no broker here); its link's socket
    points at a closed port. Pass it to :func:`close_offline_worker` when done."""
    worker = Worker(WorkerIdentity("w", "h", 0, "fake", "cpu"), backend, config, capacity=capacity,
                    broker_address="tcp://127.0.0.1:9", heartbeat_interval_s=1.0, batcher=batcher)
    worker._send_status = lambda: None
    return worker


def close_offline_worker(worker: Worker) -> None:
    """The link's socket and context (a context left to the garbage collector can block it), and the
    worker's thread pools."""
    worker.link.sock.close(linger=0)
    worker.link.ctx.term()
    for pool in (worker.gpu_thread, worker.encoder_threads, worker.stripe_threads):
        pool.shutdown()
