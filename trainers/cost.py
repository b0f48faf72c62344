"""What a trial's model costs regardless of the machine: GFLOPs at its input scale and its parameter count.

On a shared GPU node FPS is noisy; these two are reproducible, so a limit that must hold on every rerun uses
them. FLOPs come from mmengine's ``get_model_complexity_info`` on one validation image as the trial's own
pipeline loads it (resized to the trial's scale), through the whole detector, as mmdet's ``get_flops`` counts.
"""

from __future__ import annotations

from typing import Any

import torch
from mmengine.analysis import get_model_complexity_info
from mmengine.dataset import pseudo_collate
from torch import nn

from spaces.objectives import GFLOPS_METRIC, PARAMS_METRIC


class _TensorForward(nn.Module):
    """The detector's plain tensor forward with the image's data samples bound, for the FLOP tracer."""

    def __init__(self, detector: nn.Module, data_samples: Any) -> None:
        super().__init__()
        self.detector = detector
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor) -> Any:
        return self.detector._forward(inputs, self.data_samples)  # type: ignore[operator]


def model_cost(model: Any, dataset: Any) -> dict[str, float]:
    """``model/gflops`` on the first item of ``dataset`` and ``model/params_M``, millions of parameters.

    Args:
        model: An mmdet detector (or its DDP wrapper); its train/eval mode is restored afterwards.
        dataset: The validation dataset; its first item is loaded through the trial's test pipeline.
    """
    detector: Any = model.module if hasattr(model, "module") else model
    was_training = detector.training
    detector.eval()
    try:
        with torch.no_grad():
            data = detector.data_preprocessor(pseudo_collate([dataset[0]]), False)
            info = get_model_complexity_info(_TensorForward(detector, data["data_samples"]),
                                             inputs=data["inputs"], show_table=False, show_arch=False)
    finally:
        detector.train(was_training)
    params = sum(p.numel() for p in detector.parameters())
    return {GFLOPS_METRIC: float(info["flops"]) / 1e9, PARAMS_METRIC: params / 1e6}
