"""The thread that delivers the driver's MLflow writes: order, retries, and a bug that must not vanish."""

from __future__ import annotations

import pytest

from search.writer import OrderedWriter


def test_writes_land_in_order_and_a_failing_one_is_retried_first() -> None:
    landed: list[int] = []
    failures = iter([OSError("connection refused")] * 2)

    def flaky() -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        landed.append(2)

    writer = OrderedWriter(retry_every_s=0.01)
    writer.put(lambda: landed.append(1), flaky, lambda: landed.append(3))

    assert writer.wait_delivered(timeout_s=30)
    assert landed == [1, 2, 3] and writer.down_for() == 0.0


def test_a_write_that_fails_with_a_bug_is_raised_in_the_callers_next_call() -> None:
    writer = OrderedWriter(retry_every_s=0.01)
    writer.put(lambda: [][1])  # an IndexError: no outage to wait out

    with pytest.raises(IndexError):
        writer.wait_delivered(timeout_s=30)
    with pytest.raises(IndexError):
        writer.put(lambda: None)
