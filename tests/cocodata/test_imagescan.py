"""A PNG checked by its chunks (not inflated) gives what mmdet's own decoding gives: the same size, or a refusal.

The expectation for each file comes from ``mmcv.imfrombytes``, the loader training uses, not from the check.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import mmcv
import numpy as np
import pytest

from cocodata.imagescan import decode_file


def encoded(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()


def flipped(data: bytes) -> bytes:
    broken = bytearray(data)
    broken[len(data) // 2] ^= 0xFF  # inside the pixel data: its chunk's CRC no longer holds
    return bytes(broken)


PIXELS = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
FILES: dict[str, Callable[[], bytes]] = {
    "whole": lambda: encoded(PIXELS),
    "cut to a third": lambda: encoded(PIXELS)[: len(encoded(PIXELS)) // 3],
    "cut before its end chunk": lambda: encoded(PIXELS)[:-12],
    "one byte short": lambda: encoded(PIXELS)[:-1],
    "a byte flipped": lambda: flipped(encoded(PIXELS)),
    "grayscale": lambda: encoded(PIXELS[:, :, 0]),
    "16-bit": lambda: encoded(PIXELS.astype(np.uint16) * 257),
    "alpha": lambda: encoded(np.dstack([PIXELS, PIXELS[:, :, :1]])),
}


@pytest.mark.parametrize("name", FILES)
def test_a_png_is_refused_or_sized_exactly_as_mmcv_decodes_it(name: str, tmp_path: Path) -> None:
    data = FILES[name]()
    path = tmp_path / "image.png"
    path.write_bytes(data)
    image = mmcv.imfrombytes(data)
    outcome = decode_file(path)
    if image is None:
        assert outcome.error is not None
    else:
        assert (outcome.error, outcome.height, outcome.width) == (None, *image.shape[:2])
