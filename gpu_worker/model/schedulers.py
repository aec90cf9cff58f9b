"""Schedulers that never make the CPU wait for the GPU.

diffusers' PNDMScheduler (SD-1.5's own) looks its coefficients up in a table on the CPU, indexed by
the timestep, which the pipeline keeps on the GPU: reading the index, and ``prev_timestep >= 0``,
wait for the GPU three times per step (77 waits for 25 steps, torch's sync debug mode on an H100,
docs/benchmarks.md). After each wait the GPU idles while Python prepares the next kernels; that
matters most for a lone image, whose steps are short. :func:`without_gpu_waits` gives a PNDM
scheduler a ``_get_prev_sample`` that keeps the table on the timestep's device and picks with
``torch.where`` instead of ``if``, so the CPU queues the whole denoising loop ahead of the GPU. The
arithmetic is unchanged: the same float32 operations (IEEE-rounded multiply, divide, square root),
on the device instead of the CPU.

The scheduler stays a PNDMScheduler (its class is what ``save_pretrained`` writes): only that one
method of that one instance is replaced.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from diffusers import PNDMScheduler


def without_gpu_waits(scheduler: Any) -> Any:
    """``scheduler``, with PNDM's coefficient lookup moved to the device (other schedulers as they are)."""
    if type(scheduler) is PNDMScheduler:
        scheduler._get_prev_sample = types.MethodType(device_resident_prev_sample, scheduler)
    return scheduler


def device_resident_prev_sample(self: PNDMScheduler, sample: torch.Tensor, timestep: Any, prev_timestep: Any,
                                model_output: torch.Tensor) -> torch.Tensor:
    """PNDMScheduler._get_prev_sample with the coefficients computed where the timestep lives."""
    if not isinstance(timestep, torch.Tensor):
        return PNDMScheduler._get_prev_sample(self, sample, timestep, prev_timestep, model_output)
    alphas_cumprod, final_alpha_cumprod = _tables_on(self, timestep.device)
    alpha_prod_t = _at(alphas_cumprod, timestep)
    previous = torch.as_tensor(prev_timestep, device=timestep.device)
    alpha_prod_t_prev = torch.where(previous >= 0, _at(alphas_cumprod, previous.clamp(min=0)), final_alpha_cumprod)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    # From here on diffusers' formula (9) of the PNDM paper, unchanged.
    if self.config.prediction_type == "v_prediction":
        model_output = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    elif self.config.prediction_type != "epsilon":
        raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of "
                         "`epsilon` or `v_prediction`")
    sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
    model_output_denom_coeff = alpha_prod_t * beta_prod_t_prev**0.5 + (
        alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
    return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff


def _at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 0-dim index tensor, as a 0-dim tensor, without reading the index on the CPU
    (``table[index]`` reads a 0-dim index's value: a wait when it is on the GPU). 0-dim, not (1,): a
    dimensioned float32 factor would turn a bfloat16 sample into float32."""
    return table.index_select(0, index.reshape(1)).reshape(())


def _tables_on(scheduler: PNDMScheduler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """alphas_cumprod and final_alpha_cumprod on ``device``, copied once per device (a copy waits too)."""
    cached = getattr(scheduler, "_device_tables", None)
    if cached is None or cached[0].device != device:
        cached = (scheduler.alphas_cumprod.to(device), scheduler.final_alpha_cumprod.to(device))
        scheduler._device_tables = cached
    return cached


# Scheduler names (a later setting chooses one; the step engine's tests run each): name -> (diffusers
# class name, configuration overrides). The class is built from the pipeline's own scheduler
# configuration (its betas, training timesteps, spacing, prediction type) with these overrides, as
# ``Class.from_config(pipeline.scheduler.config, **overrides)`` does in diffusers' documentation. An
# override a class does not take is left out (EulerAncestralDiscreteScheduler has no Karras sigmas).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    # PLMS as SD-1.5 ships it: no Runge-Kutta warm-up (with it, 4 steps would cost 13 UNet calls)
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)


def named_scheduler(name: str, config: Any) -> Any:
    """A new scheduler ``name`` (one of SCHEDULER_NAMES) made from ``config`` (a pipeline scheduler's
    ``config``), with PNDM's coefficient lookup on the device (:func:`without_gpu_waits`).
    Raises ValueError for an unknown name."""
    import inspect

    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULER_NAMES)}")
    class_name, overrides = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    accepted = inspect.signature(scheduler_class.__init__).parameters
    return without_gpu_waits(scheduler_class.from_config(
        config, **{key: value for key, value in overrides.items() if key in accepted}))


def fresh_copy(scheduler: Any) -> Any:
    """A new scheduler of ``scheduler``'s class and configuration, with none of its per-run state
    (timesteps, step index, multistep history): one per request in a batch whose requests advance
    separately. PNDM keeps its coefficients on the device as ``scheduler`` does."""
    return without_gpu_waits(type(scheduler).from_config(scheduler.config))
