"""Inference speed: frames per second at batch 1, after warm-up, on the device the model is on.

The log's "Inf time (fps)" column. A trial measures it on its validation images after its first epoch (so a
trial ASHA stops early has one too) and after its last; ``dettune predict`` measures it on the user's images.
Both time the model's whole test step (preprocessing, forward, box post-processing) and leave data loading
out, as mmdet's own benchmark tool does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from mmengine.dataset import pseudo_collate

WARMUP_IMAGES = 2
TIMED_IMAGES = 20

Item = TypeVar("Item")
Output = TypeVar("Output")


def timed_inference(infer: Callable[[Item], Output], inputs: Sequence[Item], *, warmup: int
                    ) -> tuple[float, list[Output]]:
    """Runs ``infer`` on every input, timing all but the first ``warmup`` calls.

    Args:
        infer: One batch-1 inference.
        inputs: The warm-up inputs first, then the timed ones.
        warmup: How many leading inputs only warm up (allocator, kernels, caches).

    Returns:
        The timed calls per second, and the timed calls' outputs in order.

    Raises:
        ValueError: If no input is left to time.
    """
    if len(inputs) <= warmup:
        raise ValueError(f"got {len(inputs)} inputs, but must have more than warmup={warmup} to time any")
    with torch.no_grad():
        for item in inputs[:warmup]:
            infer(item)
        _synchronize()
        start = time.perf_counter()
        outputs = [infer(item) for item in inputs[warmup:]]
        _synchronize()
        elapsed = time.perf_counter() - start
    return len(outputs) / elapsed, outputs


def fps_settings(device: str) -> dict[str, str]:
    """How a trial measures ``inference/fps`` (logged as params, so two FPS figures can be compared)."""
    return {"inference.batch_size": "1", "inference.warmup": str(WARMUP_IMAGES),
            "inference.images": str(TIMED_IMAGES), "inference.device": device}


def measure_fps(model: Any, dataset: Any, *, warmup: int = WARMUP_IMAGES, images: int = TIMED_IMAGES) -> float:
    """Frames per second of ``model.test_step`` on ``images`` items of ``dataset``, one at a time.

    Args:
        model: An mmengine model (or its DDP wrapper); it is put in eval mode and restored afterwards.
        dataset: The validation dataset; items are loaded before the clock starts. A small dataset is cycled
            through, so every trial times the same number of calls.
        warmup: Untimed calls first.
        images: Timed calls.
    """
    batches = [pseudo_collate([dataset[i % len(dataset)]]) for i in range(warmup + images)]
    was_training = model.training
    model.eval()
    try:
        fps, _ = timed_inference(model.test_step, batches, warmup=warmup)
    finally:
        model.train(was_training)
    return fps


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
