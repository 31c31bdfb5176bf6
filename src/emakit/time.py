"""Time units for training schedules.

A :class:`Time` is a non-negative amount of training in one unit: batches (``"ba"``), epochs
(``"ep"``), samples (``"sp"``), tokens (``"tok"``) or a fraction of the run's ``max_duration`` (``"dur"``). Times are
written as short strings such as ``"50ba"`` or ``"0.5dur"`` so that schedules (EMA half-life,
warm-up, evaluation interval, ...) can be given in whichever unit is natural and validated in one
place. :class:`Timestamp` holds the run's progress counters, and :func:`progress` / :func:`reached`
compare that progress against a :class:`Time`.

Time strings, as :meth:`Time.parse` and :meth:`Time.coerce` read them:

- ``<number><unit>``: the number is ASCII digits with an optional fraction and exponent (``50``,
  ``0.5``, ``.5``, ``1e3``, ``2.5E-1``); the unit is ``ba``, ``ep``, ``sp``, ``tok`` or ``dur`` in any case
  (``"10BA"`` is ``"10ba"``). All but ``dur`` take whole numbers (``"1e3ba"``, ``"2.0ep"``, ``"2e9tok"``).
- Whitespace around the number and the unit is ignored on purpose: ``" 10ba "``, ``"10 ba"`` and
  ``"10 BA\n"`` are all ``"10ba"`` (times are often pasted or read from config files); a space inside
  the number (``"1 0ba"``) is refused.
- A leading sign is read as part of the number so that the error can say what is wrong: ``"+10ba"``
  is ``"10ba"``, ``"-0ba"`` is ``"0ba"``, and a negative number is refused with "cannot be negative"
  (or, through ``Time.coerce(..., positive=True)``, "must be greater than 0") rather than "is not a
  time". A :class:`Time` itself is never negative: schedules count training done, and a negative
  ``ema_start`` or ``half_life`` has no meaning.
- Errors quote the text and list only the units the argument accepts (``Time.coerce``'s ``units``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import re
from collections.abc import Iterable
from decimal import Decimal
from fractions import Fraction
from typing import Any

__all__ = ["Time", "TimeUnit", "Timestamp", "progress", "reached"]


class TimeUnit(str, enum.Enum):
    """Unit of a :class:`Time`; the value is the suffix used in time strings."""

    BATCH = "ba"
    EPOCH = "ep"
    SAMPLE = "sp"
    TOKEN = "tok"
    DURATION = "dur"

    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec: str) -> str:
        return format(self.value, format_spec)

    @property
    def is_integer(self) -> bool:
        """Whether amounts in this unit are whole numbers (everything except ``dur``)."""
        return self is not TimeUnit.DURATION


_UNIT_MEANINGS: dict[TimeUnit, str] = {
    TimeUnit.BATCH: "batches",
    TimeUnit.EPOCH: "epochs",
    TimeUnit.SAMPLE: "samples",
    TimeUnit.TOKEN: "tokens",
    TimeUnit.DURATION: "fraction of max_duration",
}
_ALL_UNITS: tuple[TimeUnit, ...] = tuple(TimeUnit)


def _units_help(units: tuple[TimeUnit, ...]) -> str:
    """``unit one of 'ba' (batches), 'ep' (epochs)``: the accepted units, in the caller's order."""
    return "unit one of " + ", ".join(f"'{u.value}' ({_UNIT_MEANINGS[u]})" for u in units)


def _whole_help(units: tuple[TimeUnit, ...]) -> str:
    """``'ba', 'ep' and 'sp' take whole numbers``, naming only the accepted integer units."""
    names = [f"'{u.value}'" for u in units if u.is_integer] or ["'ba'", "'ep'", "'sp'", "'tok'"]
    if len(names) == 1:
        return f"{names[0]} takes whole numbers"
    return f"{', '.join(names[:-1])} and {names[-1]} take whole numbers"


_UNITS_HELP = _units_help(_ALL_UNITS)
_WHOLE_HELP = _whole_help(_ALL_UNITS)

# ASCII digits only: ``\d`` would otherwise accept other scripts' digits. The sign is matched so that a
# negative number gets its own error (a Time is never negative); whitespace around the parts is allowed.
_TIME_RE = re.compile(
    r"\s*(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[A-Za-z]+)\s*"
)


class _NegativeTimeError(ValueError):
    """A well-formed time string with a negative number; :meth:`Time.coerce` words it for the argument."""


