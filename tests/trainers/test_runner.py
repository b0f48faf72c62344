"""Releasing mmengine's singletons after a trial, through the one function that reaches into mmengine for it."""

from __future__ import annotations

from mmengine.logging import MessageHub, MMLogger
from mmengine.registry import DefaultScope
from mmengine.visualization import Visualizer

from trainers.runner import release_globals

MANAGERS = (MMLogger, Visualizer, MessageHub, DefaultScope)


def _create(name: str) -> None:
    MMLogger.get_instance(name, logger_name=name)
    Visualizer.get_instance(name)
    MessageHub.get_instance(name)
    DefaultScope.get_instance(name, scope_name="mmdet")


def test_a_trials_singletons_are_forgotten_and_anothers_kept() -> None:
    _create("release-me_20260101_000000")  # the Runner appends a timestamp to the name it is given
    _create("keep-me")
    logger = MMLogger.get_instance("release-me_20260101_000000")
    assert logger.handlers  # mmengine gives every logger a console handler

    release_globals("release-me")

    assert [m.check_instance_created("release-me_20260101_000000") for m in MANAGERS] == [False] * 4
    assert [m.check_instance_created("keep-me") for m in MANAGERS] == [True] * 4
    assert not logger.handlers
    release_globals("keep-me")
