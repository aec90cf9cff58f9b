"""On a CUDA GPU: the real-size pipelines run through the worker's own code (skipped without a GPU).

CI has no GPU and skips this file; on a GPU machine run ``python -m pytest -m gpu tests/integration/test_gpu_smoke.py``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from gpu_worker.decisions.preemption import BatchPreempted, Preemption
from gpu_worker.model.pipelines import GenerationJob, auto_max_batch_size, free_gpu_memory_bytes, load_pipeline
from imagegen.batch_key import BatchKey

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)"),
]


@pytest.mark.parametrize("model_id, size", [("sd15", 512), ("sdxl", 1024)])
def test_real_size_pipeline_batches_on_the_gpu(model_id, size):
    pipeline = load_pipeline(model_id)
    assert pipeline.device.type == "cuda" and pipeline.dtype in (torch.bfloat16, torch.float16)
    settings = BatchKey(size, size, 4, 7.5)
    jobs = [GenerationJob(f"a lighthouse, variant {i}", None, 100 + i) for i in range(3)]
    batched = pipeline.generate_array(jobs, settings)
    alone = pipeline.generate_array(jobs[:1], settings)
    assert batched.shape == (3, size, size, 3) and np.isfinite(batched).all()
    # bf16 kernels may pick other algorithms per batch size: close, not bit-identical.
    assert np.abs(batched[0] - alone[0]).mean() < 0.02
    # The worker's own path: latents decoded in parts, 8-bit on the GPU, pinned copies handed over.
    handed_over = []
    images = pipeline.generate(jobs, settings, on_images=lambda first, arrays: handed_over.append((first, len(arrays))))
    assert [image.size for image in images] == [(size, size)] * 3 and handed_over == [(0, 3)]
    assert np.abs(np.asarray(images[0], dtype=np.float32) / 255 - batched[0]).mean() < 0.02
    free = free_gpu_memory_bytes()
    assert free is not None and free > 0
    assert auto_max_batch_size(pipeline, free, size, size) >= 1
    # A preemptible lone batch (the default policy's start): not stopped, the same image; stopped
    # before its second step, it raises after the throttle's wait (CUDA events: one step queued at most).
    open_window = Preemption(open_until_s=float("inf"), clock=time.monotonic)
    lone = pipeline.generate(jobs[:1], settings, preemption=open_window)[0]
    assert open_window.steps_checked == len(pipeline.diffusers_pipeline.scheduler.timesteps)
    assert np.abs(np.asarray(lone, dtype=np.float32) - np.asarray(images[0], dtype=np.float32)).mean() / 255 < 0.02
    stopped = Preemption(open_until_s=float("inf"), clock=time.monotonic)
    check = stopped.before_step

    def request_before_the_second_step(synchronize):
        if stopped.steps_checked == 1:
            stopped.request()
        check(synchronize)

    stopped.before_step = request_before_the_second_step
    with pytest.raises(BatchPreempted):
        pipeline.generate(jobs[:1], settings, preemption=stopped)
    assert stopped.steps_checked == 2