def _parse(text: str, units: tuple[TimeUnit, ...]) -> Time:
    """Parse ``text`` into a :class:`Time` in one of ``units``; errors quote ``text`` but name no argument.

    A unit outside ``units`` gives ``got '<text>'; accepted units: ...``; a negative number raises
    :class:`_NegativeTimeError` (after the unit check, so that the unit is reported first).
    """
    match = _TIME_RE.fullmatch(text)
    unit_text = match.group("unit").lower() if match else ""
    known = {u.value: u for u in TimeUnit}
    if match is None or unit_text not in known:
        raise ValueError(f"{text!r} is not a time: expected <number><unit> with {_units_help(units)}")
    unit = known[unit_text]
    if unit not in units:
        raise ValueError(f"got {text!r}; accepted units: " + ", ".join(f"'{u.value}'" for u in units))
    number = match.group("number")
    as_float = float(number)
    if not math.isfinite(as_float):
        raise ValueError(f"{text!r} is not a time: the number is too large")
    if as_float < 0 or (as_float == 0 and Decimal(number) < 0):
        raise _NegativeTimeError(f"{text!r} is not a time: a time cannot be negative")
    if not unit.is_integer:
        return Time(as_float, unit)
    exact = Decimal(number)  # exact, so '1.0000000000000000001ep' is not rounded to a whole number
    if exact != exact.to_integral_value():
        raise ValueError(f"{text!r} is not a time: {_whole_help(units)}")
    return Time(int(exact), unit)


def _to_unit(unit: object) -> TimeUnit:
    """Normalise a :class:`TimeUnit` or its (case-insensitive) string to a :class:`TimeUnit`."""
    if isinstance(unit, TimeUnit):
        return unit
    if not isinstance(unit, str):
        raise TypeError(f"time unit must be a TimeUnit or a string, got {unit!r} ({type(unit).__name__})")
    try:
        return TimeUnit(unit.strip().lower())
    except ValueError:
        raise ValueError(f"{unit!r} is not a time unit: expected {_UNITS_HELP}") from None


