"""gpu_worker.model.step_engine: a request's latents from the step engine are the stock pipeline's for that
request alone, whatever it shares steps with and whenever it is admitted, paused or resumed.

Both layouts (tiny: SD-1.5's, tiny-sdxl: SDXL's), every scheduler name of gpu_worker.model.schedulers,
float32 on the CPU, 64x64, a few steps. The timeline (rows of other step counts and guidance scales,
joining mid-way, paused and resumed, with and without offload) runs two ways:

* ``exact``: the UNet and the text encoders compute one batch row at a time (tests/support/row_by_row.py),
  in the engine and in the reference alike, so batching cannot change a single bit: the engine's latents
  must EQUAL the stock pipeline's (``ImagePipeline`` as the worker runs it, the request alone). Any slip
  of the engine's own (a row's timestep, guidance scale, scheduler state, generator or embeddings mixed
  up, a step taken twice or skipped) shows here, however small.
* ``batched``: the real batched calls. A batch sums in another order than a lone request, so its
  latents differ from the lone request's by rounding, amplified by the guidance scale over the steps;
  the stock pipeline's own batches differ from its lone requests just as much. TOLERANCE allows for
  that rounding and nothing more (see there).

Bit for bit without the row-by-row calls: a row alone, and a fixed batch against the stock pipeline's
call for the same batch (the very same UNet calls in both).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import pytest
import torch

from gpu_worker.model import acceleration, schedulers
from gpu_worker.model.pipelines import GenerationJob, ImagePipeline, load_pipeline
from gpu_worker.model.step_engine import RowSpec, StepEngine
from imagegen.batch_key import BatchKey
from tests.support.row_by_row import row_by_row

# Absolute, on latents (whose values reach 60 here). Measured on a 2-core x86 CPU (one thread, as these
# tests run), the largest difference of a row in the batched timeline from its request alone, per
# scheduler, SD-1.5 / SDXL layout: euler 1.2e-4 / 3.6e-5, euler_a 1.5e-4 / 4.3e-5, dpmpp_2m 8.4e-5 /
# 2.9e-5, dpmpp_2m_karras 8.2e-5 / 1.0e-4, ddim 5.5e-5 / 3.4e-5, pndm 2.2e-5 / 1.3e-5: each as large as
# the stock pipeline's own batch of three differs from its lone requests (1.5e-4 at most; two threads
# gave the same figures within 20%). 5e-4 leaves over 3x for other CPUs' kernels (their blocking, hence
# their rounding, differs); the smallest slip tried, a guidance scale of 7.49 for 7.5, moves these
# latents by 2.9e-3 to 2.2e-2, and 7.4 by 2.9e-2 to 0.22.
TOLERANCE = 5e-4

MODELS = ("tiny", "tiny-sdxl")
FOX = RowSpec("fox", GenerationJob("a red fox in the snow", None, 11), BatchKey(64, 64, 4, 7.5))
OWL = RowSpec("owl", GenerationJob("an owl on a branch", "blurry", 44), BatchKey(64, 64, 4, 7.5))
ASTRONAUT = RowSpec("astronaut", GenerationJob("an astronaut riding a horse", "low quality", 2**63 - 1),
                    BatchKey(64, 64, 4, 7.5))
LIGHTHOUSE = RowSpec("lighthouse", GenerationJob("a lighthouse at dusk", "blurry", 22), BatchKey(64, 64, 7, 3.0))
RAMEN = RowSpec("ramen", GenerationJob("a bowl of ramen", "", 33), BatchKey(64, 64, 4, 1.0))  # no guidance
WIDE = RowSpec("wide", GenerationJob("a wide valley", None, 5), BatchKey(128, 64, 4, 7.5))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny: a second thread only adds waiting, and on a busy 2-core machine OpenMP's
    waits made this file ten times slower (300 s against 27 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipelines() -> dict[str, ImagePipeline]:
    return {model: load_pipeline(model, "cpu", "float32") for model in MODELS}


@contextlib.contextmanager
def using_scheduler(pipeline: ImagePipeline, name: str) -> Iterator[None]:
    """The pipeline runs with scheduler ``name`` (made from its own scheduler's configuration)."""
    pipe = pipeline.diffusers_pipeline
    original = pipe.scheduler
    pipe.scheduler = schedulers.named_scheduler(name, original.config)
    try:
        yield
    finally:
        pipe.scheduler = original


def exact_or_batched(pipeline: ImagePipeline, exact: bool):
    return row_by_row(pipeline.diffusers_pipeline) if exact else contextlib.nullcontext()


_stock_cache: dict[tuple, torch.Tensor] = {}


def stock_latents(pipeline: ImagePipeline, scheduler: str, spec: RowSpec, exact: bool) -> torch.Tensor:
    """The request's latents from the stock pipeline, the request alone, as the worker runs it."""
    key = (pipeline.model_id, scheduler, exact, spec)
    if key not in _stock_cache:
        with using_scheduler(pipeline, scheduler), exact_or_batched(pipeline, exact):
            _stock_cache[key] = pipeline._run([spec.job], spec.settings, output_type="latent")
    return _stock_cache[key]


def engine_for(pipeline: ImagePipeline, scheduler: str) -> StepEngine:
    return StepEngine(pipeline, schedulers.named_scheduler(scheduler, pipeline.diffusers_pipeline.scheduler.config))


def step_to_end(engine: StepEngine, taken: dict[str, torch.Tensor], steps: int | None = None) -> None:
    """Step every runnable row together (``steps`` times, or until none is left), taking rows as they finish."""
    while engine.runnable_rows() and (steps is None or steps > 0):
        engine.step(engine.runnable_rows())
        for row_id in engine.finished_rows():
            taken[row_id] = engine.take_latents([row_id])
        steps = None if steps is None else steps - 1


# --- the requests' latents ------------------------------------------------------------------------

def timeline(engine: StepEngine) -> dict[str, torch.Tensor]:
    """Rows with other step counts and guidance scales, joining mid-way, paused and resumed:

    * lighthouse (7 steps, guidance 3) runs alone for 2 steps, then beside the others; paused for 2
      steps (kept on the device) after its 4th;
    * fox (4 steps, 7.5) and ramen (4 steps, no guidance: one UNet row) join after lighthouse's 2nd
      step; fox is paused with offload after its 1st step while the others take 2, and resumed;
    * owl (4 steps, 7.5, a negative prompt) joins while fox is paused.

    Returns every row's final latents, each taken as soon as the row finished."""
    taken: dict[str, torch.Tensor] = {}
    engine.admit([LIGHTHOUSE])
    step_to_end(engine, taken, steps=2)
    engine.admit([FOX, RAMEN])
    step_to_end(engine, taken, steps=1)
    engine.pause("fox", offload=True)
    step_to_end(engine, taken, steps=1)
    assert engine.is_paused("fox") and "fox" not in engine.runnable_rows()
    engine.admit([OWL])
    step_to_end(engine, taken, steps=1)
    assert [engine.progress(row_id)[0] for row_id in ("lighthouse", "fox", "ramen", "owl")] == [5, 1, 3, 1]
    engine.pause("lighthouse")
    engine.resume("fox")
    step_to_end(engine, taken, steps=2)
    assert engine.progress("lighthouse")[0] == 5 and engine.progress("fox")[0] == 3
    engine.resume("lighthouse")
    step_to_end(engine, taken)
    return taken


TIMELINE_ROWS = (LIGHTHOUSE, FOX, RAMEN, OWL)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "batched"])
@pytest.mark.parametrize("scheduler", schedulers.SCHEDULER_NAMES)
@pytest.mark.parametrize("model", MODELS)
def test_rows_joining_pausing_and_mixing_get_the_latents_of_their_request_alone(pipelines, model, scheduler, exact):
    pipeline = pipelines[model]
    with exact_or_batched(pipeline, exact):
        taken = timeline(engine_for(pipeline, scheduler))
    assert sorted(taken) == sorted(spec.row_id for spec in TIMELINE_ROWS)
    for spec in TIMELINE_ROWS:
        ours, stock = taken[spec.row_id], stock_latents(pipeline, scheduler, spec, exact)
        assert ours.shape == stock.shape == (1, 4, 8, 8)
        difference = (ours - stock).abs().max().item()
        if exact:
            assert torch.equal(ours, stock), f"{spec.row_id}: max difference {difference:.3g}"
        else:
            assert difference <= TOLERANCE, f"{spec.row_id}: max difference {difference:.3g}"


