"""Waiting in tests for something that happens in another task or process, without asserting how long it takes."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest


async def until(check: Callable[[], Any], what: str, timeout_s: float = 10.0,
                describe_failure: Callable[[], str] = lambda: "") -> Any:
    """Poll ``check`` (sync or async) until it returns something true, and return that; fail naming
    ``what`` after ``timeout_s`` (a bound against hanging, not a duration under test), followed by
    ``describe_failure()`` (say, the processes' logs)."""
    async def poll() -> Any:
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.01)

    try:
        return await asyncio.wait_for(poll(), timeout_s)
    except asyncio.TimeoutError:
        pytest.fail(f"timed out waiting for {what}\n{describe_failure()}".rstrip())
