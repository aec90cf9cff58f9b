"""Model loading and batched text-to-image generation for the GPU worker.

``load_pipeline(MODEL_ID)`` gives an :class:`ImagePipeline`; ``generate`` runs one diffusers call
for a whole batch of requests that share a :class:`~imagegen.batch_key.BatchKey`, each with its
own prompt, negative prompt and seed. A request's image does not depend on what it was batched
with: noise comes from one CPU generator per request, and a missing negative prompt always means "".

diffusers and transformers are imported lazily (about 7 s per process), so the light names here
(GenerationJob, the memory arithmetic) can be imported by processes that never load a model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch

from gpu_worker.model import acceleration, decoding, previews
from gpu_worker.model.acceleration import AccelerationConfig
from gpu_worker.decisions.preemption import Preemption
from imagegen.batch_key import BatchKey

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("tiny", "tiny-sdxl", "sd15", "sdxl")
ARCHITECTURES = ("sd15", "sdxl")

_GIB = 1024**3
# Extra GPU memory one more image in a batch costs, in bf16 with CFG on (two UNet rows per image):
# (reference width, reference height, bytes), the slope of peak memory over batch size measured on
# an H200 (docs/benchmarks.md, GPU ceilings). SD-1.5 512²: (31.8 - 2.4) GiB / 63 = 0.47 GiB,
# rounded up to 0.5. SDXL 1024²: (47.1 - 7.4) GiB / 15 = 2.65 GiB. Through the whole pipeline on an
# H100 (bf16, 25 steps) peak memory grew 0.50 GiB per SD-1.5 image (batch 1 -> 32) and 1.71 GiB per
# SDXL image (1 -> 16; 1.75 with torch.compile), docs/benchmarks/raw-*-h100.json: both figures err on
# the safe side (bench/batch_size_table.py compares them per card).
_PER_IMAGE_REFERENCE: dict[str, tuple[int, int, float]] = {
    "sd15": (512, 512, 0.5 * _GIB),
    "sdxl": (1024, 1024, 2.65 * _GIB),
}
# Share of the free memory a batch may plan to use: the rest absorbs allocator fragmentation, the
# batch-independent activations and whatever the estimate misses.
_HEADROOM_PERCENT = 85

_HINT = ("MODEL_ID must be one of tiny, tiny-sdxl, sd15, sdxl, a local folder written by "
         "save_pretrained, or a Hugging Face hub id reachable from this machine")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class GenerationJob:
    """One request's own inputs inside a batch."""

    prompt: str
    negative_prompt: str | None
    seed: int  # 0 <= seed < 2**63

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")




