"""PNG encoding with ISA-L's deflate, split across threads: a lone image's PNG is a small part of its latency.

A PNG's pixels are one zlib stream, which PIL compresses with zlib on one core: ~0.14-0.23 s for a
1024x1024 image on the GPU machines, 10-20% of a lone SDXL request once the GPU part is fast. Two
things make it a few milliseconds:

* the deflate is Intel's ISA-L (the ``isal`` package, python-isal): at its level 1 it compresses
  4-10x faster than zlib's level 1, and to smaller files (512x512 on this 2-core machine: noise
  0.6 ms against 12 ms, a smooth image 1.7 ms / 435 KB against 7.4 ms / 478 KB); its output is
  ordinary deflate that every PNG decoder reads;
* deflate allows what pigz does: compress stripes of rows independently, end every stripe but the
  last with a sync flush (byte-aligned, no final-block bit), and concatenate; the result is one
  valid zlib stream (Adler-32 of all the data at the end). isal releases the GIL, so the stripes
  compress in parallel threads.

Rows use PNG's "Up" filter (difference to the row above), computed with numpy.

:func:`encode_png` gives a standard 8-bit RGB (or grayscale / RGBA) PNG that any decoder reads; for
one stripe it is simply a single-threaded encoder.
"""

from __future__ import annotations

import struct
from concurrent.futures import Executor
from typing import Any

import numpy as np
from isal import isal_zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grayscale, RGB, RGBA
FILTER_UP = 2
MIN_STRIPE_BYTES = 128 * 1024  # below this a stripe's thread hand-off costs more than it saves


def _chunk(kind: bytes, data: bytes) -> bytes:
    return b"".join(_chunk_pieces(kind, [data]))


def _chunk_pieces(kind: bytes, pieces: list[bytes]) -> list[bytes]:
    """A PNG chunk of ``pieces`` concatenated, as pieces to join (its length, type, data, CRC-32)."""
    crc = isal_zlib.crc32(kind)
    for piece in pieces:
        crc = isal_zlib.crc32(piece, crc)
    return [struct.pack(">I", sum(len(piece) for piece in pieces)), kind, *pieces, struct.pack(">I", crc)]


def filtered_rows(pixels: np.ndarray) -> np.ndarray:
    """(height, 1 + width * channels) uint8: each row prefixed by filter type Up, minus the row above."""
    height = pixels.shape[0]
    flat = pixels.reshape(height, -1)
    out = np.empty((height, flat.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = FILTER_UP
    out[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=out[1:, 1:], dtype=np.uint8, casting="unsafe")
    return out


def _deflate(data: memoryview, level: int, last: bool) -> bytes:
    compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)  # raw deflate: the header is written once
    return compressor.compress(data) + compressor.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH)


def encode_png(image: Any, executor: Executor | None = None, stripes: int = 1, level: int = 1) -> bytes:
    """PNG bytes of a PIL image or a (height, width[, channels]) uint8 array.

    stripes > 1 with an executor compresses that many stripes of rows in parallel. level: ISA-L's
    compression level, 0-3 (the worker uses 1: at 0 the files of noise-like images grow by a quarter
    and it is no faster). PIL images must be in mode L, RGB or RGBA (convert others first: a palette
    image's array holds indices, not colours).
    """
    mode = getattr(image, "mode", None)
    if mode is not None and mode not in ("L", "RGB", "RGBA"):
        raise ValueError(f"cannot encode a PIL image of mode {mode}; convert it to RGB first")
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected 8-bit pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    if channels not in COLOR_TYPES or height == 0 or width == 0:
        raise ValueError(f"cannot encode an image of shape {pixels.shape}")
    raw = filtered_rows(np.ascontiguousarray(pixels))
    data = memoryview(raw.reshape(-1))
    stripes = max(1, min(stripes, height, raw.nbytes // MIN_STRIPE_BYTES or 1)) if executor is not None else 1
    rows_per_stripe = -(-height // stripes)
    row_bytes = raw.shape[1]
    bounds = [(start * row_bytes, min(height, start + rows_per_stripe) * row_bytes)
              for start in range(0, height, rows_per_stripe)]
    parts_args = [(data[begin:end], level, index == len(bounds) - 1) for index, (begin, end) in enumerate(bounds)]
    if executor is not None and len(parts_args) > 1:
        parts = list(executor.map(lambda args: _deflate(*args), parts_args))
    else:
        parts = [_deflate(*args) for args in parts_args]
    header = bytes([0x78, 0x01])  # deflate, 32 KiB window, no preset dictionary, "fastest" level hint
    stream = [header, *parts, struct.pack(">I", isal_zlib.adler32(data))]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[channels], 0, 0, 0)
    # One join copies the compressed image once; building the IDAT chunk and then the file by
    # concatenation copied it several times: 11% of a 1024x1024 noise image's encoding (0.38 of
    # 3.08 ms on the CI machine, scripts/bench_png.py), more where the copies touch fresh pages.
    return b"".join([PNG_SIGNATURE, _chunk(b"IHDR", ihdr), *_chunk_pieces(b"IDAT", stream), _chunk(b"IEND", b"")])
