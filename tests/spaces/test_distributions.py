"""Distributions: JSON round trips, Ray Tune and Optuna equivalents, and the rule messages."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray.tune.search.sample import Categorical, Float, Integer, Quantized

from spaces.distributions import (
    Choice,
    DistributionError,
    Grid,
    LogUniform,
    QUniform,
    RandInt,
    Uniform,
    decode_optuna_value,
    distribution_from_json,
    encode_choice,
    parse_distribution,
)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-8, max_value=1e6, allow_nan=False, allow_infinity=False)


def ordered(numbers: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, Any]]:
    """Pairs (low, high) with low < high."""
    return st.tuples(numbers, numbers).filter(lambda pair: pair[0] != pair[1]).map(sorted).map(tuple)


scalars = st.none() | st.booleans() | st.integers() | finite | st.text(max_size=8)
scales = st.lists(st.integers(32, 4096), min_size=2, max_size=2)
json_values = scalars | scales | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=3), scalars)
choice_lists = st.lists(json_values, min_size=1, max_size=6, unique_by=encode_choice)


def sampler_name(domain: Any) -> str:
    return type(domain.get_sampler()).__name__


def assert_round_trip(dist: Any) -> None:
    assert parse_distribution(dist.to_json()) == dist
    assert distribution_from_json(dist.to_json()) == dist


@given(ordered(finite))
def test_uniform(bounds: tuple[float, float]) -> None:
    low, high = bounds
    dist = parse_distribution({"uniform": [low, high]})
    assert dist == Uniform(low=low, high=high)
    assert_round_trip(dist)
    domain = dist.to_tune()
    assert isinstance(domain, Float)
    assert (domain.lower, domain.upper, sampler_name(domain)) == (low, high, "_Uniform")
    assert dist.to_optuna() == FloatDistribution(low, high)


@given(ordered(positive))
def test_loguniform(bounds: tuple[float, float]) -> None:
    low, high = bounds
    dist = parse_distribution({"loguniform": [low, high]})
    assert dist == LogUniform(low=low, high=high)
    assert_round_trip(dist)
    domain = dist.to_tune()
    assert isinstance(domain, Float)
    assert (domain.lower, domain.upper, sampler_name(domain)) == (low, high, "_LogUniform")
    assert dist.to_optuna() == FloatDistribution(low, high, log=True)


@given(ordered(st.integers(-10**6, 10**6)))
def test_randint(bounds: tuple[int, int]) -> None:
    low, high = bounds
    dist = parse_distribution({"randint": [low, high]})
    assert dist == RandInt(low=low, high=high)
    assert_round_trip(dist)
    domain = dist.to_tune()
    assert isinstance(domain, Integer)
    assert (domain.lower, domain.upper, sampler_name(domain)) == (low, high, "_Uniform")
    assert dist.to_optuna() == IntDistribution(low, high - 1)  # Optuna's high is inclusive


@given(
    st.sampled_from(["0.01", "0.05", "0.1", "0.25", "0.5", "1", "2", "5"]),
    st.integers(-1000, 1000),
    st.integers(1, 1000),
)
def test_quniform(q_text: str, start: int, steps: int) -> None:
    q = float(q_text)
    low, high = float(start * Decimal(q_text)), float((start + steps) * Decimal(q_text))
    dist = parse_distribution({"quniform": [low, high, q]})
    assert dist == QUniform(low=low, high=high, q=q)
    assert_round_trip(dist)
    domain = dist.to_tune()
    assert isinstance(domain, Float)
    assert isinstance(domain.get_sampler(), Quantized)
    assert (domain.lower, domain.upper, domain.get_sampler().q) == (low, high, q)
    assert dist.to_optuna() == FloatDistribution(low, high, step=q)


def assert_optuna_categorical(dist: Choice | Grid, values: list[Any]) -> None:
    optuna_dist = dist.to_optuna()
    assert isinstance(optuna_dist, CategoricalDistribution)
    storable = None | bool | int | float | str
    assert all(isinstance(choice, storable) for choice in optuna_dist.choices)
    assert [decode_optuna_value(dist, choice) for choice in optuna_dist.choices] == values
    assert [dist.encode_optuna(value) for value in values] == list(optuna_dist.choices)


@given(choice_lists)
def test_choice(values: list[Any]) -> None:
    dist = parse_distribution({"choice": values})
    assert dist == Choice(values=values)
    assert_round_trip(dist)
    domain = dist.to_tune()
    assert isinstance(domain, Categorical)
    assert domain.categories == values
    assert_optuna_categorical(dist, values)


@given(choice_lists)
def test_grid(values: list[Any]) -> None:
    dist = parse_distribution({"grid": values})
    assert dist == Grid(values=values)
    assert_round_trip(dist)
    assert dist.to_tune() == {"grid_search": values}
    assert_optuna_categorical(dist, values)


def test_list_choices_are_json_text_for_optuna() -> None:
    dist = parse_distribution({"choice": [[800, 800], [512, 512], "[800, 800]x"]})
    assert dist.to_optuna().choices == ("[800, 800]", "[512, 512]", "[800, 800]x")
    assert decode_optuna_value(dist, "[512, 512]") == [512, 512]
    assert decode_optuna_value(dist, "[800, 800]x") == "[800, 800]x"


def test_tuples_parse_as_lists() -> None:
    assert parse_distribution({"choice": ((800, 800),)}) == Choice(values=[[800, 800]])


def test_numeric_strings_are_numbers() -> None:
    # PyYAML reads 1e-4 (no dot) as a string.
    assert parse_distribution({"loguniform": ["1e-4", "1e-2"]}) == LogUniform(low=1e-4, high=1e-2)


def test_decoding_an_unknown_value_fails() -> None:
    with pytest.raises(DistributionError, match=r"'\[1, 2\]' is not one of the choice values"):
        decode_optuna_value(parse_distribution({"choice": [[3, 4]]}), "[1, 2]")


def test_other_distributions_decode_to_themselves() -> None:
    assert decode_optuna_value(parse_distribution({"randint": [1, 4]}), 3) == 3


def error(obj: Any) -> str:
    with pytest.raises(DistributionError) as caught:
        parse_distribution(obj)
    return str(caught.value)


def test_uniform_low_below_high() -> None:
    assert error({"uniform": [0.1, 0.01]}) == "uniform: low < high must hold, but got (low=0.1, high=0.01)"


def test_loguniform_low_below_high() -> None:
    assert "low < high must hold, but got (low=1.0, high=1.0)" in error({"loguniform": [1, 1]})


def test_loguniform_low_positive() -> None:
    assert error({"loguniform": [0, 1]}) == "loguniform: low > 0 must hold, but got (low=0.0, high=1.0)"


def test_randint_low_below_high() -> None:
    assert "low < high must hold (high is excluded), but got (low=3, high=3)" in error({"randint": [3, 3]})


def test_randint_whole_numbers() -> None:
    assert error({"randint": [1.5, 3]}) == "randint: low must be a whole number, but got 1.5"


def test_quniform_q_positive() -> None:
    assert error({"quniform": [0, 1, 0]}) == "quniform: q > 0 must hold, but got (q=0.0)"


def test_quniform_bounds_multiples_of_q() -> None:
    assert error({"quniform": [0.05, 1, 0.1]}) == (
        "quniform: low and high must be multiples of q, but got (low=0.05, high=1.0, q=0.1)"
    )


def test_quniform_low_below_high() -> None:
    assert "low < high must hold, but got (low=1.0, high=0.0)" in error({"quniform": [1, 0, 0.5]})


@pytest.mark.parametrize("kind", ["choice", "grid"])
def test_categorical_not_empty(kind: str) -> None:
    assert error({kind: []}) == f"{kind}: values must not be empty, but got []"


@pytest.mark.parametrize("kind", ["choice", "grid"])
def test_categorical_no_duplicates(kind: str) -> None:
    assert error({kind: ["r50", "r101", "r50"]}) == f"{kind}: values must be distinct, but got 'r50' twice"
    assert "[512, 512] twice" in error({kind: [[512, 512], [512, 512]]})


def test_choices_optuna_cannot_tell_apart() -> None:
    assert "got True and 1, which Optuna can't tell apart" in error({"choice": [1, True]})
    assert "got [1, 2] and '[1, 2]'" in error({"choice": ["[1, 2]", [1, 2]]})


def test_numbers_required() -> None:
    assert error({"uniform": ["abc", 1]}) == "uniform: low must be a number, but got 'abc'"
    assert error({"uniform": [True, 1]}) == "uniform: low must be a number, but got True"
    assert error({"uniform": [0, float("inf")]}) == "uniform: high must be finite, but got inf"


def test_argument_count() -> None:
    assert error({"uniform": [0.1]}) == "uniform takes [low, high], but got [0.1]"
    assert error({"quniform": [0, 1]}) == "quniform takes [low, high, q], but got [0, 1]"
    assert error({"choice": "r50"}) == "choice takes a list of values [a, b, ...], but got 'r50'"


def test_unknown_kind_suggests_the_closest() -> None:
    assert error({"unifrom": [0, 1]}).startswith("unknown distribution 'unifrom': did you mean 'uniform'?")


def test_one_key_mapping_required() -> None:
    assert "but got 0.1; to fix a knob to one value, put it under fixed" in error(0.1)
    assert "a distribution is a one-key mapping" in error({"uniform": [0, 1], "choice": [1]})
