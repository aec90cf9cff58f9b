"""Tests of gpu_worker.model.pipelines: loading, batched generation, reproducibility, memory arithmetic.

All on the CPU with the tiny random-weight models; real-size architectures are only built on the
meta device (parameter counts, no memory, no compute).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gpu_worker.model import architectures, decoding
from gpu_worker.model.pipelines import (
    BUILTIN_MODELS,
    GenerationJob,
    ImagePipeline,
    ModelLoadError,
    auto_max_batch_size,
    estimate_per_image_memory_bytes,
    free_gpu_memory_bytes,
    load_pipeline,
    rgb_image,
)
from imagegen.batch_key import BatchKey

GIB = 1024**3
SETTINGS = BatchKey(width=64, height=64, num_inference_steps=4, guidance_scale=7.5)
JOBS = [
    GenerationJob("a red fox in the snow", None, 11),
    GenerationJob("a lighthouse at dusk", "blurry", 22),
    GenerationJob("a bowl of ramen", "", 33),
    GenerationJob("an astronaut riding a horse", "low quality", 2**63 - 1),
]


@pytest.fixture(scope="module")
def tiny() -> ImagePipeline:
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def tiny_sdxl() -> ImagePipeline:
    return load_pipeline("tiny-sdxl")


# --- loading -------------------------------------------------------------------------------------


def test_builtin_names_agree() -> None:
    assert BUILTIN_MODELS == architectures.BUILTIN_MODELS == ("tiny", "tiny-sdxl", "sd15", "sdxl")


def test_tiny_attributes(tiny: ImagePipeline, tiny_sdxl: ImagePipeline) -> None:
    assert (tiny.model_id, tiny.architecture, tiny.native_size) == ("tiny", "sd15", 64)
    assert (tiny_sdxl.model_id, tiny_sdxl.architecture, tiny_sdxl.native_size) == (
        "tiny-sdxl", "sdxl", 64)
    for pipe in (tiny, tiny_sdxl):
        assert pipe.device == torch.device("cpu")
        assert pipe.dtype == torch.float32
        assert pipe.diffusers_pipeline.unet.dtype == torch.float32


def test_builtin_weights_are_deterministic(tiny: ImagePipeline) -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    again = load_pipeline("tiny")
    # Building must neither depend on nor disturb the caller's RNG state.
    assert torch.equal(torch.rand(3), expected_next)
    for module in ("unet", "vae", "text_encoder"):
        ours = getattr(tiny.diffusers_pipeline, module).state_dict()
        theirs = getattr(again.diffusers_pipeline, module).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), module


def test_dtype_string_is_honoured() -> None:
    pipe = load_pipeline("tiny", device="cpu", dtype="bfloat16")
    assert pipe.dtype == torch.bfloat16
    assert pipe.diffusers_pipeline.unet.dtype == torch.bfloat16
    assert pipe.per_image_memory_bytes(64, 64) == estimate_per_image_memory_bytes(
        "sd15", torch.bfloat16, 64, 64)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sd15", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
        ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                  "text_encoder_2": 694_659_840}),
    ],
)
def test_real_architecture_sizes_on_meta(name: str, expected: dict[str, int]) -> None:
    components = architectures.build_components(name, device="meta")
    counts = {key: sum(p.numel() for p in module.parameters())
              for key, module in components.items() if isinstance(module, torch.nn.Module)}
    assert counts == expected
    assert components["unet"].device.type == "meta"
    # The text encoder must accept every id the tokenizer can produce.
    assert components["text_encoder"].config.vocab_size == len(components["tokenizer"]) == 49408
    assert components["text_encoder"].config.eos_token_id == components["tokenizer"].eos_token_id


def test_tokenizer_pads_to_77_with_matching_special_ids(tiny: ImagePipeline) -> None:
    pipe = tiny.diffusers_pipeline
    ids = pipe.tokenizer("héllo, wörld", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == pipe.tokenizer.bos_token_id == pipe.text_encoder.config.bos_token_id
    assert pipe.tokenizer.eos_token_id == pipe.text_encoder.config.eos_token_id
    assert max(ids) < pipe.text_encoder.config.vocab_size


@pytest.mark.parametrize("model_id", ["tiny", "tiny-sdxl"])
def test_save_pretrained_folder_reloads_identically(model_id: str, tiny: ImagePipeline,
                                                    tiny_sdxl: ImagePipeline,
                                                    tmp_path: Path) -> None:
    builtin = tiny if model_id == "tiny" else tiny_sdxl
    builtin.diffusers_pipeline.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert loaded.model_id == str(tmp_path)
    assert loaded.architecture == builtin.architecture
    assert loaded.native_size == builtin.native_size
    jobs = JOBS[:2]
    np.testing.assert_allclose(loaded.generate_array(jobs, SETTINGS),
                               builtin.generate_array(jobs, SETTINGS), rtol=0, atol=1e-6)


def _assert_load_error(model_id: str, *fragments: str) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(model_id)
    message = str(info.value)
    assert repr(model_id) in message
    assert "Hint:" in message and "save_pretrained" in message
    for fragment in fragments:
        assert fragment in message
    return info.value


def test_nonexistent_path_is_a_load_error() -> None:
    _assert_load_error("/nonexistent/model", "FileNotFoundError")


def test_unreachable_hub_id_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying the network
    error = _assert_load_error("no-such-org-3f9c/no-such-model", "OSError")
    assert error.__cause__ is not None


def test_empty_folder_is_a_load_error(tmp_path: Path) -> None:
    _assert_load_error(str(tmp_path), "model_index.json")


def test_broken_model_index_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{not json")
    _assert_load_error(str(tmp_path))


def test_unsupported_pipeline_class_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    _assert_load_error(str(tmp_path))


def test_bad_dtype_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="'tiny'.*float33"):
        load_pipeline("tiny", dtype="float33")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_without_gpu_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_pipeline("tiny", device="cuda")


# --- generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(64, 64), (64, 96)])
def test_tiny_batch_gives_rgb_images_of_requested_size(tiny: ImagePipeline, width: int,
                                                       height: int) -> None:
    settings = BatchKey(width=width, height=height, num_inference_steps=4, guidance_scale=7.5)
    images = tiny.generate(JOBS, settings)
    assert len(images) == 4
    for image in images:
        assert image.mode == "RGB"
        assert image.size == (width, height)  # PIL size is (width, height)
    array = tiny.generate_array(JOBS, settings)
    assert array.shape == (4, height, width, 3) and array.dtype == np.float32
    assert 0.0 <= array.min() and array.max() <= 1.0
    # PIL images are the same pixels, rounded to 8 bits.
    assert np.abs(np.asarray(images[1], dtype=np.float32) / 255 - array[1]).max() <= 1 / 255 + 1e-6


def test_job_alone_equals_job_inside_batch(tiny: ImagePipeline) -> None:
    batch = tiny.generate_array(JOBS, SETTINGS)
    for index in (0, 2):
        alone = tiny.generate_array([JOBS[index]], SETTINGS)
        np.testing.assert_allclose(alone[0], batch[index], rtol=0, atol=1e-4)


def test_same_job_twice_is_identical_and_seeds_matter(tiny: ImagePipeline) -> None:
    job = JOBS[0]
    first = tiny.generate_array([job], SETTINGS)
    second = tiny.generate_array([job], SETTINGS)
    assert np.array_equal(first, second)
    other_seed = GenerationJob(job.prompt, job.negative_prompt, job.seed + 1)
    changed = tiny.generate_array([other_seed], SETTINGS)
    assert np.abs(changed - first).mean() > 1e-2


def test_tiny_sdxl_batch_of_two(tiny_sdxl: ImagePipeline) -> None:
    settings = BatchKey(width=64, height=96, num_inference_steps=4, guidance_scale=5.0)
    images = tiny_sdxl.generate(JOBS[:2], settings)
    assert [(image.mode, image.size) for image in images] == [("RGB", (64, 96))] * 2
    batch = tiny_sdxl.generate_array(JOBS[:2], settings)
    alone = tiny_sdxl.generate_array([JOBS[1]], settings)
    np.testing.assert_allclose(alone[0], batch[1], rtol=0, atol=1e-4)
    assert np.abs(batch[0] - batch[1]).mean() > 1e-2


def test_missing_negative_prompt_means_empty_string(tiny_sdxl: ImagePipeline) -> None:
    # SDXL would otherwise use zero embeddings for None, which differ from encoding "".
    without = tiny_sdxl.generate_array([GenerationJob("a cat", None, 5)], SETTINGS)
    empty = tiny_sdxl.generate_array([GenerationJob("a cat", "", 5)], SETTINGS)
    assert np.array_equal(without, empty)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_sdxl"])
@pytest.mark.parametrize("images_per_part", [1, 2, decoding.IMAGES_PER_PART])
def test_images_are_the_bytes_of_diffusers_own_pil_output(fixture: str, images_per_part: int,
                                                          request: pytest.FixtureRequest,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # generate decodes the latents itself, in parts, and converts to 8 bits where the pixels are (the
    # GPU in service): the same operations as diffusers' own decode and CPU conversion, so the same
    # bytes when the batch is one part (a convolution over fewer images may round differently: then
    # within one level); and each part is handed over, in order, before generate returns.
    pipeline: ImagePipeline = request.getfixturevalue(fixture)
    monkeypatch.setattr(pipeline, "images_per_part", images_per_part)
    jobs = JOBS[:3]
    handed_over: list[tuple[int, list[bytes]]] = []
    ours = pipeline.generate(jobs, SETTINGS, on_images=lambda first, arrays: handed_over.append(
        (first, [array.tobytes() for array in arrays])))
    with torch.inference_mode():
        theirs = pipeline.diffusers_pipeline(
            prompt=[job.prompt for job in jobs], negative_prompt=["", "blurry", ""],
            generator=[torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
            width=SETTINGS.width, height=SETTINGS.height, num_inference_steps=SETTINGS.num_inference_steps,
            guidance_scale=SETTINGS.guidance_scale, output_type="pil").images
    assert [array.shape for array in ours] == [(SETTINGS.height, SETTINGS.width, 3)] * 3  # the arrays handed over
    assert [array.tobytes() for array in ours] == [data for _, arrays in handed_over for data in arrays]
    if images_per_part >= len(jobs):
        assert [array.tobytes() for array in ours] == [image.tobytes() for image in theirs]
    for mine, diffusers_image in zip(ours, theirs):
        difference = np.abs(np.asarray(mine, dtype=int) - np.asarray(diffusers_image, dtype=int))
        assert difference.max() <= 1 and difference.mean() < 0.01
    part_sizes = [len(arrays) for _, arrays in handed_over]
    assert part_sizes == {1: [1, 1, 1], 2: [2, 1]}.get(images_per_part, [3])
    assert [first for first, _ in handed_over] == [0, *np.cumsum(part_sizes)[:-1]]
    assert [data for _, arrays in handed_over for data in arrays] == [image.tobytes() for image in ours]


def test_eight_bit_conversion_is_numpys_float32_arithmetic() -> None:
    pixels = (torch.tensor([0.0, 0.5, 1.5, 2.5, 127.5, 255.0]) / 255).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    (array,) = decoding.to_rgb8(pixels).numpy()
    image = rgb_image(array)
    assert image.mode == "RGB" and image.size == (6, 1)
    expected = (pixels[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")  # diffusers' numpy_to_pil
    assert np.array_equal(np.asarray(image), expected)
    (gray,) = decoding.to_rgb8(torch.full((1, 1, 2, 2), 0.5)).numpy()  # one channel: grey, given as RGB
    assert rgb_image(gray).mode == "RGB" and rgb_image(gray).getpixel((0, 0)) == (128, 128, 128)


def test_generate_makes_one_pipeline_call_and_checks_count(tiny: ImagePipeline,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def fake_pipeline(**kwargs: object) -> SimpleNamespace:
        calls.append(kwargs)
        return SimpleNamespace(images=[object()])  # one image for two jobs

    monkeypatch.setattr(tiny, "diffusers_pipeline", fake_pipeline)
    with pytest.raises(RuntimeError, match="1 images for 2 jobs"):
        tiny.generate(JOBS[:2], SETTINGS)
    assert len(calls) == 1
    call = calls[0]
    assert call["prompt"] == [JOBS[0].prompt, JOBS[1].prompt]
    assert call["negative_prompt"] == ["", "blurry"]
    assert [g.initial_seed() for g in call["generator"]] == [11, 22]
    assert all(g.device.type == "cpu" for g in call["generator"])
    assert (call["width"], call["height"], call["num_inference_steps"],
            call["guidance_scale"]) == (64, 64, 4, 7.5)


def test_bad_batches_are_rejected(tiny: ImagePipeline) -> None:
    with pytest.raises(ValueError, match="at least one job"):
        tiny.generate([], SETTINGS)
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        tiny.generate(JOBS[:1], BatchKey(60, 64, 4, 7.5))
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny.generate(JOBS[:1], BatchKey(64, 64, 0, 7.5))
    with pytest.raises(ValueError, match="seed"):
        GenerationJob("x", None, 2**63)
    with pytest.raises(ValueError, match="seed"):
        GenerationJob("x", None, -1)


def test_steps_past_the_schedulers_tables_are_refused_not_an_index_error(tiny: ImagePipeline) -> None:
    """PNDM with steps_offset 1 (SD-1.5's, and tiny's) at 1000 steps would reach timestep 1000 of
    0..999 inside diffusers; 999 steps stay within it."""
    with pytest.raises(ValueError, match=r"num_inference_steps 1000 is more than this model's scheduler "
                                         r"\(PNDMScheduler, 1000 training timesteps\) can run"):
        tiny.generate(JOBS[:1], BatchKey(64, 64, 1000, 7.5))
    assert tiny._steps_refusal(999) is None and tiny._steps_refusal(25) is None


# --- memory arithmetic ---------------------------------------------------------------------------


def test_per_image_memory_estimates() -> None:
    sdxl = estimate_per_image_memory_bytes("sdxl", torch.bfloat16, 1024, 1024)
    sd15 = estimate_per_image_memory_bytes("sd15", torch.bfloat16, 512, 512)
    assert 2.5 * GIB < sdxl < 2.7 * GIB  # measured: about 2.6 GiB per extra image
    assert sd15 == GIB // 2
    assert estimate_per_image_memory_bytes("sdxl", torch.float16, 1024, 1024) == sdxl
    assert estimate_per_image_memory_bytes("sdxl", torch.float32, 1024, 1024) == 2 * sdxl
    # Linear in pixel count, and width/height are interchangeable.
    assert estimate_per_image_memory_bytes("sdxl", torch.bfloat16, 512, 512) == -(-sdxl // 4)
    assert (estimate_per_image_memory_bytes("sd15", torch.bfloat16, 512, 768)
            == estimate_per_image_memory_bytes("sd15", torch.bfloat16, 768, 512) == 3 * GIB // 4)
    assert 0 < estimate_per_image_memory_bytes("sd15", torch.float32, 64, 64) < 32 * 1024**2
    with pytest.raises(ValueError):
        estimate_per_image_memory_bytes("flux", torch.bfloat16, 512, 512)


def _stub(architecture: str, dtype: torch.dtype) -> SimpleNamespace:
    """Stands in for a loaded real-size model: auto_max_batch_size only asks it for the estimate."""
    return SimpleNamespace(per_image_memory_bytes=lambda w, h: estimate_per_image_memory_bytes(
        architecture, dtype, w, h))


def test_auto_max_batch_size(tiny: ImagePipeline) -> None:
    sdxl_bf16, sdxl_fp32 = _stub("sdxl", torch.bfloat16), _stub("sdxl", torch.float32)
    assert auto_max_batch_size(tiny, None, 64, 64) == 4
    assert auto_max_batch_size(tiny, None, 64, 64, cpu_default=2) == 2
    # 0.85 * 80 GiB / 2.65 GiB = 25.7
    assert auto_max_batch_size(sdxl_bf16, 80 * GIB, 1024, 1024) == 25
    assert auto_max_batch_size(sdxl_fp32, 80 * GIB, 1024, 1024) == 12  # 68 / 5.3 = 12.8
    # 512² costs a quarter: 102.6 images, so the limit decides.
    assert auto_max_batch_size(sdxl_bf16, 80 * GIB, 512, 512) == 64
    assert auto_max_batch_size(sdxl_bf16, 80 * GIB, 512, 512, limit=200) == 102
    assert auto_max_batch_size(sdxl_bf16, 80 * GIB, 1024, 1024, limit=8) == 8
    # 0.85 * 40 GiB / 0.5 GiB = 68 SD-1.5 images: clamped to the default limit.
    assert auto_max_batch_size(_stub("sd15", torch.bfloat16), 40 * GIB, 512, 512) == 64
    # Never below one, even when nothing fits.
    assert auto_max_batch_size(sdxl_bf16, GIB, 1024, 1024) == 1
    assert auto_max_batch_size(sdxl_bf16, 0, 1024, 1024) == 1
    assert auto_max_batch_size(tiny, 80 * GIB, 64, 64) == 64


# --- free GPU memory -----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_free_gpu_memory_is_none_without_cuda() -> None:
    assert free_gpu_memory_bytes() is None


class _FakeNVMLError(Exception):
    pass


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, uuid: str, mem_get_info: object) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(uuid=uuid))
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)


def _fake_pynvml(monkeypatch: pytest.MonkeyPatch, devices: dict[str, int],
                 init_fails: bool = False) -> list[str]:
    """Install a fake pynvml knowing ``devices`` (UUID -> free bytes); returns the call log."""
    log: list[str] = []
    module = types.ModuleType("pynvml")
    module.NVMLError = _FakeNVMLError

    def init() -> None:
        log.append("init")
        if init_fails:
            raise _FakeNVMLError("driver not loaded")

    def by_uuid(uuid: str) -> str:
        if uuid not in devices:
            raise _FakeNVMLError("not found")
        return uuid

    module.nvmlInit = init
    module.nvmlShutdown = lambda: log.append("shutdown")
    module.nvmlDeviceGetHandleByUUID = by_uuid
    module.nvmlDeviceGetMemoryInfo = lambda handle: SimpleNamespace(free=devices[handle])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return log


def _cuda_error(*args: object) -> tuple[int, int]:
    raise RuntimeError("CUDA error")


def test_free_gpu_memory_maps_cuda_device_to_nvml_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, "1234-abcd", _cuda_error)
    log = _fake_pynvml(monkeypatch, {"GPU-0000-other": 1, "GPU-1234-abcd": 70 * GIB})
    assert free_gpu_memory_bytes() == 70 * GIB
    assert log == ["init", "shutdown"]


def test_free_gpu_memory_falls_back_to_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, "1234-abcd", lambda index: (5 * GIB, 80 * GIB))
    _fake_pynvml(monkeypatch, {"GPU-other": 1})
    assert free_gpu_memory_bytes() == 5 * GIB
    _fake_pynvml(monkeypatch, {}, init_fails=True)
    assert free_gpu_memory_bytes() == 5 * GIB


def test_free_gpu_memory_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, "1234-abcd", _cuda_error)
    _fake_pynvml(monkeypatch, {}, init_fails=True)
    assert free_gpu_memory_bytes() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", _cuda_error)
    assert free_gpu_memory_bytes() is None
