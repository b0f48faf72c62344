"""An mmengine Runner that keeps to itself: unique global names, its own log file, cleaned up afterwards.

mmengine keeps process-global singletons (MessageHub, Visualizer, MMLogger, DefaultScope) keyed by the
experiment name, which by default is a timestamp to the second; Ray reuses actor processes, so two trials
in one process would share them. Each trial gets a unique name, and :func:`release_globals` drops exactly
that trial's instances afterwards (mmengine's own ``RunnerTestCase.tearDown`` clears the same four). The
Runner appends a timestamp to the name it is given, so instances are found by that name as a prefix.
"""

from __future__ import annotations

from typing import Any

from mmengine.config import Config
from mmengine.logging import MessageHub, MMLogger
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from mmengine.utils import ManagerMixin
from mmengine.visualization import Visualizer

from trainers.checkpoint import trusted_checkpoint_globals


class TrialRunner(Runner):
    """A Runner that resumes from its own checkpoints under torch's weights-only loading."""

    def load_or_resume(self) -> None:
        with trusted_checkpoint_globals():
            super().load_or_resume()


def build_runner(cfg: Config) -> TrialRunner:
    """Builds the Runner; ``cfg.experiment_name`` must be unique to this trial run."""
    return TrialRunner.from_cfg(cfg)


def release_globals(experiment_name: str) -> None:
    """Closes the trial's log files and forgets every singleton created under its name."""
    for manager in (MMLogger, Visualizer, MessageHub, DefaultScope):
        instances = _instances(manager)
        for name in [n for n in instances if n.startswith(experiment_name)]:
            _close(instances.pop(name))


def _instances(manager: type[ManagerMixin]) -> dict[str, Any]:
    """The live instances of one of mmengine's singleton classes, by name.

    mmengine offers no public way to forget an instance (``ManagerMixin`` only creates and looks them up); its own
    ``RunnerTestCase.tearDown`` clears this private dict too. This is the one place that reads it;
    tests/trainers/test_runner.py fails if mmengine changes it.
    """
    return manager._instance_dict


def _close(instance: Any) -> None:
    if isinstance(instance, MMLogger):
        for handler in list(instance.handlers):
            handler.close()
            instance.removeHandler(handler)
    elif isinstance(instance, Visualizer):
        instance.close()
