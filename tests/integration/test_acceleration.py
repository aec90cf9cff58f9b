"""gpu_worker.model.acceleration on the CPU, in one process: which calls run compiled, CUDA graphs or
eager, layout changes, the warm-up's order and its out-of-memory fallback, and the decoder's parts.

CUDA graphs need a GPU (bench/gpu.py measures them there); torch.compile itself (the compiled path,
the dynamic batch dimension, the warm-up and the eager fallback for shapes not warmed up) runs the
C++ compiler: tests/e2e/test_acceleration.py.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gpu_worker.__main__ import warm_up, warm_up_batch_sizes
from gpu_worker.decisions.batcher import BatchPolicyConfig
from gpu_worker.model import acceleration
from gpu_worker.model.acceleration import AccelerationConfig, CompiledUnetForward
from gpu_worker.model.pipelines import load_pipeline
from tests.support.acceleration_jobs import SETTINGS, jobs

# The tiny pipelines load and run here too, on machines that may be busy (the limit of
# tests/e2e/test_acceleration.py, where they compile).
pytestmark = pytest.mark.timeout(1800)


def test_cuda_graphs_only_for_small_batches_and_never_for_one_row():
    forward = CompiledUnetForward(lambda *args, **kwargs: None, cuda_graph_max_batch=2)
    assert [forward.mode_for(rows) for rows in (1, 2, 4, 5, 6, 32)] == [
        "eager", "graphs", "graphs", "compiled", "compiled", "compiled"]
    no_graphs = CompiledUnetForward(lambda *args, **kwargs: None, cuda_graph_max_batch=0)
    assert no_graphs.graphed is None and no_graphs.mode_for(2) == "compiled"
    no_graphs.enable_cuda_graphs(1)
    assert no_graphs.graphed is not None and no_graphs.mode_for(2) == "graphs" and no_graphs.mode_for(4) == "compiled"


def test_layout_changes_keep_the_images():
    reference = load_pipeline("tiny", "cpu", "float32")
    changed = load_pipeline("tiny", "cpu", "float32")
    applied = acceleration.apply_layout(changed.diffusers_pipeline, channels_last=True, fuse_qkv=True)
    assert applied == ["channels_last", "fused QKV"]
    np.testing.assert_allclose(changed.generate_array(jobs(2), SETTINGS), reference.generate_array(jobs(2), SETTINGS),
                               atol=2e-4)


def test_on_the_cpu_layout_changes_are_not_applied():
    pipeline = load_pipeline("tiny", "cpu", "float32")
    assert acceleration.accelerate(pipeline.diffusers_pipeline, pipeline.device, AccelerationConfig()) == "none"


@pytest.mark.parametrize("max_batch, expected", [(1, [1]), (2, [2, 1]), (5, [5, 1, 2, 3, 4])])
def test_warm_up_batch_sizes_are_every_size_the_largest_first(max_batch, expected):
    assert warm_up_batch_sizes(max_batch) == expected
    assert warm_up_batch_sizes(max_batch, cuda_graph_max_batch=0) == expected


@pytest.mark.parametrize("max_batch, graph_max, expected", [(2, 2, [1, 2]), (1, 2, [1]), (3, 4, [1, 2, 3]),
                                                            (3, 2, [3, 1, 2])])
def test_when_every_size_runs_with_cuda_graphs_the_batch_of_one_warms_up_first(max_batch, graph_max, expected):
    # the CUDA-graph mode compiles at the first size it sees: that should be the lone request's
    assert warm_up_batch_sizes(max_batch, cuda_graph_max_batch=graph_max) == expected


def test_the_warm_up_orders_sizes_by_the_cuda_graph_limit_only_when_compiling():
    calls = RunsOutOfMemoryAbove(limit=8)
    warm_up(calls, BatchPolicyConfig(max_batch_size=2), compiled=True, cuda_graph_max_batch=2)
    warm_up(calls, BatchPolicyConfig(max_batch_size=2), compiled=False, cuda_graph_max_batch=2)
    assert calls.calls == [[1, 2], [2, 1]]


class RunsOutOfMemoryAbove:
    """Stands in for ImagePipeline.warm_up: batches larger than ``limit`` raise CUDA's OOM error."""

    native_size = 64

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls: list[list[int]] = []

    def warm_up(self, sizes, width, height):
        self.calls.append(list(sizes))
        if max(sizes) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {size: 0.0 for size in sizes}


def test_a_warm_up_that_runs_out_of_memory_halves_the_max_batch_size():
    policy = BatchPolicyConfig(max_batch_size=20, min_batch_size=16, max_batch_pixels=20 * 64 * 64)
    fake = RunsOutOfMemoryAbove(limit=6)
    fitted = warm_up(fake, policy, compiled=False)
    assert fake.calls == [[20, *range(1, 20)], [10, *range(1, 10)], [5, 1, 2, 3, 4]]
    assert (fitted.max_batch_size, fitted.min_batch_size, fitted.max_batch_pixels) == (5, 5, 5 * 64 * 64)
    assert warm_up(RunsOutOfMemoryAbove(limit=64), policy, compiled=False) == policy


def test_other_warm_up_errors_and_a_batch_of_one_that_does_not_fit_are_raised():
    with pytest.raises(torch.OutOfMemoryError):
        warm_up(RunsOutOfMemoryAbove(limit=0), BatchPolicyConfig(max_batch_size=4), compiled=False)
    broken = SimpleNamespace(native_size=64, warm_up=lambda *args: (_ for _ in ()).throw(ValueError("bad config")))
    with pytest.raises(ValueError):
        warm_up(broken, replace(BatchPolicyConfig(), max_batch_size=4), compiled=False)


@pytest.mark.parametrize("name, latent_size, per_decode", [("sd15", 64, 31), ("sdxl", 128, 7), ("tiny", 8, None)])
def test_largest_decoder_activation_is_the_one_the_decoder_makes(name, latent_size, per_decode):
    from diffusers import AutoencoderKL

    from gpu_worker.model.architectures import _VAES

    with torch.device("meta"):  # real sizes, no memory, no arithmetic
        vae = AutoencoderKL(**_VAES[name])
    largest = [0]

    def record(module, inputs, output):
        largest[0] = max([largest[0], output.numel()] + [t.numel() for t in inputs if isinstance(t, torch.Tensor)])

    for module in vae.decoder.modules():
        module.register_forward_hook(record)
    with torch.no_grad():
        vae.decode(torch.empty(1, 4, latent_size, latent_size, device="meta"))
    assert acceleration.largest_decoder_activation(vae.config, latent_size, latent_size) == largest[0]
    if per_decode:
        assert acceleration.images_per_decode(vae.config, latent_size, latent_size) == per_decode


@pytest.mark.parametrize("rows, most, sizes", [(50, 31, [25, 25]), (31, 31, [31]), (16, 7, [6, 5, 5]),
                                               (5, 2, [2, 2, 1]), (2, 1, [1, 1])])
def test_equal_parts(rows, most, sizes):
    parts = acceleration.equal_parts(torch.arange(rows), most)
    assert [len(part) for part in parts] == sizes
    assert torch.equal(torch.cat(parts), torch.arange(rows))