@pytest.mark.parametrize("scheduler", schedulers.SCHEDULER_NAMES)
@pytest.mark.parametrize("model", MODELS)
def test_a_row_alone_equals_the_stock_pipeline_bit_for_bit(pipelines, model, scheduler):
    # Alone, the engine's UNet calls are the stock pipeline's (its two CFG rows, or one), batched alike.
    pipeline = pipelines[model]
    for spec in (FOX, RAMEN):  # with and without guidance
        engine = engine_for(pipeline, scheduler)
        engine.admit([spec])
        taken: dict[str, torch.Tensor] = {}
        step_to_end(engine, taken)
        assert torch.equal(taken[spec.row_id], stock_latents(pipeline, scheduler, spec, exact=False))


@pytest.mark.parametrize("scheduler", schedulers.SCHEDULER_NAMES)
@pytest.mark.parametrize("model", MODELS)
def test_a_fixed_batch_equals_the_stock_pipelines_batch_bit_for_bit(pipelines, model, scheduler):
    # Same rows in the UNet in the same order (unconditional ones first) and the prompts encoded
    # together: the very same calls, batched as they are, as one diffusers call for the three.
    pipeline = pipelines[model]
    engine = engine_for(pipeline, scheduler)
    specs = [FOX, OWL, ASTRONAUT]
    engine.admit(specs)
    taken: dict[str, torch.Tensor] = {}
    step_to_end(engine, taken)
    with using_scheduler(pipeline, scheduler):
        stock = pipeline._run([spec.job for spec in specs], FOX.settings, output_type="latent")
    assert torch.equal(torch.cat([taken[spec.row_id] for spec in specs]), stock)


