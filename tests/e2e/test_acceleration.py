"""gpu_worker.model.acceleration on the CPU: torch.compile of a real (tiny) UNet, text encoders and VAE
decoder inside the real pipeline. Compiling runs the C++ compiler (processes), hence e2e; the rest
of acceleration, in one process: tests/integration/test_acceleration.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from gpu_worker.model import acceleration
from gpu_worker.model.acceleration import (AccelerationConfig, CompiledTextEncoderForward, CompiledVaeDecode,
                                           compiled_forward)
from gpu_worker.model.pipelines import load_pipeline
from imagegen.batch_key import BatchKey
from tests.support.acceleration_jobs import SETTINGS, jobs

# torch.compile of the tiny pipeline takes about 2 minutes on a quiet 2-core machine and several times
# that on a busy one; the module fixture compiles inside the first test's time limit.
pytestmark = pytest.mark.timeout(1800)


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
    with caplog.at_level(logging.INFO, logger="gpu_worker.model.acceleration"):
        images = compiled.generate_array(jobs(2), other)
    assert counters["stats"]["unique_graphs"] == graphs_before  # nothing compiled
    np.testing.assert_allclose(images, eager.generate_array(jobs(2), other), atol=2e-4)
    assert (4, 4, 8, 16) in forward.eager_shapes
    assert (2, 4, 8, 16) in compiled.diffusers_pipeline.vae.decode.eager_shapes
    assert "UNet input (4, 4, 8, 16) is not warm; it runs eager" in caplog.text
    assert "VAE decoder input (2, 4, 8, 16) is not warm; it runs eager" in caplog.text


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
