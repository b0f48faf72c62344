"""Decodes every image of a dataset as training will, in parallel, remembering the result per file.

Each file is decoded the way mmdet's ``LoadImageFromFile`` reads it with its defaults (``mmcv.imfrombytes``,
``color_type='color'``, the cv2 backend): ``cv2.imdecode(..., IMREAD_COLOR)``, which applies the EXIF orientation
and turns grayscale, alpha, CMYK and 16-bit images into 8-bit BGR. So an image decodes here exactly when it
decodes in a trial, and the size found is the size the pipeline sees. A truncated file does not decode.

The outcome of each file is cached in the user's cache folder (never in the dataset, which may be read-only or
shared), keyed by the file's size and modification time: a second check of an unchanged dataset decodes nothing.
A PNG is checked by its chunks and their CRCs instead of inflated (:func:`_png_outcome`): a fraction of the cost.
cv2 releases the GIL while it decodes, so threads use every core without the start-up cost of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from spaces.usercache import cache_dir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UNDECODABLE = "does not decode (truncated, or not an image)"
CHUNK = 64
"""Files per task: large enough to keep the pool's overhead small, small enough for a live progress bar."""


@dataclass(frozen=True)
class Decoded:
    """What decoding one file gave: its size as the pipeline sees it, or why it can't be read."""

    width: int = 0
    height: int = 0
    error: str | None = None


def decode_file(path: Path) -> Decoded:
    """Reads and decodes one image as mmdet's loader does (a PNG: checks what would stop that decoding)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Decoded(error="missing")
    except OSError as error:
        return Decoded(error=f"unreadable ({error.strerror})")
    if not data:
        return Decoded(error="empty file (0 bytes)")
    if data.startswith(PNG_SIGNATURE):
        checked = _png_outcome(data)
        if checked is not None:
            return checked
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        return Decoded(error=_UNDECODABLE)
    height, width = image.shape[:2]
    return Decoded(width=int(width), height=int(height))


def _png_outcome(data: bytes) -> Decoded | None:
    """A PNG's outcome from its chunks, without inflating its pixels (the slow part of decoding it).

    libpng, under cv2, refuses a PNG whose critical chunk is cut short or fails its CRC, or that ends before IEND;
    otherwise its size is IHDR's, and cv2 turns any bit depth or channel count into 8-bit BGR. So walking the
    chunks and checking their CRCs finds what a full decode finds, at a fraction of its cost. None (decode it
    in full) for a PNG carrying EXIF (``eXIf``), whose orientation cv2 applies.
    """
    position, size = len(PNG_SIGNATURE), (0, 0)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        end = position + 12 + length
        if end > len(data):
            return Decoded(error=_UNDECODABLE)
        body = data[position + 4:end - 4]
        if kind[0:1].isupper() and zlib.crc32(body) != struct.unpack(">I", data[end - 4:end])[0]:
            return Decoded(error=_UNDECODABLE)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[4:12])
        elif kind == b"eXIf":
            return None
        elif kind == b"IEND":
            return Decoded(width=size[0], height=size[1]) if size[0] and size[1] else Decoded(error=_UNDECODABLE)
        position = end
    return Decoded(error=_UNDECODABLE)


@dataclass(frozen=True)
class Scan:
    """Every named file's outcome, and how many were decoded now rather than found in the cache."""

    files: dict[str, Decoded]
    decoded_now: int


def scan_images(image_dir: Path, names: Sequence[str], *, workers: int | None = None,
                progress: TextIO | None = None) -> Scan:
    """Decodes each named file under ``image_dir`` (names as the annotation file gives them).

    Args:
        image_dir: The dataset's image folder.
        names: File names relative to it; each is decoded once however often it is named.
        workers: Threads decoding at once (default: the CPUs this process may use).
        progress: Where to draw a progress bar (a terminal), or None for none.

    Returns:
        File name -> what decoding it gave, and how many files were decoded now.
    """
    cache = _Cache(image_dir)
    results: dict[str, Decoded] = {}
    todo: list[tuple[str, tuple[int, int] | None]] = []
    for name in dict.fromkeys(names):
        key = _stat_key(image_dir / name)
        known = cache.get(name, key)
        if key is None:
            results[name] = Decoded(error="missing")
        elif known is not None:
            results[name] = known
        else:
            todo.append((name, key))
    chunks = [todo[start:start + CHUNK] for start in range(0, len(todo), CHUNK)]
    with _bar(progress, len(todo)) as advance, ThreadPoolExecutor(workers or _cpus()) as pool:
        for chunk, decoded in zip(chunks, pool.map(lambda c: [decode_file(image_dir / n) for n, _ in c], chunks),
                                  strict=True):
            for (name, key), outcome in zip(chunk, decoded, strict=True):
                results[name] = outcome
                if key is not None and outcome.error != "missing":
                    cache.put(name, key, outcome)
            advance(len(chunk))
    if todo:
        cache.save()
    return Scan(files=results, decoded_now=len(todo))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


class _Cache:
    """One JSON file per image folder: name -> [size, mtime_ns, width, height, error]."""

    def __init__(self, image_dir: Path) -> None:
        digest = hashlib.sha256(str(image_dir.resolve()).encode()).hexdigest()[:24]
        self.path = cache_dir() / "imagescan" / f"{digest}.json"
        self.entries: dict[str, list[Any]] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self.entries = loaded

    def get(self, name: str, key: tuple[int, int] | None) -> Decoded | None:
        entry = self.entries.get(name)
        if key is None or not isinstance(entry, list) or len(entry) != 5 or tuple(entry[:2]) != key:
            return None
        return Decoded(width=entry[2], height=entry[3], error=entry[4])

    def put(self, name: str, key: tuple[int, int], decoded: Decoded) -> None:
        self.entries[name] = [*key, decoded.width, decoded.height, decoded.error]

    def save(self) -> None:
        """Replaces the file atomically: a check running beside this one reads the old or the new, never half."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, staged = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(handle, "w") as file:
            json.dump(self.entries, file, separators=(",", ":"))
        os.replace(staged, self.path)


@contextlib.contextmanager
def _bar(stream: TextIO | None, total: int) -> Iterator[Any]:
    """A one-line progress bar on ``stream``; a no-op without one or with nothing to decode."""
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if stream is not None and total:
            filled = 30 * done // total
            stream.write(f"\rchecking images [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
            stream.flush()

    yield advance
    if stream is not None and total:
        stream.write("\n")
        stream.flush()


def terminal() -> TextIO | None:
    """stderr when it is a terminal (a progress bar there), else None (logs stay free of carriage returns)."""
    return sys.stderr if sys.stderr.isatty() else None
