"""The batch that tests of gpu_worker.model.acceleration generate, eager and compiled alike."""

from __future__ import annotations

from gpu_worker.model.pipelines import GenerationJob
from imagegen.batch_key import BatchKey

SETTINGS = BatchKey(64, 64, 3, 7.5)


def jobs(count: int) -> list[GenerationJob]:
    return [GenerationJob(f"a lighthouse, variant {i}", "blurry" if i % 2 else None, 500 + i) for i in range(count)]
