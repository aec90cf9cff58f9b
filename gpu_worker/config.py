"""The GPU worker's settings: environment variables (the seed's names), each with a matching flag."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from imagegen.settings import parse_optional_int, require, setting


def _optional_str(text: str) -> str | None:
    return text.strip() or None


@dataclass(frozen=True)
class WorkerSettings:
    """python -m gpu_worker: load a diffusion pipeline on one GPU and serve batches for the broker."""

    broker_address: str = setting("BROKER_WORKER_ADDRESS", "tcp://127.0.0.1:5556",
                                  "the broker's worker endpoint (another host's address for a remote worker)")
    model_id: str = setting("MODEL_ID", "tiny",
                            "tiny | tiny-sdxl | sd15 | sdxl (random-weight architectures), "
                            "a local folder written by save_pretrained, or a Hugging Face hub id")
    enable_batching: bool = setting("ENABLE_BATCHING", True,
                                    "false: one request per inference, no waiting")
    max_batch_size: int | None = setting("MAX_BATCH_SIZE", None,
                                         "requests per batch; unset: auto-detected from free GPU memory "
                                         "(4 on CPU)", parse=parse_optional_int)
    max_batch_wait_s: float = setting("MAX_BATCH_WAIT_TIME", 5.0,
                                      "seconds the oldest request waits for batch-mates")
    min_batch_size: int = setting("MIN_BATCH_SIZE", 1,
                                  "a batch smaller than this waits the full MAX_BATCH_WAIT_TIME")
    min_batch_wait_s: float = setting("MIN_BATCH_WAIT_TIME", 0.5,
                                      "the shortest window adaptive batching shrinks to "
                                      "(capped at MAX_BATCH_WAIT_TIME)")
    adaptive_batching: bool = setting("ENABLE_ADAPTIVE_BATCHING", True,
                                      "shorten the window when the queue is deep")
    adaptive_threshold: int = setting("ADAPTIVE_BATCH_THRESHOLD", 10,
                                      "queue depth at which adaptive batching starts shortening the window")
    max_in_flight: int | None = setting("WORKER_MAX_IN_FLIGHT", None,
                                        "requests the broker may hand this worker at once; "
                                        "unset: 2 x MAX_BATCH_SIZE (one batch running, one forming)",
                                        parse=parse_optional_int)
    gpu_id: int | None = setting("GPU_ID", None,
                                 "GPU id reported in stats; unset: the first entry of CUDA_VISIBLE_DEVICES",
                                 parse=parse_optional_int)
    worker_name: str | None = setting("WORKER_NAME", None, "unique worker name; unset: HOST-gpuN",
                                      parse=_optional_str)
    host: str | None = setting("WORKER_HOST", None, "host name reported in stats; unset: this machine's",
                               parse=_optional_str)
    device: str | None = setting("DEVICE", None, "torch device; unset: cuda if available, else cpu",
                                 parse=_optional_str)
    dtype: str | None = setting("DTYPE", None, "bfloat16 | float16 | float32; unset: bf16 on CUDA, fp32 on CPU",
                                parse=_optional_str)
    heartbeat_interval_s: float = setting("HEARTBEAT_INTERVAL_S", 1.0,
                                          "seconds between heartbeats (the broker's WELCOME may override it)")
    heartbeat_liveness: int = setting("HEARTBEAT_LIVENESS", 5,
                                      "broker heartbeats the worker may miss before it reconnects and registers again")
    warmup: bool = setting("WORKER_WARMUP", True,
                           "run one small generation before registering, so no request pays for first-call setup")
    log_level: str = setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR")

    def validate(self) -> None:
        require(self.max_batch_size is None or self.max_batch_size >= 1, "MAX_BATCH_SIZE", "must be at least 1")
        require(self.max_batch_wait_s >= 0, "MAX_BATCH_WAIT_TIME", "must not be negative")
        require(self.min_batch_wait_s >= 0, "MIN_BATCH_WAIT_TIME", "must not be negative")
        require(self.min_batch_size >= 1, "MIN_BATCH_SIZE", "must be at least 1")
        require(self.max_batch_size is None or self.min_batch_size <= self.max_batch_size, "MIN_BATCH_SIZE",
                "must not exceed MAX_BATCH_SIZE")
        require(self.adaptive_threshold >= 1, "ADAPTIVE_BATCH_THRESHOLD", "must be at least 1")
        require(self.max_in_flight is None or self.max_in_flight >= 1, "WORKER_MAX_IN_FLIGHT", "must be at least 1")
        require(self.heartbeat_interval_s > 0, "HEARTBEAT_INTERVAL_S", "must be positive")
        require(self.heartbeat_liveness >= 1, "HEARTBEAT_LIVENESS", "must be at least 1")

    def resolved_gpu_id(self, cuda_available: bool) -> int:
        if self.gpu_id is not None:
            return self.gpu_id
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if visible.isdigit():
            return int(visible)
        return 0 if cuda_available else -1

    def resolved_host(self) -> str:
        return self.host or socket.gethostname()