class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names MODEL_ID, the cause and how to fix it."""


class ImagePipeline:
    """A loaded text-to-image model (SD-1.5 or SDXL family) that generates batches.

    Attributes: ``model_id`` as given to load_pipeline; ``architecture`` "sd15" or "sdxl";
    ``device``/``dtype`` it runs on; ``native_size`` its natural resolution in pixels
    (UNet sample_size x VAE scale factor); ``diffusers_pipeline`` the underlying pipeline.
    """

    def __init__(self, diffusers_pipeline: DiffusionPipeline, model_id: str, architecture: str,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.diffusers_pipeline = diffusers_pipeline
        self.model_id = model_id
        self.architecture = architecture
        self.device = device
        self.dtype = dtype
        self.vae_scale_factor = int(diffusers_pipeline.vae_scale_factor)
        sample_size = diffusers_pipeline.unet.config.sample_size
        if isinstance(sample_size, (list, tuple)):
            sample_size = max(sample_size)
        self.native_size = int(sample_size) * self.vae_scale_factor
        self.images_per_part = decoding.IMAGES_PER_PART  # latents per VAE decode (gpu_worker.model.decoding)
        self._steps_refusals: dict[int, str | None] = {}  # steps -> why the scheduler cannot run them

    def __repr__(self) -> str:
        return (f"ImagePipeline(model_id={self.model_id!r}, architecture={self.architecture!r}, "
                f"device={self.device}, dtype={self.dtype}, native_size={self.native_size})")

    def generate(self, jobs: Sequence[GenerationJob], settings: BatchKey,
                 on_images: decoding.OnImages | None = None,
                 preemption: Preemption | None = None) -> list[Any]:
        """Generate one RGB image of settings.width x settings.height per job, in job order: PIL
        images, or with ``on_images`` the (H, W, 3) uint8 arrays it was handed (the worker encodes
        arrays; turning each into a PIL image would only hold the GPU thread, and the GIL, while
        their PNGs are being encoded).

        One pipeline call denoises the whole batch; its latents are then decoded in parts
        (gpu_worker.model.decoding), and ``on_images(first_index, arrays)``, if given, receives each
        part's arrays as soon as they are on the host, before the next part is
        decoded, in the calling thread. With a ``preemption`` (gpu_worker.decisions.preemption) every
        denoising step starts with ``preemption.before_step``, which raises BatchPreempted when the
        worker stops the batch, and each decode part with ``preemption.before_decode_part``, which
        raises it when no row is wanted any more. Raises ValueError for an empty batch or bad settings,
        RuntimeError if the pipeline returns a different number of latents.
        """
        latents = self._run(jobs, settings, output_type="latent", preemption=preemption)
        with torch.inference_mode():  # as inside the pipeline: no autograd, and what torch.compile guards on
            arrays = decoding.decode_in_parts(self.diffusers_pipeline, latents, on_images, self.images_per_part,
                                              preemption.before_decode_part if preemption is not None else None)
        if on_images is not None:
            return arrays
        return [rgb_image(array) for array in arrays]

    def generate_array(self, jobs: Sequence[GenerationJob], settings: BatchKey) -> np.ndarray:
        """Like generate, but float32 (N, height, width, 3) in [0, 1], before 8-bit rounding."""
        return np.asarray(self._run(jobs, settings, output_type="np"), dtype=np.float32)

    def warm_up(self, batch_sizes: Sequence[int], width: int, height: int, steps: int = 2,
                guidance_scale: float = 7.5) -> dict[int, float]:
        """Generate one batch of each size at width x height (``steps`` steps), so no request pays
        for first-call work: cuDNN's algorithm choice and the allocator's growth per shape, and with
        TORCH_COMPILE the compilation and CUDA graph recording. Returns seconds per size.

        With torch.compile, recompiling is forbidden afterwards (gpu_worker.model.acceleration): shapes
        not warmed up here run eager. Call it from the thread that will generate (CUDA graphs are
        recorded per thread). guidance_scale: above 1 the UNet sees two rows per image (CFG), so
        warm up with the guidance the batches will use.
        """
        settings = BatchKey(width, height, steps, guidance_scale)

        def generate(size: int) -> None:
            self.generate([GenerationJob("warm-up", None, index) for index in range(size)], settings)

        if acceleration.compiled_forward(self.diffusers_pipeline.unet) is not None:
            return acceleration.warm_up_shapes(generate, list(batch_sizes))
        return acceleration.time_each(generate, list(batch_sizes))

    def step_seconds(self, width: int, height: int, steps: int = 6, guidance_scale: float = 7.5) -> float:
        """Seconds one denoising step of one image at width x height takes: the shortest interval
        between UNet calls of a ``steps``-step run (the GPU waited for at each, so these are GPU
        times), text encoding and VAE decoding left out. For the cost a worker reports at
        registration (``Register.seconds_per_work_unit``, see seconds_per_work_unit)."""
        instants: list[float] = []

        class Recorder:
            def before_step(self, synchronize: Callable[[], None]) -> None:
                synchronize()
                instants.append(time.perf_counter())

        self._run([GenerationJob("warm-up", None, 0)], BatchKey(width, height, steps, guidance_scale),
                  output_type="latent", preemption=Recorder())  # type: ignore[arg-type]
        gaps = [later - earlier for earlier, later in zip(instants, instants[1:])]
        if not gaps:
            raise RuntimeError("the pipeline made fewer than two UNet calls")
        return min(gaps)

    def per_image_memory_bytes(self, width: int, height: int) -> int:
        """Estimated extra GPU memory one more image in a batch costs at width x height."""
        return estimate_per_image_memory_bytes(self.architecture, self.dtype, width, height)

    def check_settings(self, settings: BatchKey) -> None:
        """ValueError (the request's fault: invalid_request) for settings this model cannot run."""
        multiple = self.vae_scale_factor
        for name in ("width", "height"):
            value = getattr(settings, name)
            if value <= 0 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value}")
        if settings.num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps must be >= 1, got {settings.num_inference_steps}")
        refusal = self._steps_refusal(settings.num_inference_steps)
        if refusal is not None:
            raise ValueError(refusal)

    def _steps_refusal(self, steps: int) -> str | None:
        """Why this model's scheduler cannot run ``steps`` steps, or None. A schedule whose timesteps
        reach the number of training timesteps would index past the scheduler's tables (PNDM with
        steps_offset 1, SD-1.5's, at 1000 steps: its last timestep is 1000 of 0..999) and fail
        inside diffusers with an IndexError."""
        if steps not in self._steps_refusals:
            scheduler = self.diffusers_pipeline.scheduler
            trained = int(getattr(scheduler.config, "num_train_timesteps", 0) or 0)
            why = None
            if trained and steps >= trained // 2:  # only long schedules can reach the end of the table
                probe = type(scheduler).from_config(scheduler.config)
                probe.set_timesteps(steps, device="cpu")
                if int(probe.timesteps.max()) >= trained:
                    why = (f"num_inference_steps {steps} is more than this model's scheduler "
                           f"({type(scheduler).__name__}, {trained} training timesteps) can run: use fewer steps")
            self._steps_refusals[steps] = why
        return self._steps_refusals[steps]

    def _run(self, jobs: Sequence[GenerationJob], settings: BatchKey,
             output_type: str, preemption: Preemption | None = None) -> Any:
        jobs = list(jobs)
        if not jobs:
            raise ValueError("a batch needs at least one job")
        self.check_settings(settings)
        # CPU generators: the initial noise is the same whichever device runs the model.
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        previewer = self._previewer(preemption)
        with torch.inference_mode(), self._checked_before_each_step(preemption):
            output = self.diffusers_pipeline(
                prompt=[job.prompt for job in jobs],
                # Always a string: SDXL encodes None as zeros but "" as a real embedding, and a
                # list mixing both is not accepted, so None -> "" keeps a job's image the same
                # alone or batched.
                negative_prompt=["" if job.negative_prompt is None else job.negative_prompt
                                 for job in jobs],
                generator=generators,
                width=settings.width,
                height=settings.height,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                num_images_per_prompt=1,
                output_type=output_type,
                **({} if previewer is None else previews.step_end_callback(previewer, settings.num_inference_steps)),
            )
            if previewer is not None:
                previewer.finish()
        images = output.images
        if len(images) != len(jobs):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(jobs)} jobs")
        return images

    def _previewer(self, preemption: Preemption | None) -> previews.LatentPreviewer | None:
        """The batch's previews (gpu_worker/model/previews.py), when its Preemption carries a plan with
        rows that asked for them."""
        plan = getattr(preemption, "previews", None)
        if plan is None or not plan.rows:
            return None
        return previews.LatentPreviewer(plan, self.architecture)

    @contextlib.contextmanager
    def _checked_before_each_step(self, preemption: Preemption | None) -> Iterator[None]:
        """Call ``preemption.before_step`` before every UNet call (one per denoising step) while the
        pipeline runs: a forward pre-hook, outside what torch.compile traced (no recompiling), and
        before the first step too, unlike diffusers' step-end callback, so that a stop can come right
        after the text encoders."""
        if preemption is None:
            yield
            return
        throttle = StepThrottle(self.device)
        handle = self.diffusers_pipeline.unet.register_forward_pre_hook(
            lambda module, args: preemption.before_step(throttle))
        try:
            yield
        finally:
            handle.remove()


