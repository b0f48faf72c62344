"""Typed search distributions, each written in YAML as a one-key mapping.

=================================  ============================  =========================================
YAML                               Ray Tune (:meth:`to_tune`)    Optuna (:meth:`to_optuna`)
=================================  ============================  =========================================
``{choice: [a, b, ...]}``          ``tune.choice``               ``CategoricalDistribution``
``{grid: [a, b, ...]}``            ``tune.grid_search``          ``CategoricalDistribution``
``{uniform: [low, high]}``         ``tune.uniform``              ``FloatDistribution(low, high)``
``{loguniform: [low, high]}``      ``tune.loguniform``           ``FloatDistribution(low, high, log=True)``
``{randint: [low, high]}``         ``tune.randint`` (high excl.) ``IntDistribution(low, high - 1)``
``{quniform: [low, high, q]}``     ``tune.quniform``             ``FloatDistribution(low, high, step=q)``
=================================  ============================  =========================================

Choice and grid values may be any JSON value, e.g. image scales ``[[800, 800], [512, 512]]``. Optuna's
``CategoricalDistribution`` only stores None, bool, int, float and str, so :meth:`Choice.to_optuna` gives
Optuna each other value as its JSON text (:func:`encode_choice`, e.g. ``"[800, 800]"``). A value Optuna
samples (``trial.params[name]``, the config dettune's searcher gives a trial) turns back into the
real value with :func:`decode_optuna_value` (for a whole point: :meth:`spaces.schema.Space.decode_optuna`).
Decoding looks the sampled value up among the encoded choices and returns the original at that index, so it
never re-parses JSON and can't confuse a string choice with a list choice. Ray Tune's own ``tune.choice`` and
``tune.grid_search`` take the real values and need no decoding.

Build a distribution with :func:`parse_distribution` (alias :func:`distribution_from_json`); it raises
:class:`DistributionError`, a ``ValueError`` whose message states the rule and the values, in Optuna's style:
``low < high must hold, but got (low=0.1, high=0.01)``.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator, model_validator

from spaces.errors import UserError

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


class DistributionError(UserError, ValueError):
    """A distribution that can't be built; the message says which rule it breaks and with which values."""


def _number(value: Any) -> float:
    """Accepts a finite int, float or numeric string (PyYAML reads ``1e-4`` as a string) as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number, but got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number, but got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be finite, but got {value!r}")
    return number


def _whole_number(value: Any) -> int:
    """Accepts an int, or a float or numeric string holding a whole number, as an int."""
    number = _number(value)
    if not number.is_integer():
        raise ValueError(f"must be a whole number, but got {value!r}")
    return int(number)


Number = Annotated[float, BeforeValidator(_number)]
WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


def encode_choice(value: Any) -> None | bool | int | float | str:
    """Returns a choice value as Optuna stores it: scalars unchanged, anything else as its JSON text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)


def _format_error(kind: str, error: ValidationError) -> str:
    """Turns pydantic's errors for a distribution into one readable line."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        text = str(item["ctx"]["error"]) if item["type"] == "value_error" else item["msg"]
        lines.append(f"{where} {text}" if where else text)
    return f"{kind}: " + "; ".join(lines)


class _Distribution(BaseModel):
    """Base class: a frozen model with the YAML form ``{kind: [args...]}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ClassVar[str]
    """The YAML key, e.g. ``uniform``."""
    usage: ClassVar[str]
    """The YAML form, shown in error messages."""

    def args(self) -> list[Any]:
        """Returns the list under the YAML key."""
        raise NotImplementedError

    def to_json(self) -> dict[str, list[Any]]:
        """Returns the one-key mapping this distribution is parsed from."""
        return {self.kind: self.args()}

    def to_tune(self) -> Any:
        """Returns the Ray Tune search-space object (a ``Domain``, or ``{"grid_search": [...]}``)."""
        raise NotImplementedError

    def to_optuna(self) -> BaseDistribution:
        """Returns the equivalent Optuna distribution."""
        raise NotImplementedError

    def decode_optuna(self, value: Any) -> Any:
        """Returns the real value for a value Optuna sampled from :meth:`to_optuna` (identity by default)."""
        return value

    @classmethod
    def from_args(cls, args: Any) -> Self:
        """Builds the distribution from the list under its YAML key.

        Raises:
            DistributionError: The list has the wrong length or a value breaks a rule.
        """
        fields = list(cls.model_fields)
        if not isinstance(args, list | tuple) or len(args) != len(fields):
            raise DistributionError(f"{cls.kind} takes {cls.usage}, but got {args!r}")
        try:
            return cls.model_validate(dict(zip(fields, args, strict=True)))
        except ValidationError as error:
            raise DistributionError(_format_error(cls.kind, error)) from None


