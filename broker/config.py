"""The broker's settings: environment variables, each with a matching command-line flag."""

from __future__ import annotations

import os
from dataclasses import dataclass

from broker.balancing import STRATEGIES
from broker.priorities import DEFAULT_AGING_S, DEFAULT_HALF_LIFE_S, DEFAULT_HIGH_PRIORITY_RESERVE
from imagegen.logs import log_format_setting, log_level_setting
from imagegen.protocol import HEARTBEAT_INTERVAL_RANGE_S, MAX_ATTEMPTS, MAX_CAPACITY
from imagegen.settings import parse_optional_int, parse_optional_str, require, setting
from imagegen.sockets import is_local_endpoint

# Below this the broker could not even start (its idle data size is about 40 MiB).
MIN_MEMORY_LIMIT_BYTES = 64 * 1024 * 1024



DEFAULT_UNCLAIMED_RESULT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class BrokerSettings:
    """python -m broker: queue requests from gateways and balance them over GPU workers."""

    client_bind: str = setting("BROKER_CLIENT_BIND", "tcp://127.0.0.1:5555",
                               "where gateways connect: a loopback tcp:// address or an ipc:// socket file (e.g. "
                               "ipc:///run/imagegen/broker.sock; the broker makes it readable and writable by its "
                               "own user only, so the gateway runs as that user). The link has no authentication, "
                               "so any other address stops the broker at start (exit 2) unless "
                               "BROKER_ALLOW_UNAUTHENTICATED_CLIENTS=true")
    allow_unauthenticated_clients: bool = setting(
        "BROKER_ALLOW_UNAUTHENTICATED_CLIENTS", False,
        "true: allow a non-loopback BROKER_CLIENT_BIND (broker) or BROKER_CLIENT_ADDRESS (gateway), so anyone "
        "who reaches the port can submit work, crowd out other work and exhaust the broker's memory, and "
        "prompts and images cross the network in clear (a WARNING at every start)")
    memory_limit_bytes: int = setting(
        "BROKER_MEMORY_LIMIT_BYTES", 2 * 1024 ** 3,
        "the broker's data memory limit (RLIMIT_DATA, set at start; the idle broker uses about 40 MiB); "
        "past it a message that does not fit is refused and its connection closed (the broker carries on), "
        "and if the broker itself cannot allocate it exits with status 3 for supervisord to restart it; "
        "0: no limit. The shipped supervisord.conf sets it in the broker's environment= line, which wins "
        "over an exported value (docs/operations.md)")
    worker_bind: str = setting("BROKER_WORKER_BIND", "tcp://127.0.0.1:5556",
                               "where GPU workers connect; loopback only by default. Workers on other hosts: bind "
                               "e.g. tcp://0.0.0.0:5556 with CurveZMQ keys (BROKER_CURVE_SECRET_KEY, made by "
                               "python -m imagegen.keys cluster); a non-loopback bind without keys stops the "
                               "broker at start (exit 2) unless BROKER_ALLOW_UNAUTHENTICATED_WORKERS=true")
    allow_unauthenticated_workers: bool = setting(
        "BROKER_ALLOW_UNAUTHENTICATED_WORKERS", False,
        "true: allow a non-loopback BROKER_WORKER_BIND without CurveZMQ keys, so anyone who reaches the "
        "port can register as a worker, read prompts and answer with any image (a closed test network "
        "only; a WARNING at every start)")
    worker_progress_timeout_s: float = setting(
        "WORKER_PROGRESS_TIMEOUT_S", 120.0,
        "seconds a worker holding requests may send no progress, result or failure before it is declared "
        "stuck: told DISCONNECT, its requests requeued to other workers. Workers report progress every "
        "few seconds while a batch runs, so only a hung one reaches it; raise it if a single denoising step "
        "can take longer (e.g. a first TORCH_COMPILE of a new shape). 0: never")
    strategy: str = setting("GPU_LOAD_BALANCE_STRATEGY", "queue-depth",
                            "round-robin or queue-depth (fewest requests held; ties round-robin)")
    max_queue_size: int = setting("MAX_QUEUE_SIZE", 1000,
                                  "requests the broker holds waiting for a worker; beyond it the gateway answers 503")
    heartbeat_interval_s: float = setting("HEARTBEAT_INTERVAL_S", 1.0,
                                          "seconds between worker heartbeats (workers receive it in WELCOME)")
    heartbeat_liveness: int = setting("HEARTBEAT_LIVENESS", 5,
                                      "heartbeats a worker may miss before the broker declares it dead and requeues its work")
    max_attempts: int = setting("MAX_REQUEST_ATTEMPTS", 3,
                                "workers a request may be handed to before it fails (when workers die holding it)")
    unclaimed_results: int = setting(
        "BROKER_UNCLAIMED_RESULTS", 1000,
        "answers (images or failures) the broker keeps when it cannot deliver them because their gateway is "
        "not connected (restarting) or has been silent for 5 s, so that a gateway can collect them by request "
        "id; beyond it the oldest is dropped. 0: keep none (a gateway that restarts loses the answers of the "
        "requests it had sent)")
    unclaimed_result_bytes: int | None = setting(
        "BROKER_UNCLAIMED_RESULT_BYTES", None,
        "bytes of kept answers (images, about 1 KiB more each) at most; beyond it the oldest are dropped, and an "
        "image larger than this is never kept. Counts against BROKER_MEMORY_LIMIT_BYTES, whose half it may not "
        "exceed; unset: a quarter of BROKER_MEMORY_LIMIT_BYTES, at most 256 MiB (256 MiB with no limit)",
        parse=parse_optional_int)
    unclaimed_result_ttl_s: float = setting(
        "BROKER_UNCLAIMED_RESULT_TTL_S", 600.0,
        "seconds a kept answer waits for a gateway to collect it before it is dropped")
    priority_aging_s: float = setting(
        "PRIORITY_AGING_S", DEFAULT_AGING_S,
        "seconds after which a queued request competes one priority class higher (low as normal, normal as "
        "high), again after each further such period, so a low request that waited this long goes before "
        "normal ones that came later and nothing starves behind more urgent work (broker/priorities.py). "
        "0: no aging (strict priority)")
    fair_share_half_life_s: float = setting(
        "FAIR_SHARE_HALF_LIFE_S", DEFAULT_HALF_LIFE_S,
        "seconds over which an API key's GPU time counts half as much in the fair share between keys: among "
        "waiting requests of one priority, the key furthest below its share (GPU-seconds / share=) goes next. "
        "Shorter: the share evens out over recent minutes only; longer: over a longer history")
    high_priority_reserve: int = setting(
        "BROKER_HIGH_PRIORITY_RESERVE", DEFAULT_HIGH_PRIORITY_RESERVE,
        "places each worker takes beyond its capacity (WORKER_MAX_IN_FLIGHT) for requests sent with priority high "
        "alone, so that a high request does not wait in the broker's queue while normal and low ones fill every "
        "worker; the worker's scheduler then runs it first (BATCH_POLICY=step). 0: high requests wait for a "
        "place like the others")
    drain_timeout_s: float = setting("BROKER_DRAIN_TIMEOUT_S", 60.0,
                                     "on SIGTERM, seconds to let accepted requests finish before answering "
                                     "the rest with 503 shutting_down")
    curve_secret_key: str | None = setting("BROKER_CURVE_SECRET_KEY", None,
                                           "the broker's .key_secret file (python -m imagegen.keys broker DIR); "
                                           "set: workers must authenticate with CurveZMQ and the link is encrypted",
                                           parse=parse_optional_str)
    authorized_keys_dir: str | None = setting("BROKER_AUTHORIZED_KEYS_DIR", None,
                                              "folder of the public .key files of the workers allowed to join (with "
                                              "BROKER_CURVE_SECRET_KEY); read again when its .key files change",
                                              parse=parse_optional_str)
    log_level: str = log_level_setting()
    log_format: str = log_format_setting()

    def unclaimed_bytes(self) -> int:
        """BROKER_UNCLAIMED_RESULT_BYTES, or its default: a quarter of the memory limit, at most 256 MiB (a
        lower BROKER_MEMORY_LIMIT_BYTES alone must not make the broker refuse to start)."""
        if self.unclaimed_result_bytes is not None:
            return self.unclaimed_result_bytes
        if self.memory_limit_bytes == 0:
            return DEFAULT_UNCLAIMED_RESULT_BYTES
        return min(DEFAULT_UNCLAIMED_RESULT_BYTES, self.memory_limit_bytes // 4)

    def validate(self) -> None:
        require(self.strategy in STRATEGIES, "GPU_LOAD_BALANCE_STRATEGY",
                f"{self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        require(self.max_queue_size >= 1, "MAX_QUEUE_SIZE", "must be at least 1")
        shortest_s, longest_s = HEARTBEAT_INTERVAL_RANGE_S  # what a worker accepts in the broker's WELCOME
        require(shortest_s <= self.heartbeat_interval_s <= longest_s, "HEARTBEAT_INTERVAL_S",
                f"must be between {shortest_s:g} and {longest_s:g}")
        require(self.heartbeat_liveness >= 1, "HEARTBEAT_LIVENESS", "must be at least 1")
        require(1 <= self.max_attempts <= MAX_ATTEMPTS, "MAX_REQUEST_ATTEMPTS", f"must be between 1 and {MAX_ATTEMPTS}")
        require(self.unclaimed_results >= 0, "BROKER_UNCLAIMED_RESULTS", "must not be negative")
        require(self.unclaimed_bytes() >= 0, "BROKER_UNCLAIMED_RESULT_BYTES", "must not be negative")
        require(self.memory_limit_bytes == 0 or self.unclaimed_bytes() <= self.memory_limit_bytes // 2,
                "BROKER_UNCLAIMED_RESULT_BYTES",
                f"{self.unclaimed_result_bytes} is more than half of BROKER_MEMORY_LIMIT_BYTES "
                f"({self.memory_limit_bytes}): kept answers would leave too little for the requests in flight; "
                f"lower it or raise the memory limit")
        require(self.unclaimed_result_ttl_s > 0, "BROKER_UNCLAIMED_RESULT_TTL_S", "must be positive")
        require(self.priority_aging_s >= 0, "PRIORITY_AGING_S", "must not be negative (0: no aging)")
        require(0 <= self.high_priority_reserve <= MAX_CAPACITY, "BROKER_HIGH_PRIORITY_RESERVE",
                f"must be between 0 and {MAX_CAPACITY}")
        require(self.fair_share_half_life_s > 0, "FAIR_SHARE_HALF_LIFE_S", "must be positive")
        require(self.drain_timeout_s >= 0, "BROKER_DRAIN_TIMEOUT_S", "must not be negative")
        require(self.worker_progress_timeout_s >= 0, "WORKER_PROGRESS_TIMEOUT_S", "must not be negative")
        require(self.curve_secret_key is not None or self.allow_unauthenticated_workers
                or is_local_endpoint(self.worker_bind), "BROKER_WORKER_BIND",
                f"{self.worker_bind} is reachable from other machines, and without CurveZMQ keys anyone who "
                f"reaches it could register as a worker and read prompts. Make keys with "
                f"`python -m imagegen.keys cluster KEYS_DIR WORKER_HOST...` and set BROKER_CURVE_SECRET_KEY and "
                f"BROKER_AUTHORIZED_KEYS_DIR (README: \"Several GPUs, and workers on other hosts\"), bind a "
                f"loopback address (tcp://127.0.0.1:5556), or accept the risk with "
                f"BROKER_ALLOW_UNAUTHENTICATED_WORKERS=true")
        require(self.allow_unauthenticated_clients or is_local_endpoint(self.client_bind), "BROKER_CLIENT_BIND",
                f"{self.client_bind} is reachable from other machines, and the gateway link has no "
                f"authentication: anyone who reaches it could submit work or "
                f"exhaust the broker's memory. Bind a loopback address (tcp://127.0.0.1:5555) or an ipc:// "
                f"socket file (ipc:///run/imagegen/broker.sock) and run the gateway on this host, or accept "
                f"the risk with BROKER_ALLOW_UNAUTHENTICATED_CLIENTS=true")
        require(self.memory_limit_bytes == 0 or self.memory_limit_bytes >= MIN_MEMORY_LIMIT_BYTES,
                "BROKER_MEMORY_LIMIT_BYTES",
                f"must be 0 (no limit) or at least {MIN_MEMORY_LIMIT_BYTES} ({MIN_MEMORY_LIMIT_BYTES >> 20} MiB): "
                f"the idle broker alone uses about 40 MiB")
        require((self.curve_secret_key is None) == (self.authorized_keys_dir is None), "BROKER_CURVE_SECRET_KEY",
                "set it together with BROKER_AUTHORIZED_KEYS_DIR, or neither")
        for env, path in (("BROKER_CURVE_SECRET_KEY", self.curve_secret_key),
                          ("BROKER_AUTHORIZED_KEYS_DIR", self.authorized_keys_dir)):
            require(path is None or os.path.exists(path), env, f"{path} does not exist")
