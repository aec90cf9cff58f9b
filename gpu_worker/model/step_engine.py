"""Denoising one step at a time, over rows that each carry their own request.

``ImagePipeline.generate`` runs one stock diffusers call per batch: every image shares width, height,
step count and guidance, and the batch runs from its first step to its last. A :class:`StepEngine`
makes ONE denoising step its unit of work instead, so that a scheduler can admit, pause, resume and
drop rows at every step boundary (step-level "continuous" batching):

* :meth:`StepEngine.admit` takes new rows (:class:`RowSpec`: an id, a :class:`GenerationJob` and the
  row's own :class:`BatchKey`): their prompts are encoded in one text-encoder call, and each gets its
  own scheduler instance (class and configuration of the engine's scheduler, timesteps for its own
  step count; multistep history, DPM++ 2M's or PNDM's, lives there), its own CPU generator seeded by
  its seed, and its initial latents;
* :meth:`StepEngine.step` advances the rows it is given by one step in ONE UNet call: the UNet gets a
  per-row timestep (a 1-D tensor, one entry per UNet row), each row's latents scaled by its own
  scheduler, and classifier-free guidance per row (a row whose guidance scale is above 1 contributes an
  unconditional and a conditional UNet row, any other only a conditional one); then each row's own
  scheduler steps it, with its own generator (ancestral noise);
* :meth:`StepEngine.pause` / :meth:`StepEngine.resume` keep a row's state, optionally in CPU memory
  meanwhile; :meth:`StepEngine.drop` forgets a row;
* :meth:`StepEngine.take_latents` / :meth:`StepEngine.decode` hand finished rows over (decoded with
  gpu_worker.model.decoding, as ``generate`` decodes), so that the caller can decode and encode PNGs
  outside its step loop.

A row's result does not depend on what it shares steps with, nor on when it is admitted, paused or
resumed: its noise comes from its own generator, exactly as the stock pipeline draws it from a list of
generators (one per image), and every operation on it is the stock pipeline's, row by row. Its latents
are the stock pipeline's for that request alone bit for bit when the model calls compute one row at a
time, and up to the rounding of batched kernels otherwise (a batch sums in another order than a lone
request; the stock pipeline's own batches differ from its lone requests as much): every scheduler of
gpu_worker.model.schedulers.SCHEDULERS, both layouts, tests/integration/test_step_engine.py.

With torch.compile (gpu_worker.model.acceleration) the UNet's batch dimension is marked dynamic, the
per-row timestep tensor's with it, so one warm-up per implementation (CompiledUnetForward.mode_for:
CUDA graphs or compiled) serves every number of rows of two or more (with CUDA graphs, each row count
records its own graph at its first call: tests/e2e/test_step_engine_compiled.py). ``ImagePipeline.warm_up``
compiles for the stock pipeline's 0-dim timestep, though: torch guards on a tensor's dimensions, so the
engine's 1-D timestep asks for another compilation, refused once the warm-up is over (eager instead),
until a warm-up runs the engine itself.

Not thread-safe: one thread (the worker's GPU thread) calls everything.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch

from gpu_worker.model import decoding, schedulers
from gpu_worker.model.oom import is_out_of_memory
from gpu_worker.model.pipelines import GenerationJob
from imagegen.batch_key import BatchKey

if TYPE_CHECKING:
    from gpu_worker.model.pipelines import ImagePipeline

OFFLOAD_DEVICE = torch.device("cpu")


class UNetOutOfMemory(RuntimeError):
    """A step's UNet call ran out of device memory before any row changed: the same rows, or fewer,
    can step again as if it never happened. ``rows``: the requests it tried to advance."""

    def __init__(self, rows: int, cause: BaseException) -> None:
        super().__init__(f"out of memory stepping {rows} rows: {cause}")
        self.rows = rows


@dataclass(frozen=True)
class RowSpec:
    """One request as the engine takes it: ``row_id`` (unique among the engine's rows), its prompt,
    negative prompt and seed (``job``), and its own size, step count and guidance scale (``settings``)."""

    row_id: str
    job: GenerationJob
    settings: BatchKey


@dataclass(eq=False)
class _Row:
    spec: RowSpec
    scheduler: Any
    generator: torch.Generator
    latents: torch.Tensor  # (1, C, H/8, W/8)
    embeds: torch.Tensor  # (1, tokens, width): the prompt's
    negative_embeds: torch.Tensor  # the negative prompt's (used with classifier-free guidance only)
    step_kwargs: dict[str, Any]  # eta and generator, where the scheduler's step takes them
    pooled: torch.Tensor | None = None  # SDXL: pooled prompt embedding, (1, width)
    negative_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # SDXL: (1, 6) original size, crop, target size
    done: int = 0  # steps taken
    paused: bool = False
    offloaded: list[str] = field(default_factory=list)  # scheduler attributes moved to CPU memory

    @property
    def total(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def guided(self) -> bool:
        return self.spec.settings.guidance_scale > 1.0


_ROW_TENSORS = ("latents", "embeds", "negative_embeds", "pooled", "negative_pooled", "time_ids")


class StepEngine:
    """Denoising step by step over rows with their own prompts, sizes, step counts, guidance scales,
    seeds and scheduler state (see the module's description).

    ``pipeline``: a loaded ImagePipeline (SD-1.5 or SDXL layout). ``scheduler``: the scheduler whose
    class and configuration every row's own instance copies (gpu_worker.model.schedulers.named_scheduler
    makes one by name); None: the pipeline's own.

    Rows are kept in admission order. Unknown row ids raise KeyError; a request the engine cannot
    serve (a row id in use, a bad size, a finished or paused row given to step, rows of different
    latent shapes in one step) raises ValueError, and changes nothing.
    """

    def __init__(self, pipeline: ImagePipeline, scheduler: Any | None = None) -> None:
        self.pipeline = pipeline
        self.diffusers_pipeline = pipeline.diffusers_pipeline
        self.scheduler = scheduler if scheduler is not None else self.diffusers_pipeline.scheduler
        self.device = pipeline.device
        self.sdxl = decoding.is_sdxl(self.diffusers_pipeline)
        unet_config = self.diffusers_pipeline.unet.config
        if getattr(unet_config, "time_cond_proj_dim", None) is not None:
            raise ValueError("a UNet conditioned on the guidance scale (time_cond_proj_dim, LCM) is not supported")
        self.latent_channels = int(unet_config.in_channels)
        self._rows: dict[str, _Row] = {}

    # --- rows in -------------------------------------------------------------------------------------

    def admit(self, rows: Sequence[RowSpec]) -> None:
        """Take new rows: encode their prompts (one text-encoder call for all of them), make each one's
        scheduler, generator and initial latents. They start at step 0, not paused."""
        rows = list(rows)
        if not rows:
            return
        ids = [row.row_id for row in rows]
        if len(set(ids)) != len(ids):
            raise ValueError(f"row ids must be unique; given {ids}")
        in_use = [row_id for row_id in ids if row_id in self._rows]
        if in_use:
            raise ValueError(f"row ids already in the engine: {in_use}; drop or take them first")
        for row in rows:
            self.pipeline.check_settings(row.settings)
        pipe = self.diffusers_pipeline
        prompts = [row.job.prompt for row in rows]
        # Always a string, as ImagePipeline.generate does: SDXL encodes None as zeros, "" as a prompt.
        negatives = ["" if row.job.negative_prompt is None else row.job.negative_prompt for row in rows]
        with torch.inference_mode():
            if self.sdxl:
                embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                    prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
                    do_classifier_free_guidance=True, negative_prompt=negatives, negative_prompt_2=None)
            else:
                embeds, negative_embeds = pipe.encode_prompt(
                    prompts, self.device, 1, True, negatives)
                pooled = negative_pooled = None
            made = [self._new_row(spec, index, embeds, negative_embeds, pooled, negative_pooled)
                    for index, spec in enumerate(rows)]
        for row in made:
            self._rows[row.spec.row_id] = row

    def _new_row(self, spec: RowSpec, index: int, embeds: torch.Tensor, negative_embeds: torch.Tensor,
                 pooled: torch.Tensor | None, negative_pooled: torch.Tensor | None) -> _Row:
        pipe = self.diffusers_pipeline
        settings = spec.settings
        scheduler = schedulers.fresh_copy(self.scheduler)
        scheduler.set_timesteps(settings.num_inference_steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            # As SDXL's pipeline does; SD-1.5's lets the scheduler look its first timestep up in its
            # timesteps instead (the same index, after a wait for the GPU).
            scheduler.set_begin_index(0)
        generator = torch.Generator("cpu").manual_seed(spec.job.seed)
        from diffusers.utils.torch_utils import randn_tensor

        scale = self.pipeline.vae_scale_factor
        shape = (1, self.latent_channels, settings.height // scale, settings.width // scale)
        # The stock pipeline's prepare_latents with one generator per image: the same draw.
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
        accepted = inspect.signature(scheduler.step).parameters
        step_kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            step_kwargs["eta"] = 0.0  # the pipelines' default (DDIM without noise)
        if "generator" in accepted:
            step_kwargs["generator"] = generator
        row = _Row(spec, scheduler, generator, latents, embeds[index:index + 1],
                   negative_embeds[index:index + 1], step_kwargs)
        if self.sdxl:
            assert pooled is not None and negative_pooled is not None
            row.pooled = pooled[index:index + 1]
            row.negative_pooled = negative_pooled[index:index + 1]
            size = (settings.height, settings.width)
            projection = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                          else int(pooled.shape[-1]))
            row.time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                                  text_encoder_projection_dim=projection).to(self.device)
        return row

    # --- one step ------------------------------------------------------------------------------------

    def step(self, row_ids: Sequence[str]) -> None:
        """Advance each of ``row_ids`` (admitted, not paused, not finished, all of one latent shape) by
        one denoising step, in one UNet call. Raises :class:`UNetOutOfMemory` when that call runs out of
        memory, every row left as it was."""
        rows = self._rows_for_step(row_ids)
        guided = [row for row in rows if row.guided]
        timesteps = [row.scheduler.timesteps[row.done] for row in rows]
        with torch.inference_mode():
            scaled = [row.scheduler.scale_model_input(row.latents, timestep)
                      for row, timestep in zip(rows, timesteps)]
            guided_scaled = [latents for row, latents in zip(rows, scaled) if row.guided]
            guided_timesteps = [timestep for row, timestep in zip(rows, timesteps) if row.guided]
            # The UNet's rows: the unconditional ones of the guided rows first, then every row's
            # conditional one (the stock pipeline's order: negative prompts, then prompts).
            sample = torch.cat(guided_scaled + scaled)
            timestep = torch.stack(guided_timesteps + timesteps)
            hidden = torch.cat([row.negative_embeds for row in guided] + [row.embeds for row in rows])
            added = None
            if self.sdxl:
                added = {
                    "text_embeds": torch.cat([row.negative_pooled for row in guided] + [row.pooled for row in rows]),
                    "time_ids": torch.cat([row.time_ids for row in guided] + [row.time_ids for row in rows]),
                }
            try:
                noise = self.diffusers_pipeline.unet(
                    sample, timestep, encoder_hidden_states=hidden, timestep_cond=None,
                    cross_attention_kwargs=None, added_cond_kwargs=added, return_dict=False)[0]
            except Exception as exc:
                if is_out_of_memory(exc):  # no row's latents or scheduler state has changed yet
                    raise UNetOutOfMemory(len(rows), exc) from exc
                raise
            unconditional, conditional = noise[:len(guided)], noise[len(guided):]
            next_guided = 0
            for index, (row, step_timestep) in enumerate(zip(rows, timesteps)):
                prediction = conditional[index:index + 1]
                if row.guided:
                    uncond = unconditional[next_guided:next_guided + 1]
                    next_guided += 1
                    prediction = uncond + row.spec.settings.guidance_scale * (prediction - uncond)
                row.latents = row.scheduler.step(prediction, step_timestep, row.latents, **row.step_kwargs,
                                                 return_dict=False)[0]
                row.done += 1

    def _rows_for_step(self, row_ids: Sequence[str]) -> list[_Row]:
        row_ids = list(row_ids)
        if not row_ids:
            raise ValueError("step needs at least one row")
        if len(set(row_ids)) != len(row_ids):
            raise ValueError(f"a row can take one step at a time; given {row_ids}")
        rows = [self._row(row_id) for row_id in row_ids]
        for row in rows:
            if row.paused:
                raise ValueError(f"row {row.spec.row_id!r} is paused; resume it first")
            if row.done >= row.total:
                raise ValueError(f"row {row.spec.row_id!r} has finished its {row.total} steps; take or drop it")
        shapes = {tuple(row.latents.shape) for row in rows}
        if len(shapes) > 1:
            raise ValueError(f"rows of one step must share a latent shape (width and height); given "
                             f"{ {row.spec.row_id: tuple(row.latents.shape) for row in rows} }")
        return rows

    # --- state ---------------------------------------------------------------------------------------

    def progress(self, row_id: str) -> tuple[int, int]:
        """(steps done, steps in all) of a row. Steps in all is the length of its scheduler's timesteps,
        the UNet calls it needs: its step count, one more for PNDM without Runge-Kutta warm-up (its
        first timestep runs twice) and more with it."""
        row = self._row(row_id)
        return row.done, row.total

    def row_ids(self) -> list[str]:
        """Every row, in admission order."""
        return list(self._rows)

    def runnable_rows(self) -> list[str]:
        """Rows step may take now: neither paused nor finished, in admission order."""
        return [row_id for row_id, row in self._rows.items() if not row.paused and row.done < row.total]

    def finished_rows(self) -> list[str]:
        """Rows that have taken all their steps, in admission order (paused ones too)."""
        return [row_id for row_id, row in self._rows.items() if row.done >= row.total]

    def is_paused(self, row_id: str) -> bool:
        return self._row(row_id).paused

    def pause(self, row_id: str, offload: bool = False) -> None:
        """Leave a row out of steps until :meth:`resume`; its state is kept. With ``offload`` its tensors
        (latents, prompt embeddings, its scheduler's timesteps and multistep history) wait in CPU
        memory, and go back to the engine's device on resume (on a CPU engine they stay where they are).
        Pausing a paused row changes nothing (a later offload of it still moves its tensors)."""
        row = self._row(row_id)
        row.paused = True
        if offload and self.device != OFFLOAD_DEVICE:
            for name in _ROW_TENSORS:
                value = getattr(row, name)
                if value is not None:
                    setattr(row, name, value.to(OFFLOAD_DEVICE))
            row.offloaded += _move_tensors(row.scheduler, self.device, OFFLOAD_DEVICE)

    def resume(self, row_id: str) -> None:
        """Let a paused row take steps again (its offloaded tensors back on the device)."""
        row = self._row(row_id)
        for name in _ROW_TENSORS:
            value = getattr(row, name)
            if value is not None and not _same_device(value.device, self.device):
                setattr(row, name, value.to(self.device))
        if row.offloaded:
            _move_tensors(row.scheduler, OFFLOAD_DEVICE, self.device, only=row.offloaded)
            row.offloaded = []
        row.paused = False

    def drop(self, row_id: str) -> None:
        """Forget a row, whatever its state (its memory is freed once nothing else holds its tensors)."""
        self._row(row_id)
        del self._rows[row_id]

    # --- rows out ------------------------------------------------------------------------------------

    def latents(self, row_ids: Sequence[str]) -> torch.Tensor:
        """The rows' current latents, (N, C, H/8, W/8) on the engine's device (scaled as the pipeline
        keeps them: what previews read); all of one shape. The rows stay."""
        rows = [self._row(row_id) for row_id in row_ids]
        if not rows:
            raise ValueError("no rows given")
        shapes = {tuple(row.latents.shape) for row in rows}
        if len(shapes) > 1:
            raise ValueError(f"rows of different latent shapes cannot be stacked: {sorted(shapes)}")
        with torch.inference_mode():
            return torch.cat([row.latents.to(self.device) for row in rows])

    def scaled_latents(self, row_ids: Sequence[str]) -> torch.Tensor:
        """As :meth:`latents`, each row scaled by its scheduler's input scaling at its next timestep (its
        last once finished): what the UNet's next call sees, and what previews read (Euler's
        1 / sqrt(sigma^2 + 1); most schedulers: unchanged)."""
        rows = [self._row(row_id) for row_id in row_ids]
        latents = self.latents(row_ids)
        with torch.inference_mode():
            return torch.cat([row.scheduler.scale_model_input(latents[index:index + 1],
                                                              row.scheduler.timesteps[min(row.done, row.total - 1)])
                              for index, row in enumerate(rows)])

    def take_latents(self, row_ids: Sequence[str]) -> torch.Tensor:
        """The final latents of finished rows, as :meth:`latents`, and the rows leave the engine: what
        the stock pipeline returns with ``output_type="latent"``."""
        row_ids = list(row_ids)
        unfinished = [row_id for row_id in row_ids if self._row(row_id).done < self._row(row_id).total]
        if unfinished:
            raise ValueError(f"rows {unfinished} have not finished their steps")
        latents = self.latents(row_ids)
        for row_id in row_ids:
            del self._rows[row_id]
        return latents

    def decode(self, row_ids: Sequence[str], on_images: decoding.OnImages | None = None) -> list[np.ndarray]:
        """Finished rows' images as (H, W, 3) uint8 arrays, in order, decoded as ImagePipeline.generate
        decodes (gpu_worker.model.decoding.decode_in_parts: ``on_images(first_index, arrays)`` gets each
        part as soon as it is on the host); the rows leave the engine."""
        latents = self.take_latents(row_ids)
        with torch.inference_mode():
            return decoding.decode_in_parts(self.diffusers_pipeline, latents, on_images,
                                            self.pipeline.images_per_part)

    def _row(self, row_id: str) -> _Row:
        try:
            return self._rows[row_id]
        except KeyError:
            raise KeyError(f"no row {row_id!r} in the engine") from None


def _move_tensors(scheduler: Any, source: torch.device, target: torch.device,
                  only: Iterable[str] | None = None) -> list[str]:
    """Move the scheduler's tensors on ``source`` (attributes, and tensors in list or tuple attributes:
    DPM++'s model_outputs, PNDM's ets) to ``target``; returns the names of the attributes moved.
    Tensors elsewhere stay (Euler keeps its sigmas in CPU memory on purpose)."""
    state = vars(scheduler)
    moved = []
    for name in list(only) if only is not None else list(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            if _same_device(value.device, source):
                state[name] = value.to(target)
                moved.append(name)
        elif isinstance(value, (list, tuple)) and any(
                isinstance(item, torch.Tensor) and _same_device(item.device, source) for item in value):
            state[name] = type(value)(item.to(target) if isinstance(item, torch.Tensor)
                                      and _same_device(item.device, source) else item for item in value)
            moved.append(name)
    return moved


def _same_device(device: torch.device, other: torch.device) -> bool:
    """Whether two devices are one ("cuda" is the current CUDA device, which tensors name "cuda:0")."""
    return device.type == other.type and _index(device) == _index(other)


def _index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0