class StepThrottle:
    """What a preemptible batch waits for before it looks for a stop: the GPU to have at most one
    denoising step queued (gpu_worker/decisions/preemption.py).

    Called before UNet call k, it marks the work queued so far with a CUDA event and waits for the
    mark made before call k - 1. Waiting for everything queued (a stream synchronize) left the GPU
    idle at every step of the preemption window while the CPU prepared the next one (the CUDA graph's
    replay, the scheduler's step), which cost a lone SD-1.5 request about 6 ms on an H200 (raw
    ``preemptible`` against ``encoders``, docs/benchmarks.md); with one step queued the GPU keeps
    working, and a stop throws away at most that step. On the CPU nothing runs ahead: no wait."""

    def __init__(self, device: torch.device, new_event: Callable[[], Any] | None = None) -> None:
        # new_event: how marks are made (a test passes fakes); torch.cuda.Event records on the
        # current stream, the one the pipeline queues its work on
        self.new_event = new_event if new_event is not None else (torch.cuda.Event if device.type == "cuda" else None)
        self.previous_mark: Any = None

    def __call__(self) -> None:
        if self.new_event is None:
            return
        mark = self.new_event()
        mark.record()
        previous, self.previous_mark = self.previous_mark, mark
        if previous is not None:
            previous.synchronize()


