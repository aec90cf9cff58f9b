"""The step engine as the worker uses it under BATCH_POLICY=step (tiny pipeline on the CPU):
StepEngine.scaled_latents, what previews read, each row's latents as its
scheduler scales them for its next UNet call; and the engine warm-up of TORCH_COMPILE."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.model import schedulers
from gpu_worker.model.pipelines import GenerationJob, load_pipeline
from gpu_worker.model.step_engine import RowSpec, StepEngine
from imagegen.batch_key import BatchKey


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline("tiny", "cpu", "float32")


def rows() -> list[RowSpec]:
    return [RowSpec("a", GenerationJob("a red square", None, 1), BatchKey(64, 64, 6, 7.5)),
            RowSpec("b", GenerationJob("a blue circle", None, 2), BatchKey(64, 64, 4, 1.0))]


def test_unscaled_schedulers_give_the_latents_themselves(pipeline):
    engine = StepEngine(pipeline, schedulers.named_scheduler("ddim", pipeline.diffusers_pipeline.scheduler.config))
    engine.admit(rows())
    engine.step(["a", "b"])
    assert torch.equal(engine.scaled_latents(["a", "b"]), engine.latents(["a", "b"]))


def test_euler_rows_are_scaled_at_their_own_next_sigma(pipeline):
    engine = StepEngine(pipeline, schedulers.named_scheduler("euler", pipeline.diffusers_pipeline.scheduler.config))
    engine.admit(rows())
    engine.step(["a", "b"])
    engine.step(["a"])  # the rows are now at different steps: 2 of 6 and 1 of 4
    latents, scaled = engine.latents(["a", "b"]), engine.scaled_latents(["a", "b"])
    for index, (row_id, steps, done) in enumerate((("a", 6, 2), ("b", 4, 1))):
        reference = schedulers.named_scheduler("euler", pipeline.diffusers_pipeline.scheduler.config)
        reference.set_timesteps(steps)
        sigma = float(reference.sigmas[done])
        expected = latents[index] / (sigma ** 2 + 1) ** 0.5
        assert torch.allclose(scaled[index], expected, rtol=1e-5, atol=1e-6), row_id
    assert not torch.allclose(scaled, latents)
    assert engine.row_ids() == ["a", "b"]  # the rows stay


def test_the_engine_warm_up_steps_a_row_of_its_own_and_leaves_the_engine_empty(pipeline):
    from gpu_worker.shell.step_loop import warm_up_engine
    from imagegen.protocol import ImageSize

    engine = StepEngine(pipeline)
    calls = []
    step = engine.step
    engine.step = lambda row_ids: calls.append(list(row_ids)) or step(row_ids)  # type: ignore[method-assign]
    assert warm_up_engine(engine, ImageSize(64, 64)) >= 0
    assert calls == [["warm-up-0"]] and engine.row_ids() == []  # not compiled: no CUDA graphs, one row


def test_the_engine_warm_up_steps_past_the_cuda_graphs_rows_and_inside_them():
    from gpu_worker.shell.step_loop import size_warm_up_images, warm_up_row_counts

    assert warm_up_row_counts(0) == [1]  # one compilation serves every row count
    assert warm_up_row_counts(2) == [3, 1]  # 6 UNet rows: the compiled UNet; 2: the graphs
    assert size_warm_up_images(0) == [2, 1]  # the decoder's dynamic batch, then a single image
    assert size_warm_up_images(1) == [2, 1]
    assert size_warm_up_images(4) == [5, 1]
