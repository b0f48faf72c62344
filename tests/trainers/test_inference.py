"""Inference speed: the timing helper, and the FPS a trial reports after its last epoch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FASTER_BASE, tiny_point

from cocodata.dataset import Dataset
from mmconfigs.build import load_config
from spaces.objectives import FPS_METRIC
from trainers.checkpoint import TRIAL_CONFIG, trusted_checkpoint_globals
from trainers.inference import measure_fps, timed_inference
from trainers.trial import TrialSpec, run_trial

CALL_S = 0.05
"""What one fake inference takes: the fps of fake models is at most 1 / CALL_S."""


class _Model:
    """Records the batches it is given and the mode it was in."""

    def __init__(self) -> None:
        self.training = True
        self.calls: list[tuple[Any, bool]] = []

    def train(self, mode: bool = True) -> None:
        self.training = mode

    def eval(self) -> None:
        self.training = False

    def test_step(self, batch: Any) -> list[Any]:
        self.calls.append((batch, self.training))
        time.sleep(CALL_S)
        return [batch]


def _slow(x: int) -> int:
    time.sleep(CALL_S)
    return x * 10


def test_warmup_calls_are_run_but_not_returned() -> None:
    seen: list[int] = []
    fps, outputs = timed_inference(lambda x: seen.append(x) or _slow(x), [1, 2, 3, 4], warmup=2)
    assert seen == [1, 2, 3, 4] and outputs == [30, 40]
    assert 0.2 / CALL_S < fps <= 1 / CALL_S, "two timed calls of 50 ms: at most 20 per second"


def test_nothing_left_to_time_is_an_error() -> None:
    with pytest.raises(ValueError, match="more than warmup=2"):
        timed_inference(lambda x: x, [1, 2], warmup=2)


def test_measure_fps_runs_batch_one_in_eval_mode_and_restores_training() -> None:
    model = _Model()
    dataset = [{"inputs": i} for i in range(5)]
    assert 0.2 / CALL_S < measure_fps(model, dataset, warmup=2, images=3) <= 1 / CALL_S

    assert model.training, "training mode is restored"
    assert [(batch["inputs"], training) for batch, training in model.calls] == [
        ([0], False), ([1], False), ([2], False), ([3], False), ([4], False)]


def test_small_val_sets_are_cycled_so_every_trial_times_the_same_number_of_calls() -> None:
    model = _Model()
    measure_fps(model, [{"inputs": 0}, {"inputs": 1}], warmup=2, images=5)
    assert [batch["inputs"] for batch, _ in model.calls] == [[0], [1], [0], [1], [0], [1], [0]]


@pytest.mark.slow
def test_trial_reports_fps_with_its_last_epoch(synth: Dataset, work_dir: Path) -> None:
    from mmdet.apis import inference_detector, init_detector

    rows = run_trial(TrialSpec(base=FASTER_BASE, dataset=synth, point=tiny_point(epochs=1), work_dir=work_dir))

    # The same model timed here with mmdet's own API: image loading included, so a little slower at most.
    checkpoint = next(work_dir.rglob("epoch_1.pth"))
    with trusted_checkpoint_globals():  # the trial's own checkpoint, with its message-hub state
        model = init_detector(load_config(work_dir / TRIAL_CONFIG), str(checkpoint), device="cpu")
    images = sorted((synth.root / synth.images).glob("*"))[:8]
    inference_detector(model, str(images[0]))
    start = time.perf_counter()
    for image in images:
        inference_detector(model, str(image))
    independent = len(images) / (time.perf_counter() - start)
    assert independent / 5 < rows[-1][FPS_METRIC] < independent * 5, (rows[-1][FPS_METRIC], independent)
