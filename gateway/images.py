"""Generated images on disk: saved under unguessable ids, served by id, pruned by age and count."""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

# 32 lowercase hex digits (uuid4): 122 random bits, so ids cannot be guessed, and the pattern
# admits no path separators or dots, so a served name can never leave the image folder.
IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def new_image_id() -> str:
    return uuid.uuid4().hex


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class ImageStore:
    def __init__(self, directory: str | os.PathLike, max_count: int, max_age_s: float) -> None:
        self.directory = Path(directory)
        self.max_count = max_count
        self.max_age_s = max_age_s
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, image_id: str) -> Path | None:
        """Where image ``image_id`` lives, or None if the id is not one we could have issued."""
        if not IMAGE_ID.fullmatch(image_id):  # not match(): "$" also matches before a trailing "\n"
            return None
        return self.directory / f"{image_id}.png"

    def save(self, image_id: str, png: bytes) -> Path:
        """Write atomically (temp file + rename), so a reader never sees half an image."""
        path = self.path_for(image_id)
        if path is None:
            raise ValueError(f"invalid image id {image_id!r}")
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(png)
        os.replace(tmp, path)
        return path

    def prune(self, now: float | None = None) -> int:
        """Delete images older than max_age_s, then the oldest beyond max_count; returns how many."""
        now = time.time() if now is None else now
        entries = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".png") and entry.is_file():
                try:
                    entries.append((entry.stat().st_mtime, entry.path))
                except FileNotFoundError:
                    continue
        entries.sort()
        too_old = [p for mtime, p in entries if now - mtime > self.max_age_s]
        remaining = len(entries) - len(too_old)
        excess = [p for _, p in entries[len(too_old):len(too_old) + max(0, remaining - self.max_count)]]
        removed = 0
        for path in too_old + excess:
            try:
                os.remove(path)
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            log.info("pruned %d images from %s", removed, self.directory)
        return removed