def _is_real(value: object) -> bool:
    """Real numbers, excluding bools (``True`` is an int, but never a meaningful amount of time)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Time:
    """An immutable, non-negative amount of training time in one :class:`TimeUnit`.

    Integer units (``ba``, ``ep``, ``sp``) store an ``int``; ``dur`` stores a ``float`` fraction of
    the run's ``max_duration``. Values must be finite and fit in a float, so that ``str(t)`` always
    parses back to ``t``.
    """

    __slots__ = ("_unit", "_value")

    _value: int | float
    _unit: TimeUnit

    def __init__(self, value: int | float, unit: TimeUnit | str) -> None:
        unit = _to_unit(unit)
        if not _is_real(value):
            raise TypeError(f"Time value must be a real number, got {value!r} ({type(value).__name__})")
        try:
            as_float = float(value)
        except OverflowError:
            raise ValueError(f"Time value {value!r} is too large") from None
        if not math.isfinite(as_float):
            raise ValueError(f"Time value must be finite, got {value!r}")
        if as_float < 0:
            raise ValueError(f"Time value must be >= 0, got {value!r}")
        stored: int | float
        if unit.is_integer:
            if isinstance(value, numbers.Integral):
                stored = int(value)
            elif as_float.is_integer():
                stored = int(as_float)
            else:
                raise ValueError(f"Time value {value!r} is not a whole number: {_WHOLE_HELP}")
        else:
            stored = as_float + 0.0  # turns -0.0 into 0.0 so that str() parses back
        object.__setattr__(self, "_value", stored)
        object.__setattr__(self, "_unit", unit)

    # -- immutability -------------------------------------------------------------------------------

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Time is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Time is immutable; cannot delete {name!r}")

    def __reduce__(self) -> tuple[type[Time], tuple[int | float, str]]:
        return (Time, (self._value, self._unit.value))

    # -- accessors ----------------------------------------------------------------------------------

    @property
    def value(self) -> int | float:
        """The amount: an ``int`` for ``ba``/``ep``/``sp``, a ``float`` for ``dur``."""
        return self._value

    @property
    def unit(self) -> TimeUnit:
        """The unit of :attr:`value`."""
        return self._unit

    def __str__(self) -> str:
        number = repr(self._value) if isinstance(self._value, float) else str(self._value)
        return f"{number}{self._unit.value}"

    def __repr__(self) -> str:
        return f"Time({self._value!r}, {self._unit.value!r})"

    # -- comparison ---------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Time):
            return NotImplemented
        return self._unit is other._unit and self._value == other._value

    def __hash__(self) -> int:
        return hash((self._value, self._unit))

    def _same_unit(self, other: Time, op: str) -> None:
        if self._unit is not other._unit:
            raise TypeError(
                f"cannot {op} times in different units: {self} is in '{self._unit.value}', "
                f"{other} is in '{other._unit.value}'"
            )

    def __lt__(self, other: Time) -> bool:
        if not isinstance(other, Time):
            return NotImplemented
        self._same_unit(other, "compare")
        return self._value < other._value

    def __le__(self, other: Time) -> bool:
        if not isinstance(other, Time):
            return NotImplemented
        self._same_unit(other, "compare")
        return self._value <= other._value

    def __gt__(self, other: Time) -> bool:
        if not isinstance(other, Time):
            return NotImplemented
        self._same_unit(other, "compare")
        return self._value > other._value

    def __ge__(self, other: Time) -> bool:
        if not isinstance(other, Time):
            return NotImplemented
        self._same_unit(other, "compare")
        return self._value >= other._value

    # -- arithmetic ---------------------------------------------------------------------------------

    def __add__(self, other: Time) -> Time:
        if not isinstance(other, Time):
            return NotImplemented
        self._same_unit(other, "add")
        return Time(self._value + other._value, self._unit)

    def __sub__(self, other: Time) -> Time:
        if not isinstance(other, Time):
            return NotImplemented
        self._same_unit(other, "subtract")
        if other._value > self._value:
            raise ValueError(f"cannot subtract {other} from {self}: a Time cannot be negative")
        return Time(self._value - other._value, self._unit)

    def __mul__(self, factor: float) -> Time:
        if not _is_real(factor):
            return NotImplemented
        assert isinstance(factor, numbers.Real)
        if factor < 0 or not (isinstance(factor, numbers.Integral) or math.isfinite(float(factor))):
            raise ValueError(f"can only multiply a Time by a finite number >= 0, got {factor!r}")
        product: int | float
        if isinstance(factor, numbers.Integral):
            product = self._value * int(factor)
        elif isinstance(factor, numbers.Rational) and self._unit.is_integer:
            exact = Fraction(self._value) * Fraction(int(factor.numerator), int(factor.denominator))
            if exact.denominator != 1:
                raise ValueError(f"{self} * {factor!r} is not a whole number: {_WHOLE_HELP}")
            product = int(exact)
        else:
            product = self._value * float(factor)
        return Time(product, self._unit)

    def __rmul__(self, factor: float) -> Time:
        return self.__mul__(factor)

    # -- construction from user input ---------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Time:
        """Parse ``"<number><unit>"`` such as ``"50ba"``, ``"1e3sp"`` or ``"0.5dur"`` (see the module docstring).

        Raises ``ValueError`` quoting the text: with the accepted units when it is not a time, or saying
        that a time cannot be negative (``"-10ba"``) or that the unit takes whole numbers (``"1.5ep"``).
        """
        if not isinstance(text, str):
            raise TypeError(f"Time.parse expects a string, got {text!r} ({type(text).__name__})")
        return _parse(text, _ALL_UNITS)

    @classmethod
    def coerce(
        cls,
        value: object,
        name: str,
        units: Iterable[TimeUnit | str] | None = None,
        *,
        positive: bool = False,
    ) -> Time:
        """Validate an argument that should be a time: a :class:`Time` or a string for :meth:`parse`.

        ``name`` is the argument's name, and every error names it. ``units`` (if given) restricts the
        accepted units, and errors then list only those. ``positive=True`` also refuses zero. A negative
        string (``"-10ba"``) gives ``<name> cannot be negative, got '-10ba'``, or with ``positive=True``
        ``<name> must be greater than 0, got '-10ba'``, the same error as for ``"0ba"``.
        """
        allowed = _ALL_UNITS if units is None else tuple(dict.fromkeys(_to_unit(u) for u in units))
        if not allowed:
            raise ValueError(f"{name}: units must name at least one time unit")
        if isinstance(value, Time):
            time = value
            if time.unit not in allowed:
                accepted = ", ".join(f"'{u.value}'" for u in allowed)
                raise ValueError(f"{name}: got '{time}'; accepted units: {accepted}")
            shown = str(time)
        elif isinstance(value, str):
            try:
                time = _parse(value, allowed)
            except _NegativeTimeError:
                raise ValueError(
                    f"{name} must be greater than 0, got {value!r}"
                    if positive
                    else f"{name} cannot be negative, got {value!r}"
                ) from None
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            shown = value
        else:
            raise TypeError(
                f"{name}: expected a Time or a string such as '10ba', got {value!r} ({type(value).__name__})"
            )
        if positive and time.value == 0:
            raise ValueError(f"{name} must be greater than 0, got {shown!r}")
        return time


_TIMESTAMP_FIELDS = ("epoch", "batch", "sample", "batch_in_epoch", "sample_in_epoch", "token", "token_in_epoch")
#: Fields a state may lack: states written before tokens were counted resume with 0 tokens.
_OPTIONAL_FIELDS = ("token", "token_in_epoch")


def _check_count(name: str, value: object) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(value)


@dataclasses.dataclass
class Timestamp:
    """Mutable progress counters of a training run, saved with checkpoints for exact resumption.

    ``epoch`` counts completed epochs; ``batch``, ``sample`` and ``token`` count all batches, samples and
    tokens seen; ``batch_in_epoch``, ``sample_in_epoch`` and ``token_in_epoch`` count those of the current epoch.
    """

    epoch: int = 0
    batch: int = 0
    sample: int = 0
    batch_in_epoch: int = 0
    sample_in_epoch: int = 0
    token: int = 0
    token_in_epoch: int = 0

    def __post_init__(self) -> None:
        for field in _TIMESTAMP_FIELDS:
            setattr(self, field, _check_count(field, getattr(self, field)))

    def get(self, unit: TimeUnit | str) -> int:
        """The counter for ``ba``, ``ep``, ``sp`` or ``tok``; ``dur`` needs ``max_duration`` (see :func:`progress`)."""
        unit = _to_unit(unit)
        if unit is TimeUnit.BATCH:
            return self.batch
        if unit is TimeUnit.EPOCH:
            return self.epoch
        if unit is TimeUnit.SAMPLE:
            return self.sample
        if unit is TimeUnit.TOKEN:
            return self.token
        raise ValueError("a Timestamp cannot give 'dur' by itself: use progress() with a max_duration")

    def advance_batch(self, num_samples: int, num_tokens: int = 0) -> None:
        """Record one completed batch of ``num_samples`` samples and ``num_tokens`` tokens."""
        num_samples = _check_count("num_samples", num_samples)
        num_tokens = _check_count("num_tokens", num_tokens)
        self.batch += 1
        self.batch_in_epoch += 1
        self.sample += num_samples
        self.sample_in_epoch += num_samples
        self.token += num_tokens
        self.token_in_epoch += num_tokens

    def advance_epoch(self) -> None:
        """Record a completed epoch and reset the per-epoch counters."""
        self.epoch += 1
        self.batch_in_epoch = 0
        self.sample_in_epoch = 0
        self.token_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        """The counters as a plain dict, for checkpoints."""
        return {field: getattr(self, field) for field in _TIMESTAMP_FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters from :meth:`state_dict`; all keys must be known and present (the token counts may be
        missing: states written before tokens were counted resume with 0 tokens)."""
        if not isinstance(state, dict):
            raise TypeError(f"Timestamp state must be a dict, got {type(state).__name__}")
        state = {**dict.fromkeys(_OPTIONAL_FIELDS, 0), **state}
        missing = [f for f in _TIMESTAMP_FIELDS if f not in state]
        unknown = [repr(k) for k in state if k not in _TIMESTAMP_FIELDS]
        if missing:
            raise ValueError(f"Timestamp state is missing key {missing[0]!r}")
        if unknown:
            raise ValueError(f"Timestamp state has unknown key {unknown[0]}")
        values = {field: _check_count(field, state[field]) for field in _TIMESTAMP_FIELDS}
        for field, value in values.items():
            setattr(self, field, value)

    def copy(self) -> Timestamp:
        """An independent copy."""
        return dataclasses.replace(self)