@pytest.mark.parametrize("model", MODELS)
def test_decoded_images_are_the_workers_images(pipelines, model):
    pipeline = pipelines[model]
    engine = StepEngine(pipeline)
    engine.admit([FOX, OWL])
    for _ in range(engine.progress("fox")[1]):
        engine.step(["fox", "owl"])
    parts: list[tuple[int, int]] = []
    ours = engine.decode(["owl", "fox"], on_images=lambda first, arrays: parts.append((first, len(arrays))))
    theirs = pipeline.generate([OWL.job, FOX.job], FOX.settings, on_images=lambda first, arrays: None)
    assert parts == [(0, 2)] and engine.row_ids() == []
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.dtype == np.uint8 and mine.shape == (64, 64, 3) and np.array_equal(mine, reference)


# --- what one step sends to the UNet ----------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_one_step_is_one_unet_call_with_a_timestep_per_row(pipelines, model):
    pipeline = pipelines[model]
    engine = StepEngine(pipeline, schedulers.named_scheduler("euler", pipeline.diffusers_pipeline.scheduler.config))
    engine.admit([LIGHTHOUSE])
    engine.step(["lighthouse"])
    engine.admit([FOX, RAMEN])
    calls: list[tuple[tuple[int, ...], torch.Tensor, tuple[int, ...]]] = []
    handle = pipeline.diffusers_pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((tuple(args[0].shape), args[1].clone(),
                                                   tuple(kwargs["encoder_hidden_states"].shape))),
        with_kwargs=True)
    try:
        engine.step(["fox", "lighthouse", "ramen"])
    finally:
        handle.remove()
    assert len(calls) == 1
    sample_shape, timestep, hidden_shape = calls[0]
    # fox and lighthouse are guided (two UNet rows each), ramen is not (one): unconditional rows first
    assert sample_shape[0] == hidden_shape[0] == 5
    fox_t, lighthouse_t, ramen_t = (engine._rows[row_id].scheduler.timesteps for row_id in ("fox", "lighthouse", "ramen"))
    assert timestep.tolist() == [fox_t[0], lighthouse_t[1], fox_t[0], lighthouse_t[1], ramen_t[0]]
    assert [engine.progress(row_id)[0] for row_id in ("fox", "lighthouse", "ramen")] == [1, 2, 1]