class _Range(_Distribution):
    """A distribution over the numbers between ``low`` and ``high``."""

    low: Number
    high: Number

    def args(self) -> list[Any]:
        return [self.low, self.high]

    @model_validator(mode="after")
    def _low_below_high(self) -> Self:
        if not self.low < self.high:
            raise ValueError(f"low < high must hold, but got (low={self.low!r}, high={self.high!r})")
        return self


class Uniform(_Range):
    """Floats uniform in ``[low, high]``: ``{uniform: [low, high]}``."""

    kind: ClassVar[str] = "uniform"
    usage: ClassVar[str] = "[low, high]"

    def to_tune(self) -> Any:
        from ray import tune

        return tune.uniform(self.low, self.high)

    def to_optuna(self) -> BaseDistribution:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high)


class LogUniform(_Range):
    """Floats log-uniform in ``[low, high]``, ``low > 0``: ``{loguniform: [low, high]}``."""

    kind: ClassVar[str] = "loguniform"
    usage: ClassVar[str] = "[low, high] with 0 < low"

    @model_validator(mode="after")
    def _positive(self) -> Self:
        if not self.low > 0:
            raise ValueError(f"low > 0 must hold, but got (low={self.low!r}, high={self.high!r})")
        return self

    def to_tune(self) -> Any:
        from ray import tune

        return tune.loguniform(self.low, self.high)

    def to_optuna(self) -> BaseDistribution:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=True)


class RandInt(_Distribution):
    """Integers in ``[low, high)`` (high excluded, like ``tune.randint``): ``{randint: [low, high]}``."""

    kind: ClassVar[str] = "randint"
    usage: ClassVar[str] = "[low, high] (high excluded)"

    low: WholeNumber
    high: WholeNumber

    def args(self) -> list[Any]:
        return [self.low, self.high]

    @model_validator(mode="after")
    def _low_below_high(self) -> Self:
        if not self.low < self.high:
            raise ValueError(
                f"low < high must hold (high is excluded), but got (low={self.low!r}, high={self.high!r})"
            )
        return self

    def to_tune(self) -> Any:
        from ray import tune

        return tune.randint(self.low, self.high)

    def to_optuna(self) -> BaseDistribution:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high - 1)


def _is_multiple(value: float, q: float) -> bool:
    """Ray Tune's test that a quantized bound is a multiple of ``q``."""
    return math.isclose(value / q, round(value / q))


class QUniform(_Range):
    """Multiples of ``q`` uniform in ``[low, high]``: ``{quniform: [low, high, q]}``.

    ``low`` and ``high`` must be multiples of ``q``: Ray Tune refuses other bounds, and Optuna would silently
    lower ``high`` to the last step.
    """

    kind: ClassVar[str] = "quniform"
    usage: ClassVar[str] = "[low, high, q]"

    q: Number

    def args(self) -> list[Any]:
        return [self.low, self.high, self.q]

    @model_validator(mode="after")
    def _steps(self) -> Self:
        if not self.q > 0:
            raise ValueError(f"q > 0 must hold, but got (q={self.q!r})")
        exact_steps = (Decimal(str(self.high)) - Decimal(str(self.low))) % Decimal(str(self.q)) == 0
        if not (_is_multiple(self.low, self.q) and _is_multiple(self.high, self.q) and exact_steps):
            raise ValueError(
                "low and high must be multiples of q, "
                f"but got (low={self.low!r}, high={self.high!r}, q={self.q!r})"
            )
        return self

    def to_tune(self) -> Any:
        from ray import tune

        return tune.quniform(self.low, self.high, self.q)

    def to_optuna(self) -> BaseDistribution:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, step=self.q)


