"""Run a pipeline's UNet and text encoders one batch row at a time, so that results do not depend on batching.

A batched call sums in another order than a call of one row (the CPU kernels block by batch size), so a
request's latents inside a batch differ from its latents alone by float rounding, amplified by the
guidance scale (1e-5 to 2e-4 for the tiny models, the stock pipeline's own batches included). With
every model call split into calls of one row, whatever a request is batched with, its rows see the
very same calls: a denoising loop that handles each row right gives the stock pipeline's latents bit
for bit, and a test can ask for equality (tests/integration/test_step_engine.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch


@contextlib.contextmanager
def row_by_row(diffusers_pipeline: Any) -> Iterator[None]:
    """Within the block, the pipeline's UNet and text encoders compute each batch row on its own."""
    modules = [diffusers_pipeline.unet] + [getattr(diffusers_pipeline, name) for name in ("text_encoder", "text_encoder_2")
                                           if getattr(diffusers_pipeline, name, None) is not None]
    replaced = []
    try:
        for module in modules:
            if "forward" in vars(module):
                raise RuntimeError(f"{type(module).__name__}.forward is replaced already (torch.compile?)")
            module.forward = _one_row_at_a_time(module.forward)
            replaced.append(module)
        yield
    finally:
        for module in replaced:
            del module.forward


def _one_row_at_a_time(forward: Callable[..., Any]) -> Callable[..., Any]:
    def call(first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = first.shape[0]
        outputs = [forward(*_row(rows, index, (first, *args)), **_row(rows, index, kwargs)) for index in range(rows)]
        return _cat(outputs)

    return call


def _row(rows: int, index: int, value: Any) -> Any:
    """``value`` with every tensor whose first dimension is the batch cut to row ``index``."""
    if isinstance(value, torch.Tensor):
        return value[index:index + 1] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {key: _row(rows, index, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_row(rows, index, item) for item in value)
    return value


def _cat(outputs: list[Any]) -> Any:
    """The outputs of the single-row calls joined back into one batch output of the same structure."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, dict):  # transformers' and diffusers' ModelOutput are dicts
        return type(first)(**{key: _cat([output[key] for output in outputs]) for key in first.keys()})
    if isinstance(first, (list, tuple)):
        return type(first)(_cat(list(items)) for items in zip(*outputs))
    return first
