"""On a CUDA GPU: the step engine's offload to CPU memory (skipped without a GPU).

CI has no GPU and skips this file; on a GPU machine run
``python -m pytest -m gpu tests/integration/test_step_engine_gpu.py``. The tiny models, float32, TF32
off: on the CPU an offloaded row stays where it is (tests/integration/test_step_engine.py holds the
rest; with torch.compile: tests/e2e/test_step_engine_compiled.py).
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from gpu_worker.model import schedulers
from gpu_worker.model.pipelines import ImagePipeline, load_pipeline
from gpu_worker.model.step_engine import StepEngine
from tests.integration.test_step_engine import (FOX, LIGHTHOUSE, OWL, RAMEN, TIMELINE_ROWS, TOLERANCE, step_to_end,
                                                using_scheduler)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)"),
]


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """float32 as on the CPU: TF32 matmuls and convolutions round to 10 bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def stock(pipeline: ImagePipeline, scheduler: str, spec) -> torch.Tensor:
    with using_scheduler(pipeline, scheduler):
        return pipeline._run([spec.job], spec.settings, output_type="latent")


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m", "pndm"])  # noise, and multistep history
@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_offloaded_rows_wait_in_cpu_memory_and_come_back_the_same(model, scheduler):
    pipeline = load_pipeline(model, "cuda", "float32")
    engine = StepEngine(pipeline, schedulers.named_scheduler(scheduler, pipeline.diffusers_pipeline.scheduler.config))
    taken: dict[str, torch.Tensor] = {}
    engine.admit([LIGHTHOUSE, FOX, RAMEN])
    step_to_end(engine, taken, steps=2)
    engine.pause("fox", offload=True)
    row = engine._rows["fox"]
    assert row.latents.device.type == row.embeds.device.type == "cpu"
    assert row.offloaded and all(_devices(vars(row.scheduler)[name]) == {"cpu"} for name in row.offloaded)
    history = {"dpmpp_2m": "model_outputs", "pndm": "ets"}.get(scheduler)
    assert history is None or history in row.offloaded
    engine.admit([OWL])
    step_to_end(engine, taken, steps=2)
    engine.resume("fox")
    assert row.latents.device.type == "cuda" and not row.offloaded
    step_to_end(engine, taken)
    for spec in (LIGHTHOUSE, FOX, RAMEN, OWL):
        ours = taken[spec.row_id]
        assert ours.device.type == "cuda"
        difference = (ours - stock(pipeline, scheduler, spec)).abs().max().item()
        assert difference <= TOLERANCE, f"{spec.row_id}: max difference {difference:.3g}"
    assert sorted(taken) == sorted(spec.row_id for spec in TIMELINE_ROWS)


def _devices(value) -> set[str]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return {item.device.type for item in items if isinstance(item, torch.Tensor)}
