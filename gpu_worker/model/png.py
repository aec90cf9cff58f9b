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
  valid zlib stream (Adler-32 of all the data at the end, combined from the stripes' own). isal
  and numpy release the GIL, so the stripes filter, compress and checksum in parallel threads.

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
# Below this a stripe's thread hand-off costs more than it saves. On H200 hosts (16 cores; bench.png,
# docs/benchmarks/serving-ab-h200-j.json) a 512x512 noise image (786 KB filtered) took 1.3-1.8 ms in
# one stripe and 1.5-1.9 in 6, a smooth one 0.3-0.4 against 0.7-0.95; a 1024x1024 noise image
# 5.4-5.7 ms in one, 3.6-4.6 in 6, 4.6-5.0 in 14. 512 KiB: one stripe at 512x512, six at 1024x1024.
MIN_STRIPE_BYTES = 512 * 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    return b"".join(_chunk_pieces(kind, [data]))


def _chunk_pieces(kind: bytes, pieces: list[bytes]) -> list[bytes]:
    """A PNG chunk of ``pieces`` concatenated, as pieces to join (its length, type, data, CRC-32)."""
    crc = isal_zlib.crc32(kind)
    for piece in pieces:
        crc = isal_zlib.crc32(piece, crc)
    return [struct.pack(">I", sum(len(piece) for piece in pieces)), kind, *pieces, struct.pack(">I", crc)]


def filtered_rows(pixels: np.ndarray, first_row: int = 0, end_row: int | None = None) -> np.ndarray:
    """(rows, 1 + width * channels) uint8 of rows first_row..end_row (all by default): each row
    prefixed by filter type Up, minus the row above (the image's first row: minus nothing)."""
    height = pixels.shape[0]
    end_row = height if end_row is None else end_row
    flat = pixels.reshape(height, -1)
    out = np.empty((end_row - first_row, flat.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = FILTER_UP
    if first_row == 0:
        out[0, 1:] = flat[0]
    above = max(first_row, 1)  # the first row not copied as it is
    np.subtract(flat[above:end_row], flat[above - 1:end_row - 1], out=out[above - first_row:, 1:],
                dtype=np.uint8, casting="unsafe")
    return out


def _compressed_stripe(pixels: np.ndarray, first_row: int, end_row: int, level: int,
                       last: bool) -> tuple[bytes, int, int]:
    """One stripe of rows, filtered and deflated, with its Adler-32 and its filtered length: each
    stripe does all of its own work (numpy and ISA-L release the GIL), the caller only joins."""
    data = memoryview(filtered_rows(pixels, first_row, end_row).reshape(-1))
    compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)  # raw deflate: the header is written once
    compressed = compressor.compress(data) + compressor.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH)
    return compressed, isal_zlib.adler32(data), len(data)


ADLER_MODULUS = 65521


def adler32_combine(adler_first: int, adler_second: int, second_length: int) -> int:
    """The Adler-32 of two byte strings concatenated, from theirs and the second's length (zlib's
    adler32_combine, which python-isal does not expose): the stripes checksum in parallel."""
    remainder = second_length % ADLER_MODULUS
    sum_first = adler_first & 0xFFFF
    sum_second = (remainder * sum_first) % ADLER_MODULUS
    sum_first = (sum_first + (adler_second & 0xFFFF) + ADLER_MODULUS - 1) % ADLER_MODULUS
    sum_second = (sum_second + (adler_first >> 16) + (adler_second >> 16) + ADLER_MODULUS - remainder) % ADLER_MODULUS
    return sum_first | (sum_second << 16)


def encode_png(image: Any, executor: Executor | None = None, stripes: int = 1, level: int = 1) -> bytes:
    """PNG bytes of a PIL image or a (height, width[, channels]) uint8 array.

    stripes > 1 with an executor compresses that many stripes of rows in parallel: the executor
    takes all but the last, which the calling thread compresses meanwhile (one thread hand-off
    less on a lone image's path). level: ISA-L's compression level, 0-3 (the worker uses 1: at 0
    the files of noise-like images grow by a quarter and it is no faster). PIL images must be in
    mode L, RGB or RGBA (convert others first: a palette image's array holds indices, not colours).
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
    pixels = np.ascontiguousarray(pixels)
    filtered_bytes = height * (1 + width * channels)
    stripes = max(1, min(stripes, height, filtered_bytes // MIN_STRIPE_BYTES or 1)) if executor is not None else 1
    rows_per_stripe = -(-height // stripes)
    bounds = [(start, min(height, start + rows_per_stripe)) for start in range(0, height, rows_per_stripe)]
    *others, (last_first, last_end) = bounds
    started = [executor.submit(_compressed_stripe, pixels, first, end, level, False) for first, end in others]
    last_part = _compressed_stripe(pixels, last_first, last_end, level, True)
    parts = [future.result() for future in started] + [last_part]
    checksum = parts[0][1]
    for _, stripe_adler, stripe_length in parts[1:]:
        checksum = adler32_combine(checksum, stripe_adler, stripe_length)
    header = bytes([0x78, 0x01])  # deflate, 32 KiB window, no preset dictionary, "fastest" level hint
    stream = [header, *(compressed for compressed, _, _ in parts), struct.pack(">I", checksum)]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[channels], 0, 0, 0)
    # One join copies the compressed image once; building the IDAT chunk and then the file by
    # concatenation copied it several times: 11% of a 1024x1024 noise image's encoding (0.38 of
    # 3.08 ms on the CI machine, bench/png.py), more where the copies touch fresh pages.
    return b"".join([PNG_SIGNATURE, _chunk(b"IHDR", ihdr), *_chunk_pieces(b"IDAT", stream), _chunk(b"IEND", b"")])
