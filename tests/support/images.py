"""Images for tests: a PNG of a given size, and an image's raw pixels to compare two images by."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def make_png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(image) -> bytes:
    return np.asarray(image).tobytes()
