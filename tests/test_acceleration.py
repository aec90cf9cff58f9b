"""gpu_worker.model.acceleration on the CPU: torch.compile of a real (tiny) UNet and VAE decoder inside the
real pipeline.

CUDA graphs need a GPU (bench/gpu.py measures them there); the compiled path, the dynamic
batch dimension, the warm-up and the eager fallback for shapes not warmed up are tested here.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from gpu_worker.model import acceleration
from gpu_worker.__main__ import warm_up, warm_up_batch_sizes
from gpu_worker.model.acceleration import (AccelerationConfig, CompiledTextEncoderForward, CompiledUnetForward,
                                     CompiledVaeDecode, compiled_forward)
from gpu_worker.decisions.batcher import BatchPolicyConfig
from gpu_worker.model.pipelines import GenerationJob, load_pipeline
from imagegen.batch_key import BatchKey

# torch.compile of the tiny pipeline takes about 2 minutes on a quiet 2-core machine and several times
# that on a busy one; the module fixture compiles inside the first test's time limit.
pytestmark = pytest.mark.timeout(1800)

SETTINGS = BatchKey(64, 64, 3, 7.5)


def jobs(count: int) -> list[GenerationJob]:
    return [GenerationJob(f"a lighthouse, variant {i}", "blurry" if i % 2 else None, 500 + i) for i in range(count)]


@pytest.fixture(scope="module")
def pipelines():
    """(eager, compiled) tiny-sdxl pipelines with the same weights; the compiled one warmed up for
    batches 1-3 at 64x64 (SDXL's UNet also takes the added text and time conditions)."""
    eager = load_pipeline("tiny-sdxl", "cpu", "float32")
    compiled = load_pipeline("tiny-sdxl", "cpu", "float32", AccelerationConfig(compile=True))
    seconds = compiled.warm_up([1, 2, 3], 64, 64)
    yield eager, compiled, seconds
    acceleration.allow_recompiles()


def test_compiled_batches_match_eager_ones(pipelines):
    eager, compiled, seconds = pipelines
    assert sorted(seconds) == [1, 2, 3]
    forward = compiled_forward(compiled.diffusers_pipeline.unet)
    assert forward is not None and compiled_forward(eager.diffusers_pipeline.unet) is None
    decode = compiled.diffusers_pipeline.vae.decode
    assert isinstance(decode, CompiledVaeDecode)
    assert not isinstance(eager.diffusers_pipeline.vae.decode, CompiledVaeDecode)
    np.testing.assert_allclose(compiled.generate_array(jobs(3), SETTINGS), eager.generate_array(jobs(3), SETTINGS),
                               atol=2e-4)
    assert forward.eager_shapes == set() and decode.eager_shapes == set()


def recording_calls(stand_in, rows: list[int]):
    """Make a compiled stand-in record the batch size of each call to its compiled function (which
    still runs); returns a function that undoes it."""
    compiled = stand_in.compiled

    def recorded(first, *args, **kwargs):
        rows.append(first.shape[0])
        return compiled(first, *args, **kwargs)

    stand_in.compiled = recorded
    return lambda: setattr(stand_in, "compiled", compiled)


def test_a_lone_image_runs_compiled_text_encoders_and_decoder(pipelines):
    # A lone request's launch-bound parts: both SDXL text encoders and the single-image VAE decode
    # run their compiled functions (warmed up for one image, so recompiling is refused: an eager
    # fallback would list the shape in eager_shapes).
    eager, compiled, _ = pipelines
    pipe = compiled.diffusers_pipeline
    stand_ins = {name: getattr(pipe, name).forward for name in ("text_encoder", "text_encoder_2")}
    stand_ins["vae"] = pipe.vae.decode
    assert all(isinstance(stand_ins[name], CompiledTextEncoderForward) for name in ("text_encoder", "text_encoder_2"))
    assert stand_ins["vae"].compile_single
    assert not isinstance(eager.diffusers_pipeline.text_encoder.forward, CompiledTextEncoderForward)
    rows = {name: [] for name in stand_ins}
    undo = [recording_calls(stand_in, rows[name]) for name, stand_in in stand_ins.items()]
    try:
        one = compiled.generate_array(jobs(1), SETTINGS)
    finally:
        for restore in undo:
            restore()
    np.testing.assert_allclose(one, eager.generate_array(jobs(1), SETTINGS), atol=2e-4)
    assert rows == {"text_encoder": [1, 1], "text_encoder_2": [1, 1], "vae": [1]}  # prompt and negative prompt
    assert all(stand_in.eager_shapes == set() for stand_in in stand_ins.values())


def test_one_compilation_serves_batch_sizes_not_warmed_up(pipelines):
    eager, compiled, _ = pipelines
    forward = compiled_forward(compiled.diffusers_pipeline.unet)
    decode = compiled.diffusers_pipeline.vae.decode
    # Recompiling is forbidden after the warm-up: a batch of 5 runs only because the batch
    # dimension is dynamic (otherwise it would fall back to eager and be listed below), in the UNet
    # and in the VAE decoder.
    np.testing.assert_allclose(compiled.generate_array(jobs(5), SETTINGS), eager.generate_array(jobs(5), SETTINGS),
                               atol=2e-4)
    assert forward.eager_shapes == set() and decode.eager_shapes == set()
    encoder = compiled.diffusers_pipeline.text_encoder_2.forward
    assert encoder.eager_shapes == set()  # 5 prompts: the text encoders' batch is dynamic too


def test_a_shape_that_would_compile_runs_eager_instead(pipelines, caplog):
    eager, compiled, _ = pipelines
    forward = compiled_forward(compiled.diffusers_pipeline.unet)
    other = BatchKey(128, 64, 2, 7.5)
    graphs_before = counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.WARNING, logger="gpu_worker.model.acceleration"):
        images = compiled.generate_array(jobs(2), other)
    assert counters["stats"]["unique_graphs"] == graphs_before  # nothing compiled
    np.testing.assert_allclose(images, eager.generate_array(jobs(2), other), atol=2e-4)
    assert (4, 4, 8, 16) in forward.eager_shapes
    assert (2, 4, 8, 16) in compiled.diffusers_pipeline.vae.decode.eager_shapes
    assert "UNet input (4, 4, 8, 16) was not warmed up; it runs eager" in caplog.text
    assert "VAE decoder input (2, 4, 8, 16) was not warmed up; it runs eager" in caplog.text


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


