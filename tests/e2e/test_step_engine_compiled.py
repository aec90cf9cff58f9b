"""gpu_worker.model.step_engine with torch.compile on the CPU: warmed up at one number of UNet rows, the
compiled UNet serves steps of other row counts without compiling again (the engine's per-row timestep is
marked dynamic with the batch; unmarked, torch refuses the dynamic batch at the first compilation).
Compiling runs the C++ compiler (processes), hence e2e: about 45 s on a quiet 2-core machine. On a GPU
(``python -m pytest -m gpu tests/e2e/test_step_engine_compiled.py``), with and without CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.model import acceleration, schedulers
from gpu_worker.model.acceleration import AccelerationConfig, compiled_forward
from gpu_worker.model.pipelines import ImagePipeline, load_pipeline
from gpu_worker.model.step_engine import StepEngine
from tests.integration.test_step_engine import FOX, LIGHTHOUSE, OWL, RAMEN, TOLERANCE

pytestmark = pytest.mark.timeout(1200)  # several times the quiet figure on a busy machine


def run(pipeline: ImagePipeline, warm_up: bool) -> torch.Tensor:
    """Two guided rows take a step (4 UNet rows: the compiled warm-up, when asked), then steps of 7, 3
    and 5 UNet rows; the four rows' latents after them."""
    engine = StepEngine(pipeline, schedulers.named_scheduler("euler", pipeline.diffusers_pipeline.scheduler.config))
    engine.admit([FOX, OWL])
    if warm_up:
        acceleration.warm_up_shapes(lambda _size: engine.step(["fox", "owl"]), [4])
    else:
        engine.step(["fox", "owl"])
    engine.admit([LIGHTHOUSE, RAMEN])
    engine.step(["fox", "owl", "lighthouse", "ramen"])  # 2 + 2 + 2 + 1 UNet rows
    engine.step(["lighthouse", "ramen"])  # 3
    engine.step(["owl", "lighthouse", "ramen"])  # 5
    return engine.latents(["fox", "owl", "lighthouse", "ramen"])


def test_one_warm_up_serves_every_row_count():
    compiled = load_pipeline("tiny", "cpu", "float32",
                             AccelerationConfig(compile=True, cuda_graph_max_batch=0, compile_encoders=False))
    forward = compiled_forward(compiled.diffusers_pipeline.unet)
    assert forward is not None
    rows: list[int] = []
    implementation = forward.compiled

    def recorded(sample, *args, **kwargs):
        rows.append(sample.shape[0])
        return implementation(sample, *args, **kwargs)

    forward.compiled = recorded
    try:
        latents = run(compiled, warm_up=True)
    finally:
        acceleration.allow_recompiles()
    assert rows == [4, 7, 3, 5] and forward.eager_shapes == set()  # every step compiled, none refused
    eager = run(load_pipeline("tiny", "cpu", "float32"), warm_up=False)
    assert (latents - eager).abs().max().item() <= TOLERANCE


def test_the_step_workers_warm_up_compiles_past_the_cuda_graphs_rows_too():
    # With CUDA_GRAPH_MAX_BATCH=1 one guided row (2 UNet rows) runs the graphed UNet and more rows the
    # compiled one, two compilations of the same forward. On the CPU (where the worker never turns the
    # graphs on) "reduce-overhead" compiles without recording graphs: the same split, turned on here.
    # The worker's warm-up must leave both warm: steps of 3 guided rows (6 UNet rows) and of 1 then run
    # compiled, none eager.
    from gpu_worker.shell.step_loop import graphed_image_limit, warm_up_engine
    from imagegen.protocol import ImageSize

    pipeline = load_pipeline("tiny", "cpu", "float32", AccelerationConfig(compile=True, compile_encoders=False))
    forward = compiled_forward(pipeline.diffusers_pipeline.unet)
    assert forward is not None
    forward.enable_cuda_graphs(1)
    engine = StepEngine(pipeline)
    assert graphed_image_limit(engine) == 1
    warm_up_engine(engine, ImageSize(64, 64))
    assert engine.row_ids() == []
    try:
        engine.admit([FOX, OWL, LIGHTHOUSE])
        engine.step(["fox", "owl", "lighthouse"])  # 6 UNet rows: the compiled UNet
        engine.step(["fox"])  # 2: the graphed one
    finally:
        acceleration.allow_recompiles()
    assert forward.eager_shapes == set()


def test_the_pipelines_own_warm_up_serves_the_step_engine():
    # Both batching policies call one compiled UNet (the stock pipeline's 0-dim timestep goes in as one
    # per row, the engine's form): after the run-to-completion warm-up, with recompiles forbidden, the
    # engine's steps of 6 and 2 UNet rows run compiled, none eager, and match the eager engine's.
    compiled = load_pipeline("tiny", "cpu", "float32", AccelerationConfig(compile=True, compile_encoders=False))
    forward = compiled_forward(compiled.diffusers_pipeline.unet)
    assert forward is not None
    compiled.warm_up([2], 64, 64)
    try:
        latents = three_rows_then_one(StepEngine(compiled))
    finally:
        acceleration.allow_recompiles()
    assert forward.eager_shapes == set()
    eager = three_rows_then_one(StepEngine(load_pipeline("tiny", "cpu", "float32")))
    assert (latents - eager).abs().max().item() <= TOLERANCE


def three_rows_then_one(engine: StepEngine) -> torch.Tensor:
    engine.admit([FOX, OWL, LIGHTHOUSE])
    engine.step(["fox", "owl", "lighthouse"])
    engine.step(["fox"])
    return engine.latents(["fox", "owl", "lighthouse"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize("graph_max_batch", [0, 4], ids=["compiled", "cuda_graphs"])
def test_on_the_gpu_too_with_and_without_cuda_graphs(graph_max_batch):
    # Warmed up at one row count, steps of other row counts run compiled, none refused (refused
    # recompilations fall back to eager); with CUDA graphs too (each row count records its own graph
    # at its first replay: compiled once for all, recorded per size).
    pipeline = load_pipeline("tiny-sdxl", "cuda", "float32",
                             AccelerationConfig(compile=True, cuda_graph_max_batch=graph_max_batch,
                                                compile_encoders=False))
    forward = acceleration.compiled_forward(pipeline.diffusers_pipeline.unet)
    engine = StepEngine(pipeline, schedulers.named_scheduler("euler", pipeline.diffusers_pipeline.scheduler.config))
    engine.admit([FOX, OWL])
    acceleration.warm_up_shapes(lambda _size: engine.step(["fox", "owl"]), [4])
    try:
        engine.admit([LIGHTHOUSE, RAMEN])
        engine.step(["fox", "owl", "lighthouse", "ramen"])  # 7 UNet rows
        engine.step(["lighthouse", "ramen"])  # 3
        engine.step(["owl", "lighthouse", "ramen"])  # 5
    finally:
        acceleration.allow_recompiles()
    assert forward.eager_shapes == set()
