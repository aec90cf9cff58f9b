"""/stats for a large cluster still crosses the client link (it once failed past ~870 workers)."""

from __future__ import annotations

import msgpack
import pytest

from broker.state import BrokerPolicy, BrokerState
from broker.stats import build_stats
from imagegen import protocol
from imagegen.protocol import (
    CLIENT_LINK,
    MAX_HEADER_BYTES,
    BatchingConfig,
    Command,
    ProtocolError,
    Register,
    StatsReply,
)


def cluster_state(hosts: int, gpus_per_host: int) -> BrokerState:
    state = BrokerState(BrokerPolicy(), epoch="e")
    batching = BatchingConfig(enable_batching=True, max_batch_size=16, max_wait_time=2.0, min_batch_size=1,
                              min_wait_time=0.5, adaptive_batching=True, adaptive_threshold=10)
    for h in range(hosts):
        for gpu in range(gpus_per_host):
            name = f"gpu-host-{h:04d}-gpu{gpu}"
            state.register(name.encode(), Register(worker_name=name, host=f"gpu-host-{h:04d}", gpu_id=gpu, pid=1000 + gpu,
                                                   model_id="stabilityai/stable-diffusion-xl-base-1.0",
                                                   device=f"cuda:{gpu}", capacity=32, batching=batching), now=0.0)
    return state


def test_stats_of_2048_gpus_on_256_hosts_reach_the_gateway():
    stats = build_stats(cluster_state(256, 8), now=1.0)
    frames = protocol.encode(CLIENT_LINK, StatsReply("q", stats))
    assert len(frames[2]) > MAX_HEADER_BYTES  # larger than any other message may be
    reply, _ = protocol.decode(frames, CLIENT_LINK)
    assert reply.stats["num_gpus"] == 2048 and len(reply.stats["per_gpu_stats"]) == 2048
    first = reply.stats["per_gpu_stats"][0]
    assert (first["host"], first["gpu_id"], first["worker"]) == ("gpu-host-0000", 0, "gpu-host-0000-gpu0")


def test_other_messages_keep_the_small_header_cap():
    header = msgpack.packb({"request_id": "x" * (MAX_HEADER_BYTES + 1)})
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode([CLIENT_LINK, Command.GENERATE.value, header], CLIENT_LINK)