def seconds_per_work_unit(small_px: int, small_step_s: float, large_px: int, large_step_s: float,
                          cfg_rows: int = 2) -> float:
    """Seconds per work unit (gpu_worker.decisions.cost_model.work_units: megapixels x steps x CFG rows) from
    one step's time at two sizes: the marginal cost, (large - small) / (its extra units), which leaves
    out what a step costs whatever its size, so that it errs on the cheap side for every size (the
    broker refuses requests on it, broker/admission.py). A difference that is not positive (noise, a
    GPU far from busy at both sizes): half the large size's average cost."""
    small_units, large_units = small_px * cfg_rows / 1e6, large_px * cfg_rows / 1e6
    if large_units > small_units and large_step_s > small_step_s:
        return (large_step_s - small_step_s) / (large_units - small_units)
    return 0.5 * large_step_s / large_units if large_units > 0 else 0.0


def rgb_image(pixels: np.ndarray) -> PIL.Image.Image:
    """(H, W, C) uint8 -> an RGB image (one channel is grey; four would keep only RGB)."""
    picture = PIL.Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    return picture if picture.mode == "RGB" else picture.convert("RGB")


def estimate_per_image_memory_bytes(architecture: str, dtype: torch.dtype,
                                    width: int, height: int) -> int:
    """Extra GPU memory (bytes) one more image in a batch costs: a linear model.

    bytes = reference bytes of the architecture (measured in bf16 at its native resolution, see
    _PER_IMAGE_REFERENCE) x (width * height) / (reference width * reference height) x (2 for
    float32, 1 for 16-bit types). Activation memory grows with the number of latent pixels; with
    SDPA attention no quadratic attention matrix is stored, so linear scaling is a fair first
    approximation. Tiny models use their family's figure too: far too large, but positive.
    """
    if architecture not in _PER_IMAGE_REFERENCE:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    ref_width, ref_height, ref_bytes = _PER_IMAGE_REFERENCE[architecture]
    precision_factor = max(1.0, dtype.itemsize / 2)
    scaled = ref_bytes * (width * height) / (ref_width * ref_height) * precision_factor
    return max(1, math.ceil(scaled))