def test_large_batches_are_decoded_in_equal_parts_like_one_decode(pipelines):
    eager = pipelines[0]
    vae = eager.diffusers_pipeline.vae
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    two_images = 2 * acceleration.largest_decoder_activation(vae.config, 8, 8)
    decode = CompiledVaeDecode(vae.decode, vae.config, max_elements=two_images)
    compiled_rows = []

    def compiled(part, return_dict):  # stands in for torch.compile's function: records what it is given
        compiled_rows.append(part.shape[0])
        return vae.decode(part, return_dict=return_dict)

    decode.compiled = compiled
    with torch.inference_mode():
        whole = vae.decode(latents).sample
        (in_parts,) = decode(latents, return_dict=False, generator=[torch.Generator()] * 5)
        as_output = decode(latents[:2]).sample
    assert compiled_rows == [2, 2, 2]  # 5 = 2 + 2 + 1 (one image: eager), then the batch of 2
    decode.compile_single = True  # as TORCH_COMPILE sets it: the single image compiled too
    compiled_rows.clear()
    with torch.inference_mode():
        (single_compiled,) = decode(latents, return_dict=False)
    assert compiled_rows == [2, 2, 1]
    torch.testing.assert_close(single_compiled, whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(in_parts, whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(as_output, whole[:2], atol=1e-5, rtol=1e-4)