class _Categorical(_Distribution):
    """A finite list of distinct JSON values."""

    values: list[Any]

    @classmethod
    def from_args(cls, args: Any) -> Self:
        if not isinstance(args, list | tuple):
            raise DistributionError(f"{cls.kind} takes {cls.usage}, but got {args!r}")
        try:
            return cls.model_validate({"values": list(args)})
        except ValidationError as error:
            raise DistributionError(_format_error(cls.kind, error)) from None

    @field_validator("values", mode="before")
    @classmethod
    def _normalize(cls, values: Any) -> Any:
        """Keeps values as their JSON round trip (tuples become lists) so ``to_json`` parses back equal."""
        if not isinstance(values, list | tuple):
            return values
        try:
            return json.loads(json.dumps(list(values), allow_nan=False))
        except (TypeError, ValueError):
            raise ValueError(
                f"must be JSON values (numbers, strings, booleans, null, lists, mappings), but got {values!r}"
            ) from None

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[Any]) -> list[Any]:
        if not values:
            raise ValueError(f"must not be empty, but got {values!r}")
        seen: list[Any] = []
        for value in values:
            code = encode_choice(value)
            for earlier, earlier_code in zip(values, seen, strict=False):
                if earlier_code == code:
                    if repr(earlier) == repr(value):
                        raise ValueError(f"must be distinct, but got {value!r} twice")
                    raise ValueError(
                        f"must be distinct, but got {value!r} and {earlier!r}, which Optuna can't tell apart"
                    )
            seen.append(code)
        return values

    def args(self) -> list[Any]:
        return copy.deepcopy(self.values)

    def optuna_choices(self) -> tuple[Any, ...]:
        """Returns the choices as Optuna stores them (see :func:`encode_choice`)."""
        return tuple(encode_choice(value) for value in self.values)

    def to_optuna(self) -> BaseDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.optuna_choices())

    def encode_optuna(self, value: Any) -> Any:
        """Returns the Optuna form of one of the values (e.g. for ``study.enqueue_trial``)."""
        return self.optuna_choices()[self._index(value, self.values)]

    def decode_optuna(self, value: Any) -> Any:
        """Returns the real value for a choice Optuna sampled, e.g. ``"[800, 800]"`` -> ``[800, 800]``."""
        return copy.deepcopy(self.values[self._index(value, self.optuna_choices())])

    def _index(self, value: Any, among: tuple[Any, ...] | list[Any]) -> int:
        for index, candidate in enumerate(among):
            if type(candidate) is type(value) and candidate == value:
                return index
        for index, candidate in enumerate(among):
            if candidate == value:
                return index
        raise DistributionError(f"{value!r} is not one of the {self.kind} values {self.values!r}")


class Choice(_Categorical):
    """One of the listed values: ``{choice: [a, b, ...]}``."""

    kind: ClassVar[str] = "choice"
    usage: ClassVar[str] = "a list of values [a, b, ...]"

    def to_tune(self) -> Any:
        from ray import tune

        return tune.choice(self.args())


class Grid(_Categorical):
    """Every listed value, once each (Ray's grid search): ``{grid: [a, b, ...]}``."""

    kind: ClassVar[str] = "grid"
    usage: ClassVar[str] = "a list of values [a, b, ...]"

    def to_tune(self) -> Any:
        from ray import tune

        return tune.grid_search(self.args())


Distribution = Choice | Grid | Uniform | LogUniform | RandInt | QUniform
"""Any of the distributions."""

DISTRIBUTIONS: dict[str, type[Distribution]] = {
    cls.kind: cls for cls in (Choice, Uniform, LogUniform, RandInt, QUniform, Grid)
}
"""The distribution classes by YAML key."""

_SHAPE = "{choice: [a, b]}, {uniform: [low, high]} or another one-key mapping"


def parse_distribution(obj: Any) -> Distribution:
    """Builds a distribution from its one-key mapping, e.g. ``{"loguniform": [1e-4, 1e-2]}``.

    Args:
        obj: The mapping (a distribution instance is returned as is).

    Returns:
        The distribution; ``parse_distribution(d.to_json()) == d``.

    Raises:
        DistributionError: ``obj`` isn't a one-key mapping with a known key, or its values break a rule.
    """
    if isinstance(obj, _Distribution):
        return obj  # type: ignore[return-value]
    if not isinstance(obj, Mapping) or len(obj) != 1:
        hint = "; to fix a knob to one value, put it under fixed" if not isinstance(obj, Mapping) else ""
        raise DistributionError(f"a distribution is a one-key mapping like {_SHAPE}, but got {obj!r}{hint}")
    ((kind, args),) = obj.items()
    cls = DISTRIBUTIONS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DistributionError(f"unknown distribution {kind!r}: {hint}use one of {', '.join(DISTRIBUTIONS)}")
    return cls.from_args(args)


distribution_from_json = parse_distribution
"""Alias of :func:`parse_distribution` for the JSON form written by ``to_json``."""


def decode_optuna_value(dist: Distribution, value: Any) -> Any:
    """Returns the real value for a value Optuna sampled from ``dist.to_optuna()``.

    Choice and grid values that Optuna can't store come back from their JSON text (``"[800, 800]"`` ->
    ``[800, 800]``); other values are returned unchanged.
    """
    return dist.decode_optuna(value)
