"""gpu_worker.model.schedulers: PNDM with its coefficients on the timestep's device gives the same samples.

On the CPU the timestep is a CPU tensor, so the replaced method's tensor path (the one the GPU
takes) runs here, step by step against diffusers' own."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, PNDMScheduler

from gpu_worker.model.pipelines import load_pipeline
from gpu_worker.model.schedulers import SCHEDULER_NAMES, fresh_copy, named_scheduler, without_gpu_waits

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


@pytest.mark.parametrize("name, class_name", [
    ("euler", "EulerDiscreteScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler"),
    ("dpmpp_2m", "DPMSolverMultistepScheduler"), ("dpmpp_2m_karras", "DPMSolverMultistepScheduler"),
    ("ddim", "DDIMScheduler"), ("pndm", "PNDMScheduler"),
])
def test_named_schedulers_keep_the_pipelines_configuration(name: str, class_name: str) -> None:
    base = EulerDiscreteScheduler(**{key: value for key, value in SD15_LIKE.items()
                                     if key not in ("skip_prk_steps", "set_alpha_to_one")},
                                  use_karras_sigmas=True, timestep_spacing="leading")
    scheduler = named_scheduler(name, base.config)
    assert type(scheduler).__name__ == class_name and name in SCHEDULER_NAMES
    assert (scheduler.config.beta_schedule, scheduler.config.beta_end, scheduler.config.timestep_spacing) == (
        "scaled_linear", 0.012, "leading")
    if class_name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        assert scheduler.config.use_karras_sigmas is (name == "dpmpp_2m_karras")
    if name.startswith("dpmpp"):
        assert (scheduler.config.algorithm_type, scheduler.config.solver_order) == ("dpmsolver++", 2)
    if name == "pndm":
        assert scheduler.config.skip_prk_steps and "_get_prev_sample" in vars(scheduler)


def test_unknown_scheduler_name_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'lms'; expected one of euler, euler_a, dpmpp_2m"):
        named_scheduler("lms", EulerDiscreteScheduler().config)


def test_a_fresh_copy_has_the_class_and_configuration_but_none_of_the_state() -> None:
    original = without_gpu_waits(PNDMScheduler(**SD15_LIKE))
    run_loop(original, 5)
    copy = fresh_copy(original)
    assert type(copy) is PNDMScheduler and copy.config == original.config and copy is not original
    assert copy.ets == [] and copy.counter == 0 and "_get_prev_sample" in vars(copy)
    assert run_loop(copy, 5)[-1].equal(run_loop(without_gpu_waits(PNDMScheduler(**SD15_LIKE)), 5)[-1])