def auto_max_batch_size(pipeline: ImagePipeline, free_memory_bytes: int | None, width: int,
                        height: int, cpu_default: int = 4, limit: int = 64) -> int:
    """Largest batch the free GPU memory is predicted to hold, clamped to [1, limit].

    No GPU (free_memory_bytes None): cpu_default (clamped the same way). Otherwise
    floor(0.85 * free_memory_bytes / pipeline.per_image_memory_bytes(width, height)): the model's
    weights are expected to be loaded already, so the free memory is what activations may use;
    15% is left as headroom. Pure integer arithmetic, no device access.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if free_memory_bytes is None:
        return max(1, min(cpu_default, limit))
    per_image = pipeline.per_image_memory_bytes(width, height)
    fits = (max(0, free_memory_bytes) * _HEADROOM_PERCENT) // (100 * per_image)
    return max(1, min(limit, fits))


def free_gpu_memory_bytes() -> int | None:
    """Free memory (bytes) of the GPU that is this process's current CUDA device; never raises.

    Asks NVML for the device whose UUID CUDA reports (CUDA_VISIBLE_DEVICES renumbers devices, so
    CUDA's index is not NVML's); falls back to torch.cuda.mem_get_info when NVML cannot answer.
    None when CUDA is not available or neither source answers.
    """
    try:
        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device()
    except Exception:  # noqa: BLE001 - a broken CUDA setup means "no GPU" here
        logger.debug("CUDA query failed", exc_info=True)
        return None
    free = _nvml_free_bytes(index)
    if free is not None:
        return free
    try:
        return int(torch.cuda.mem_get_info(index)[0])
    except Exception:  # noqa: BLE001
        logger.warning("could not read free GPU memory from NVML or CUDA", exc_info=True)
        return None


def _nvml_free_bytes(cuda_index: int) -> int | None:
    """Free bytes NVML reports for CUDA device ``cuda_index``, or None on any failure."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001
        logger.debug("NVML init failed", exc_info=True)
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
        # torch prints the bare UUID; NVML names full GPUs "GPU-<uuid>" and MIG slices "MIG-<uuid>".
        candidates = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
        for candidate in candidates:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(candidate)
            except pynvml.NVMLError:
                continue
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
        logger.debug("NVML knows no device with UUID %s", uuid)
        return None
    except Exception:  # noqa: BLE001
        logger.debug("NVML memory query failed", exc_info=True)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def load_pipeline(model_id: str, device: str | None = None, dtype: str | None = None,
                  optimizations: AccelerationConfig | None = None) -> ImagePipeline:
    """Load MODEL_ID as an ImagePipeline; any failure raises ModelLoadError.

    model_id: a built-in model (tiny, tiny-sdxl, sd15, sdxl: random weights from a fixed seed), a
    local folder in save_pretrained layout, or a hub id. device: None picks "cuda" when available,
    else "cpu". dtype: "float32" / "bfloat16" / "float16" (or fp32/bf16/fp16); None picks bfloat16
    on a GPU that supports it, else float16 on CUDA, float32 on the CPU. optimizations: what
    gpu_worker.model.acceleration applies (None: nothing; torch.compile needs a warm_up afterwards).
    """
    _quiet_library_logging()
    started = time.perf_counter()
    try:
        torch_device = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype, torch_device)
        if model_id in BUILTIN_MODELS:
            from gpu_worker.model import architectures

            pipe = architectures.build_pipeline(model_id, torch_device, torch_dtype)
        else:
            pipe = _from_pretrained(model_id, torch_device, torch_dtype)
        architecture = _detect_architecture(pipe)
        pipe.set_progress_bar_config(disable=True)
        from gpu_worker.model import schedulers# imports diffusers

        pipe.scheduler = schedulers.without_gpu_waits(pipe.scheduler)
        applied = acceleration.accelerate(pipe, torch_device, optimizations or AccelerationConfig(
            compile=False, channels_last=False, fuse_qkv=False))
    except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
        raise ModelLoadError(
            f"cannot load MODEL_ID {model_id!r}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
            f"Hint: {_HINT}"
        ) from exc
    pipeline = ImagePipeline(pipe, model_id, architecture, torch_device, torch_dtype)
    logger.info("loaded %r in %.1f s; optimizations: %s", pipeline, time.perf_counter() - started, applied)
    return pipeline


def _quiet_library_logging() -> None:
    """Keep diffusers/transformers to errors and drop their loading progress bars (process-wide):
    their info messages, warnings and bars would flood the worker's log."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


def _resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; expected float32, bfloat16 or float16") from None


def _looks_like_path(model_id: str) -> bool:
    """True for names that cannot be hub ids ("org/name"), so they must be local folders."""
    return (os.path.isabs(model_id) or model_id.startswith((".", "~"))
            or model_id.count("/") > 1 or os.path.exists(model_id))


def _hub_offline() -> bool:
    # Read at call time (huggingface_hub reads it once, at import), so it can be flipped later.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_pretrained(model_id: str, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """Load a save_pretrained folder or a hub id as a text-to-image pipeline on ``device``."""
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline
    from diffusers.pipelines import pipeline_utils

    is_folder = os.path.isdir(model_id)
    if not is_folder and _looks_like_path(model_id):
        problem = "is a file, not a folder" if os.path.exists(model_id) else "no such folder"
        raise FileNotFoundError(f"{problem}: {model_id}")
    local_only = is_folder or _hub_offline()
    # Read model_index.json first: the class decides which keyword arguments the pipeline accepts.
    class_name = str(DiffusionPipeline.load_config(model_id, local_files_only=local_only)
                     .get("_class_name", ""))
    kwargs: dict[str, Any] = {"local_files_only": local_only}
    if class_name.startswith("StableDiffusionXL"):
        kwargs["add_watermarker"] = False
    elif class_name.startswith("StableDiffusion"):
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # diffusers renamed torch_dtype to dtype; older releases only know torch_dtype.
    dtype_key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    kwargs[dtype_key] = dtype
    pipe = AutoPipelineForText2Image.from_pretrained(model_id, **kwargs)
    return pipe.to(device)


def _detect_architecture(pipe: DiffusionPipeline) -> str:
    """The family ("sd15" or "sdxl") from the pipeline class; other pipelines are not served."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd15"
    raise TypeError(f"{type(pipe).__name__} is not supported: the worker serves "
                    "StableDiffusionPipeline and StableDiffusionXLPipeline layouts")