def progress(timestamp: Timestamp, max_duration: Time, batches_per_epoch: int | None) -> float:
    """Fraction of training done, in ``[0, inf)``, measured in the unit of ``max_duration``.

    For an epoch ``max_duration``, the current epoch counts fractionally when ``batches_per_epoch``
    is known and positive. A zero ``max_duration`` gives ``1.0`` (there is nothing to do).
    """
    if not isinstance(max_duration, Time):
        raise TypeError(f"max_duration must be a Time, got {max_duration!r} ({type(max_duration).__name__})")
    if max_duration.unit is TimeUnit.DURATION:
        raise ValueError(f"max_duration must be in 'ba', 'ep', 'sp' or 'tok', got '{max_duration}'")
    if batches_per_epoch is not None:
        batches_per_epoch = _check_count("batches_per_epoch", batches_per_epoch)
    total = max_duration.value
    if total == 0:
        return 1.0
    if max_duration.unit is TimeUnit.EPOCH and batches_per_epoch:
        return (timestamp.epoch + timestamp.batch_in_epoch / batches_per_epoch) / total
    return timestamp.get(max_duration.unit) / total


def reached(timestamp: Timestamp, target: Time, max_duration: Time | None, batches_per_epoch: int | None) -> bool:
    """Whether training has reached ``target``.

    ``ba``/``ep``/``sp``/``tok`` targets compare the matching counter; ``dur`` targets compare
    :func:`progress` (which needs ``max_duration``) with a ``1e-12`` tolerance for rounding.
    """
    if not isinstance(target, Time):
        raise TypeError(f"target must be a Time, got {target!r} ({type(target).__name__})")
    if target.unit.is_integer:
        return timestamp.get(target.unit) >= target.value
    if max_duration is None:
        raise ValueError(f"target '{target}' is a fraction of max_duration, but max_duration is None")
    return progress(timestamp, max_duration, batches_per_epoch) >= target.value - 1e-12
