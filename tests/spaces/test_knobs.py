"""How every command shows a knob value: one formatter for the console, the tables, the report and messages."""

from __future__ import annotations

from typing import Any

import pytest

from spaces.knobs import show_value


@pytest.mark.parametrize(("value", "shown"), [
    # as sampled: floats to three significant digits, an integral float still a float
    (0.006871605772069692, "0.00687"), (0.02, "0.02"), (123.456, "123"), (1e-05, "1e-05"), (2.0, "2.0"),
    (160, "160"), (-1, "-1"), ("faster", "faster"), ([160, 160], "[160, 160]"), (True, "true"),
    # as MLflow gives params back: text, shown as the value it was logged from
    ("0.006871605772069692", "0.00687"), ("2.0", "2.0"), ("160", "160"), ("-1", "-1"), ("800x800", "800x800"),
    ("-", "-"),
])
def test_a_value_shows_the_same_as_sampled_and_as_logged(value: Any, shown: str) -> None:
    assert show_value(value) == shown
