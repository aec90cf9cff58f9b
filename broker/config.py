"""The broker's settings: environment variables, each with a matching command-line flag."""

from __future__ import annotations

from dataclasses import dataclass

from broker.balancing import STRATEGIES
from imagegen.settings import require, setting


@dataclass(frozen=True)
class BrokerSettings:
    """python -m broker: queue requests from gateways and balance them over GPU workers."""

    client_bind: str = setting("BROKER_CLIENT_BIND", "tcp://127.0.0.1:5555",
                               "where gateways connect; local-only by default")
    worker_bind: str = setting("BROKER_WORKER_BIND", "tcp://0.0.0.0:5556",
                               "where GPU workers connect; all interfaces so workers on other hosts can join")
    strategy: str = setting("GPU_LOAD_BALANCE_STRATEGY", "queue-depth",
                            "round-robin or queue-depth (fewest requests held; ties round-robin)")
    max_queue_size: int = setting("MAX_QUEUE_SIZE", 1000,
                                  "requests the broker holds waiting for a worker; beyond it the gateway answers 503")
    heartbeat_interval_s: float = setting("HEARTBEAT_INTERVAL_S", 1.0,
                                          "seconds between worker heartbeats")
    heartbeat_liveness: int = setting("HEARTBEAT_LIVENESS", 5,
                                      "heartbeats a worker may miss before the broker declares it dead and requeues its work")
    max_attempts: int = setting("MAX_REQUEST_ATTEMPTS", 3,
                                "workers a request may be handed to before it fails (when workers die holding it)")
    drain_timeout_s: float = setting("BROKER_DRAIN_TIMEOUT_S", 60.0,
                                     "on SIGTERM, seconds to let accepted requests finish before answering "
                                     "the rest with 503 shutting_down")
    log_level: str = setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR")

    def validate(self) -> None:
        require(self.strategy in STRATEGIES, "GPU_LOAD_BALANCE_STRATEGY",
                f"{self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        require(self.max_queue_size >= 1, "MAX_QUEUE_SIZE", "must be at least 1")
        require(self.heartbeat_interval_s > 0, "HEARTBEAT_INTERVAL_S", "must be positive")
        require(self.heartbeat_liveness >= 1, "HEARTBEAT_LIVENESS", "must be at least 1")
        require(self.max_attempts >= 1, "MAX_REQUEST_ATTEMPTS", "must be at least 1")
        require(self.drain_timeout_s >= 0, "BROKER_DRAIN_TIMEOUT_S", "must not be negative")
