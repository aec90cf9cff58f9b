"""Images for tests: a PNG of a given size, and an image's raw pixels to compare two images by."""

from __future__ import annotations

import numpy as np


def pixels(image) -> bytes:
    return np.asarray(image).tobytes()