def test_the_per_row_timestep_is_marked_dynamic_with_the_batch():
    # With TORCH_COMPILE the batch dimension is dynamic so that a changing number of rows does not
    # recompile; the engine's timestep tensor carries the batch too (compiled for real on the GPU).
    sample, hidden, timestep = torch.zeros(3, 4, 8, 8), torch.zeros(3, 77, 32), torch.tensor([1.0, 2.0, 3.0])
    scalar = torch.tensor(5.0)
    acceleration._mark_batch_dynamic(3, sample, hidden, {}, timestep)
    acceleration._mark_batch_dynamic(3, sample, hidden, {}, scalar)
    assert getattr(timestep, "_dynamo_dynamic_indices", None) == {0}
    assert getattr(scalar, "_dynamo_dynamic_indices", None) is None


# --- bookkeeping and refusals ------------------------------------------------------------------------

def test_progress_counts_unet_calls_pndm_takes_one_more(pipelines):
    pipeline = pipelines["tiny"]
    engine = StepEngine(pipeline)  # SD-1.5's PNDM: its first timestep runs twice
    engine.admit([RAMEN])
    assert engine.progress("ramen") == (0, 5)
    euler = engine_for(pipeline, "euler")
    euler.admit([RAMEN])
    assert euler.progress("ramen") == (0, 4)


def test_rows_finish_in_their_own_time_and_leave_when_taken(pipelines):
    engine = engine_for(pipelines["tiny"], "ddim")
    engine.admit([LIGHTHOUSE, RAMEN])
    for _ in range(4):
        engine.step(engine.runnable_rows())
    assert engine.finished_rows() == ["ramen"] and engine.runnable_rows() == ["lighthouse"]
    assert [engine.progress(row_id) for row_id in ("lighthouse", "ramen")] == [(4, 7), (4, 4)]
    with pytest.raises(ValueError, match="finished"):
        engine.step(["lighthouse", "ramen"])
    with pytest.raises(ValueError, match="not finished"):
        engine.take_latents(["lighthouse", "ramen"])
    assert engine.row_ids() == ["lighthouse", "ramen"]  # a refusal changes nothing
    assert engine.take_latents(["ramen"]).shape == (1, 4, 8, 8)
    assert engine.row_ids() == ["lighthouse"]
    engine.drop("lighthouse")
    assert engine.row_ids() == [] and engine.runnable_rows() == []


def test_refusals(pipelines):
    engine = StepEngine(pipelines["tiny"])
    engine.admit([FOX, WIDE])
    with pytest.raises(ValueError, match="share a latent shape"):
        engine.step(["fox", "wide"])
    with pytest.raises(ValueError, match="already in the engine"):
        engine.admit([RAMEN, FOX])
    with pytest.raises(ValueError, match="unique"):
        engine.admit([RAMEN, RAMEN])
    with pytest.raises(ValueError, match="multiple of 8"):
        engine.admit([RAMEN, RowSpec("odd", FOX.job, BatchKey(60, 64, 4, 7.5))])
    assert engine.row_ids() == ["fox", "wide"]  # nothing of a refused admission stays
    with pytest.raises(KeyError, match="no row 'nobody'"):
        engine.step(["fox", "nobody"])
    with pytest.raises(ValueError, match="at least one row"):
        engine.step([])
    with pytest.raises(ValueError, match="one step at a time"):
        engine.step(["fox", "fox"])
    engine.pause("fox")
    with pytest.raises(ValueError, match="paused"):
        engine.step(["fox"])
    assert [engine.progress(row_id) for row_id in ("fox", "wide")] == [(0, 5), (0, 5)]
    engine.step(["wide"])
    assert engine.progress("wide") == (1, 5)
