"""Loading checkpoints under torch >= 2.6, whose ``torch.load`` defaults to ``weights_only=True``.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; its checkpoints carry a few Python and numpy
objects beside the tensors: the MessageHub's history buffers (whose statistics methods pickle through
``getattr``) and numpy arrays and scalars. Resuming a trial from a checkpoint it wrote itself runs under an
allow-list of exactly those globals. Files from elsewhere (a ``pretrained:`` backbone) keep torch's default,
tensors only: ``getattr`` is not safe for untrusted files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

CHECKPOINT_FILE = "checkpoint.pth"  # the file name of a trial checkpoint in Ray storage and in an export
TRIAL_CONFIG = "config.py"  # the trial's exact mmdet config, beside its checkpoint in Ray storage and an export


def _numpy_globals() -> list[Any]:
    multiarray = np._core.multiarray  # type: ignore[attr-defined]
    dtype_classes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtype_classes]


@contextlib.contextmanager
def trusted_checkpoint_globals() -> Iterator[None]:
    """Within this block ``torch.load`` accepts the checkpoints dettune's own trials write."""
    with torch.serialization.safe_globals([HistoryBuffer, getattr, *_numpy_globals()]):
        yield


def load_checkpoint(path: Path) -> dict[str, object]:
    """Reads a checkpoint a dettune trial wrote (for tests, export and inference)."""
    with trusted_checkpoint_globals():
        return torch.load(path, map_location="cpu")
