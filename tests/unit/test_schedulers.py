"""gpu_worker.model.schedulers: PNDM with its coefficients on the timestep's device gives the same samples.

On the CPU the timestep is a CPU tensor, so the replaced method's tensor path (the one the GPU
takes) runs here, step by step against diffusers' own."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, PNDMScheduler

from gpu_worker.model.pipelines import load_pipeline
from gpu_worker.model.schedulers import without_gpu_waits

SD15_LIKE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def run_loop(scheduler: PNDMScheduler, steps: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator).to(dtype)
    samples = []
    for timestep in scheduler.timesteps:
        model_output = torch.randn(sample.shape, generator=generator).to(dtype)
        sample = scheduler.step(model_output, timestep, sample).prev_sample
        samples.append(sample)
    return samples


@pytest.mark.parametrize("config", [
    SD15_LIKE,
    {**SD15_LIKE, "prediction_type": "v_prediction"},
    {**SD15_LIKE, "skip_prk_steps": False},  # Runge-Kutta warm-up steps take the same path
    {**SD15_LIKE, "set_alpha_to_one": True},  # the last step's alpha comes from final_alpha_cumprod
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_samples_as_diffusers_bit_for_bit(config: dict, dtype: torch.dtype) -> None:
    theirs = run_loop(PNDMScheduler(**config), 25, dtype)
    ours = run_loop(without_gpu_waits(PNDMScheduler(**config)), 25, dtype)
    assert len(ours) == len(theirs) > 25 - 1
    for mine, reference in zip(ours, theirs):
        assert mine.dtype == reference.dtype == dtype and torch.equal(mine, reference)


def test_final_step_reaches_below_zero_previous_timestep() -> None:
    # The test above only proves something if the last step takes the "prev_timestep < 0" branch.
    scheduler = PNDMScheduler(**SD15_LIKE)
    scheduler.set_timesteps(25)
    assert int(scheduler.timesteps[-1]) - 1000 // 25 < 0


def test_the_scheduler_stays_a_pndm_scheduler_and_others_are_untouched() -> None:
    pndm = PNDMScheduler(**SD15_LIKE)
    assert without_gpu_waits(pndm) is pndm and type(pndm) is PNDMScheduler
    assert "_get_prev_sample" in vars(pndm)
    euler = EulerDiscreteScheduler()
    assert without_gpu_waits(euler) is euler and "_get_prev_sample" not in vars(euler)


def test_loaded_sd15_pipeline_uses_it() -> None:
    scheduler = load_pipeline("tiny").diffusers_pipeline.scheduler
    assert type(scheduler) is PNDMScheduler and "_get_prev_sample" in vars(scheduler)
