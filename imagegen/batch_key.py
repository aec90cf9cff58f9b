"""What requests must share to run in one pipeline call, and how much work one image of it is.

Shared by the worker (its batcher groups requests by :class:`BatchKey`, its cost model learns batch
times per key), the broker (batch-time estimates, admission) and the simulator, so it lives here
rather than in any one of them: the broker imports nothing from the worker package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to run in one pipeline call."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float

    @classmethod
    def of(cls, params: Any) -> "BatchKey":
        """The key of a request's parameters (imagegen.protocol.GenerationParams, or anything with
        its width, height, num_inference_steps and guidance_scale): the worker's batcher, the
        broker's batch-time estimates and the simulator all group by it."""
        return cls(params.width, params.height, params.num_inference_steps, params.guidance_scale)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def work_units(key: BatchKey) -> float:
    """Relative compute of one image of ``key``: megapixels x steps, doubled when CFG is on
    (guidance > 1 runs the UNet on a conditional and an unconditional row)."""
    cfg_rows = 2 if key.guidance_scale > 1.0 else 1
    return key.pixels * key.num_inference_steps * cfg_rows / 1e6
