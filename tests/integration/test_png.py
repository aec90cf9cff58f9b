"""gpu_worker.model.png: the striped PNG encoder gives standard PNGs whose pixels are exactly the input."""

from __future__ import annotations

import io
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest

from gpu_worker.model import png


def decode(data: bytes) -> np.ndarray:
    image = PIL.Image.open(io.BytesIO(data))
    image.load()  # checks every chunk's CRC and the zlib stream's Adler-32
    return np.asarray(image)


@pytest.fixture(scope="module")
def stripe_threads():
    with ThreadPoolExecutor(4) as executor:
        yield executor


@pytest.mark.parametrize("shape", [(1, 1, 3), (37, 53, 3), (64, 64), (33, 17, 4), (300, 200, 3)])
@pytest.mark.parametrize("stripes", [1, 3, 4])
def test_pixels_round_trip_exactly(shape, stripes, stripe_threads, monkeypatch):
    monkeypatch.setattr(png, "MIN_STRIPE_BYTES", 1)  # stripe even small images
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    data = png.encode_png(pixels, stripe_threads, stripes=stripes)
    assert data.startswith(png.PNG_SIGNATURE)
    np.testing.assert_array_equal(decode(data), pixels)


def test_a_pil_image_encodes_like_its_array(stripe_threads):
    pixels = np.random.default_rng(1).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    assert png.encode_png(image) == png.encode_png(pixels)
    np.testing.assert_array_equal(decode(png.encode_png(image, stripe_threads, stripes=4)), pixels)


def test_stripes_split_the_stream_but_not_the_pixels(stripe_threads, monkeypatch):
    monkeypatch.setattr(png, "MIN_STRIPE_BYTES", 1)
    gradient = np.add.outer(np.arange(256), np.arange(256)).astype(np.uint8)
    pixels = np.stack([gradient, gradient.T, gradient // 2], axis=-1)
    serial = png.encode_png(pixels)
    striped = png.encode_png(pixels, stripe_threads, stripes=4)
    assert serial != striped  # the sync flushes between stripes are in the stream
    np.testing.assert_array_equal(decode(striped), decode(serial))
    # The Up filter makes a smooth image compress well: far below its raw size.
    assert len(striped) < pixels.nbytes / 4


def test_the_zlib_stream_is_one_valid_stream(stripe_threads, monkeypatch):
    monkeypatch.setattr(png, "MIN_STRIPE_BYTES", 1)
    pixels = np.random.default_rng(2).integers(0, 256, size=(20, 10, 3), dtype=np.uint8)
    data = png.encode_png(pixels, stripe_threads, stripes=5)
    length = int.from_bytes(data[33:37], "big")
    assert data[37:41] == b"IDAT"
    raw = zlib.decompress(data[41:41 + length])  # raises on a bad Adler-32 or a broken stream
    assert raw == png.filtered_rows(pixels).tobytes()


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), dtype=np.float32), np.zeros((4, 4, 2), dtype=np.uint8),
                                 np.zeros((0, 4, 3), dtype=np.uint8)])
def test_unsupported_input_is_refused(bad):
    with pytest.raises(ValueError):
        png.encode_png(bad)


def test_a_palette_image_is_refused_rather_than_written_as_indices():
    with pytest.raises(ValueError, match="convert it to RGB"):
        png.encode_png(PIL.Image.new("P", (4, 4)))


@pytest.mark.parametrize("split", [0, 1, 5, 65520, 65521, 65522, 200_000, 300_000])
def test_adler32_combine_gives_the_checksum_of_the_concatenation(split):
    data = np.random.default_rng(split).integers(0, 256, size=300_000, dtype=np.uint8).tobytes()
    first, second = data[:split], data[split:]
    assert png.adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second)) == zlib.adler32(data)


def test_a_stripe_of_filtered_rows_is_that_slice_of_the_whole():
    pixels = np.random.default_rng(3).integers(0, 256, size=(30, 7, 3), dtype=np.uint8)
    whole = png.filtered_rows(pixels)
    for first, end in [(0, 1), (0, 30), (1, 2), (10, 20), (29, 30)]:
        np.testing.assert_array_equal(png.filtered_rows(pixels, first, end), whole[first:end])


def test_the_calling_thread_compresses_one_stripe_itself(monkeypatch):
    """With n stripes the executor gets n - 1: the caller would otherwise only wait."""
    monkeypatch.setattr(png, "MIN_STRIPE_BYTES", 1)
    pixels = np.random.default_rng(4).integers(0, 256, size=(40, 10, 3), dtype=np.uint8)

    class CountingExecutor(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args, **kwargs):
            CountingExecutor.submitted += 1
            return super().submit(*args, **kwargs)

    with CountingExecutor(2) as executor:
        np.testing.assert_array_equal(decode(png.encode_png(pixels, executor, stripes=4)), pixels)
    assert CountingExecutor.submitted == 3
