"""The gateway's answers when its image folder fails: a request to send, and checks of the answer
(503 ``storage_unavailable``) and of what is left in the folder."""

from __future__ import annotations

import os
from pathlib import Path

REQUEST = {"prompt": "a lighthouse", "width": 64, "height": 64}


def temp_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


async def post(client, path: str = "/generate", body: dict | None = None):
    response = await client.post(path, json=body or REQUEST)
    assert response.content_type == "application/json", await response.text()
    return response, await response.json()


def assert_storage_503(response, body, cause_words: tuple[str, ...], folder: Path) -> None:
    assert response.status == 503, body
    assert response.headers.get("Retry-After") == "5"
    assert response.headers.get("X-Request-ID")
    error = body["error"]
    assert error["code"] == "storage_unavailable", error
    assert str(folder) in error["message"], error
    assert any(word in error["message"] for word in cause_words), error
