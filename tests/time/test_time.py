"""Tests for emakit.time: Time parsing/validation/arithmetic, Timestamp counters, progress/reached."""

from __future__ import annotations

import copy
import math
import pickle
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emakit.time import Time, Timestamp, TimeUnit, progress, reached

INT_UNITS = ["ba", "ep", "sp", "tok"]
ALL_UNITS = [*INT_UNITS, "dur"]
UNITS_LISTED = re.escape(
    "'ba' (batches), 'ep' (epochs), 'sp' (samples), 'tok' (tokens), 'dur' (fraction of max_duration)"
)

FAST = settings(max_examples=200, deadline=None)


# -- TimeUnit -----------------------------------------------------------------------------------------


def test_time_unit_values_and_str() -> None:
    assert [u.value for u in TimeUnit] == ["ba", "ep", "sp", "tok", "dur"]
    assert TimeUnit.BATCH == "ba"
    assert str(TimeUnit.EPOCH) == "ep"
    assert f"{TimeUnit.SAMPLE}" == "sp"
    assert f"3{TimeUnit.DURATION}" == "3dur"
    assert TimeUnit("dur") is TimeUnit.DURATION


# -- Time construction --------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", INT_UNITS)
def test_integer_units_store_int(unit: str) -> None:
    for value in (5, 5.0, Fraction(10, 2)):
        t = Time(value, unit)  # type: ignore[arg-type]  # any numbers.Real is accepted
        assert t.value == 5
        assert type(t.value) is int
        assert t.unit is TimeUnit(unit)


def test_duration_stores_float() -> None:
    t = Time(1, "dur")
    assert t.value == 1.0
    assert type(t.value) is float
    assert Time(Fraction(1, 4), "dur").value == 0.25  # type: ignore[arg-type]
    assert Time(0.5, TimeUnit.DURATION).unit is TimeUnit.DURATION


def test_negative_zero_duration_is_normalised() -> None:
    t = Time(-0.0, "dur")
    assert math.copysign(1.0, t.value) == 1.0
    assert str(t) == "0.0dur"


@pytest.mark.parametrize("unit", ["BA", "Ep", " sP ", "DUR", TimeUnit.BATCH])
def test_unit_is_case_insensitive(unit: str) -> None:
    assert Time(1, unit).unit is TimeUnit(str(unit).strip().lower())


@pytest.mark.parametrize("value", [True, False, "5", None, 1 + 2j, [1], object()])
def test_constructor_rejects_non_real_values(value: object) -> None:
    with pytest.raises(TypeError, match="must be a real number, got " + re.escape(repr(value))):
        Time(value, "ba")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, -0.5, -1e-300])
def test_constructor_rejects_negative(value: float) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Time(value, "dur")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("unit", ALL_UNITS)
def test_constructor_rejects_non_finite(value: float, unit: str) -> None:
    with pytest.raises(ValueError, match="must be finite"):
        Time(value, unit)


def test_constructor_rejects_values_beyond_float_range() -> None:
    with pytest.raises(ValueError, match="too large"):
        Time(10**400, "ba")


@pytest.mark.parametrize("unit", INT_UNITS)
def test_constructor_rejects_fractional_integer_units(unit: str) -> None:
    with pytest.raises(ValueError, match=r"1\.5 is not a whole number: 'ba', 'ep', 'sp' and 'tok' take whole numbers"):
        Time(1.5, unit)


def test_constructor_rejects_unknown_unit() -> None:
    with pytest.raises(ValueError, match=f"'xx' is not a time unit: expected unit one of {UNITS_LISTED}"):
        Time(1, "xx")
    with pytest.raises(TypeError, match="time unit must be a TimeUnit or a string, got 3"):
        Time(1, 3)  # type: ignore[arg-type]


def test_time_is_immutable_and_picklable() -> None:
    t = Time(5, "ba")
    with pytest.raises(AttributeError, match="immutable"):
        t._value = 6
    with pytest.raises(AttributeError, match="immutable"):
        t.foo = 1
    with pytest.raises(AttributeError, match="immutable"):
        del t._unit
    assert t.value == 5
    assert pickle.loads(pickle.dumps(t)) == t
    assert copy.deepcopy(t) == t
    assert copy.copy(Time(0.25, "dur")) == Time(0.25, "dur")


# -- str / repr / equality / ordering -----------------------------------------------------------------


def test_str_and_repr() -> None:
    assert str(Time(50, "ba")) == "50ba"
    assert str(Time(0.5, "dur")) == "0.5dur"
    assert str(Time(1e-5, "dur")) == "1e-05dur"
    assert str(Time(3, "dur")) == "3.0dur"
    assert repr(Time(50, "ba")) == "Time(50, 'ba')"
    assert repr(Time(0.5, "dur")) == "Time(0.5, 'dur')"
    assert Time.parse(str(Time(1e16, "dur"))) == Time(1e16, "dur")


def test_equality_and_hash() -> None:
    assert Time(5, "ba") == Time(5.0, "BA")
    assert Time(5, "ba") != Time(5, "ep")
    assert Time(1, "dur") == Time(1.0, "dur")
    assert Time(5, "ba") != "5ba"
    assert len({Time(5, "ba"), Time(5.0, "ba"), Time(5, "sp"), Time(0.5, "dur"), Time(0.5, "dur")}) == 3
    assert hash(Time(2, "ep")) == hash(Time(2.0, "ep"))


def test_ordering_same_unit() -> None:
    a, b = Time(3, "ba"), Time(5, "ba")
    assert a < b
    assert a <= b
    assert a <= Time(3, "ba")
    assert b > a
    assert b >= a
    assert not b < a
    assert max(Time(0.1, "dur"), Time(0.7, "dur"), Time(0.3, "dur")) == Time(0.7, "dur")
    assert sorted([Time(3, "ep"), Time(1, "ep"), Time(2, "ep")]) == [
        Time(1, "ep"),
        Time(2, "ep"),
        Time(3, "ep"),
    ]


@pytest.mark.parametrize("op", ["__lt__", "__le__", "__gt__", "__ge__"])
def test_ordering_across_units_names_both_units(op: str) -> None:
    with pytest.raises(TypeError, match=r"'ba'.*'ep'"):
        getattr(Time(3, "ba"), op)(Time(1, "ep"))


def test_ordering_with_non_time_is_type_error() -> None:
    with pytest.raises(TypeError):
        _ = Time(3, "ba") < 5  # type: ignore[operator]


# -- arithmetic -----------------------------------------------------------------------------------------


def test_add_and_sub() -> None:
    assert Time(3, "ba") + Time(4, "ba") == Time(7, "ba")
    assert Time(7, "sp") - Time(7, "sp") == Time(0, "sp")
    assert Time(0.25, "dur") + Time(0.5, "dur") == Time(0.75, "dur")
    assert Time(0.75, "dur") - Time(0.25, "dur") == Time(0.5, "dur")


def test_sub_below_zero_is_value_error() -> None:
    with pytest.raises(ValueError, match="cannot subtract 5ba from 3ba"):
        _ = Time(3, "ba") - Time(5, "ba")


def test_add_sub_across_units_is_type_error() -> None:
    with pytest.raises(TypeError, match=r"'ba'.*'ep'"):
        _ = Time(3, "ba") + Time(1, "ep")
    with pytest.raises(TypeError, match=r"'dur'.*'sp'"):
        _ = Time(0.5, "dur") - Time(1, "sp")
    with pytest.raises(TypeError):
        _ = Time(3, "ba") + 1  # type: ignore[operator]


def test_mul() -> None:
    assert Time(5, "ba") * 3 == Time(15, "ba")
    assert 3 * Time(5, "ba") == Time(15, "ba")
    assert Time(4, "ep") * 0.5 == Time(2, "ep")
    assert Time(10, "ba") * 0.1 == Time(1, "ba")
    assert Time(3, "sp") * Fraction(2, 3) == Time(2, "sp")  # type: ignore[operator]
    assert Time(0.5, "dur") * 0.5 == Time(0.25, "dur")
    assert 2 * Time(0.25, "dur") == Time(0.5, "dur")
    assert Time(7, "ba") * 0 == Time(0, "ba")
    assert type((Time(4, "ep") * 0.5).value) is int


def test_mul_errors() -> None:
    with pytest.raises(ValueError, match="not a whole number: 'ba', 'ep', 'sp' and 'tok' take whole numbers"):
        _ = Time(5, "ba") * 0.5
    with pytest.raises(ValueError, match="not a whole number"):
        _ = Time(5, "ba") * Fraction(1, 3)  # type: ignore[operator]
    with pytest.raises(ValueError, match="finite number >= 0, got -1"):
        _ = Time(5, "ba") * -1
    with pytest.raises(ValueError, match="finite number >= 0, got inf"):
        _ = Time(0.5, "dur") * math.inf
    with pytest.raises(ValueError, match="finite number >= 0, got nan"):
        _ = Time(0.5, "dur") * math.nan
    with pytest.raises(ValueError, match="too large"):
        _ = Time(5, "ba") * 10**400
    with pytest.raises(TypeError):
        _ = Time(5, "ba") * True
    with pytest.raises(TypeError):
        _ = Time(5, "ba") * "2"  # type: ignore[operator]
    with pytest.raises(TypeError):
        _ = Time(5, "ba") * Time(2, "ba")  # type: ignore[operator]


# -- parse ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50ba", Time(50, "ba")),
        ("0.5dur", Time(0.5, "dur")),
        ("1e3ba", Time(1000, "ba")),
        (".5dur", Time(0.5, "dur")),
        ("1.0ep", Time(1, "ep")),
        ("1.ep", Time(1, "ep")),
        ("1ep", Time(1, "ep")),
        ("  7 SP\n", Time(7, "sp")),
        ("2E+2sp", Time(200, "sp")),
        ("2.5e-1DUR", Time(0.25, "dur")),
        ("0ba", Time(0, "ba")),
        ("00012ba", Time(12, "ba")),
        ("1.50e1ep", Time(15, "ep")),
        ("123456789012345678901234567890ba", Time(123456789012345678901234567890, "ba")),
        # whitespace around the number and the unit is accepted on purpose, and the unit's case is free
        ("10 ba", Time(10, "ba")),
        (" 10ba ", Time(10, "ba")),
        ("10 BA", Time(10, "ba")),
        ("0.5\tDur", Time(0.5, "dur")),
        # a leading sign is part of the number: '+' is harmless, '-0' is zero
        ("+10ba", Time(10, "ba")),
        ("+.5dur", Time(0.5, "dur")),
        ("-0ba", Time(0, "ba")),
        ("-0.0dur", Time(0.0, "dur")),
    ],
)
def test_parse_accepts(text: str, expected: Time) -> None:
    got = Time.parse(text)
    assert got == expected
    assert type(got.value) is type(expected.value)


@pytest.mark.parametrize(
    "text",
    [
        "ba",
        "10",
        "10xx",
        "nanba",
        "infdur",
        "",
        "   ",
        "1 0ba",
        "1e3",
        "- 1ba",
        "--1ba",
        "+-1ba",
        "1e 3ba",
        "1,5ep",
        "1e1.5ba",
        "٣ba",
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    pattern = f"^{re.escape(repr(text))} is not a time: expected <number><unit> with unit one of "
    with pytest.raises(ValueError, match=pattern + UNITS_LISTED + "$"):
        Time.parse(text)


def test_parse_error_message_exact() -> None:
    with pytest.raises(ValueError) as info:
        Time.parse("10xx")
    assert str(info.value) == (
        "'10xx' is not a time: expected <number><unit> with unit one of 'ba' (batches), 'ep' (epochs), "
        "'sp' (samples), 'tok' (tokens), 'dur' (fraction of max_duration)"
    )


@pytest.mark.parametrize("text", ["-1ba", "-10 ba", " -0.5dur", "-1e-400dur", "-1.5ep", "-2E3sp"])
def test_parse_rejects_negative(text: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(repr(text))} is not a time: a time cannot be negative$"):
        Time.parse(text)


@pytest.mark.parametrize("text", ["1.5ep", "0.1ba", "2.5e-1sp", "1.0000000000000000001ep"])
def test_parse_rejects_fractional_integer_units(text: str) -> None:
    with pytest.raises(ValueError, match=f"^'{text}' is not a time: 'ba', 'ep', 'sp' and 'tok' take whole numbers$"):
        Time.parse(text)


@pytest.mark.parametrize("text", ["1e400ba", "1e400dur", "9" * 400 + "sp"])
def test_parse_rejects_out_of_range(text: str) -> None:
    with pytest.raises(ValueError, match="is not a time: the number is too large"):
        Time.parse(text)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(TypeError, match="expects a string, got 5"):
        Time.parse(5)  # type: ignore[arg-type]


# -- coerce ---------------------------------------------------------------------------------------------


def test_coerce_accepts_time_and_string() -> None:
    t = Time(3, "ep")
    assert Time.coerce(t, "x") is t
    assert Time.coerce(" 3EP ", "x") == t
    assert Time.coerce("3ep", "x", units=["ba", TimeUnit.EPOCH]) == t
    assert Time.coerce(t, "x", units=iter(["EP"])) == t


def test_coerce_prefixes_parse_errors() -> None:
    with pytest.raises(ValueError, match=r"^half_life: '1\.5ep' is not a time: 'ba', 'ep', 'sp' and 'tok' take whole"):
        Time.coerce("1.5ep", "half_life")
    with pytest.raises(ValueError, match=f"^half_life: '10xx' is not a time: .*{UNITS_LISTED}$"):
        Time.coerce("10xx", "half_life")


def test_coerce_parse_errors_list_only_the_accepted_units() -> None:
    with pytest.raises(ValueError) as info:
        Time.coerce("ten", "half_life", units=["ba", "ep"])
    assert str(info.value) == (
        "half_life: 'ten' is not a time: expected <number><unit> with unit one of 'ba' (batches), 'ep' (epochs)"
    )
    with pytest.raises(ValueError) as info:
        Time.coerce("10xx", "max_duration", units=[TimeUnit.EPOCH, "ba", "SP", "ep"])
    assert str(info.value) == (
        "max_duration: '10xx' is not a time: expected <number><unit> with unit one of "
        "'ep' (epochs), 'ba' (batches), 'sp' (samples)"
    )
    with pytest.raises(ValueError, match=r"^half_life: '1\.5ep' is not a time: 'ba' and 'ep' take whole numbers$"):
        Time.coerce("1.5ep", "half_life", units=["ba", "ep"])
    with pytest.raises(ValueError, match=r"^interval: '0\.5ep' is not a time: 'ep' takes whole numbers$"):
        Time.coerce("0.5ep", "interval", units=["ep", "dur"])
    # a known unit that this argument refuses: the text as written, then the accepted units
    with pytest.raises(ValueError, match=r"^half_life: got '1e3sp'; accepted units: 'ba', 'ep'$"):
        Time.coerce("1e3sp", "half_life", units=["ba", "ep"])
    with pytest.raises(ValueError, match=r"^half_life: got '-1\.5sp'; accepted units: 'ba', 'ep'$"):
        Time.coerce("-1.5sp", "half_life", units=["ba", "ep"])  # the unit is the first thing to fix


@pytest.mark.parametrize("text", ["-10ba", " -10 BA", "-1e-400ba"])
def test_coerce_negative_names_the_argument(text: str) -> None:
    with pytest.raises(ValueError, match=f"^ema_start cannot be negative, got {re.escape(repr(text))}$"):
        Time.coerce(text, "ema_start")
    with pytest.raises(ValueError, match=f"^half_life must be greater than 0, got {re.escape(repr(text))}$"):
        Time.coerce(text, "half_life", units=["ba", "ep"], positive=True)


def test_coerce_positive_refuses_zero_and_keeps_the_rest() -> None:
    for zero in ("0ba", "-0ba", "0.0e5ba", " 0 ba"):
        with pytest.raises(ValueError, match=f"^half_life must be greater than 0, got {re.escape(repr(zero))}$"):
            Time.coerce(zero, "half_life", positive=True)
        assert Time.coerce(zero, "ema_start") == Time(0, "ba")
    with pytest.raises(ValueError, match=r"^max_duration must be greater than 0, got '0\.0dur'$"):
        Time.coerce(Time(0, "dur"), "max_duration", positive=True)
    assert Time.coerce("1e-300dur", "x", positive=True) == Time(1e-300, "dur")
    assert Time.coerce(Time(1, "ba"), "x", units=["ba"], positive=True) == Time(1, "ba")


def test_coerce_needs_at_least_one_unit() -> None:
    with pytest.raises(ValueError, match=r"^x: units must name at least one time unit$"):
        Time.coerce("1ba", "x", units=[])


def test_coerce_rejects_disallowed_unit() -> None:
    with pytest.raises(ValueError) as info:
        Time.coerce("3sp", "half_life", units=[TimeUnit.BATCH, "ep", "ba"])
    assert str(info.value) == "half_life: got '3sp'; accepted units: 'ba', 'ep'"
    with pytest.raises(ValueError, match=r"^warmup: got '0\.5dur'; accepted units: 'sp'$"):
        Time.coerce(Time(0.5, "dur"), "warmup", units=["sp"])


@pytest.mark.parametrize("value", [5, 0.5, None, b"5ba", ["5ba"], True, TimeUnit.BATCH.value.encode()])
def test_coerce_rejects_other_types(value: object) -> None:
    with pytest.raises(TypeError, match=r"^half_life: expected a Time or a string"):
        Time.coerce(value, "half_life")


# -- property tests -------------------------------------------------------------------------------------


def _random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(text, flips, strict=True))


_SPACE = st.text(alphabet=" \t\n\r", max_size=3)


@st.composite
def _int_time_text(draw: st.DrawFn) -> tuple[str, int, str]:
    n = draw(st.integers(min_value=0, max_value=2**80))
    unit = draw(st.sampled_from(INT_UNITS))
    text = draw(_SPACE) + str(n) + draw(_SPACE) + _random_case(draw, unit) + draw(_SPACE)
    return text, n, unit


@FAST
@given(st.integers(min_value=0, max_value=2**80), st.sampled_from(INT_UNITS))
def test_property_parse_plain_integers(n: int, unit: str) -> None:
    t = Time.parse(f"{n}{unit}")
    assert t.value == n
    assert type(t.value) is int
    assert t.unit is TimeUnit(unit)


@FAST
@given(_int_time_text())
def test_property_parse_integers_any_case_and_whitespace(case: tuple[str, int, str]) -> None:
    text, n, unit = case
    t = Time.parse(text)
    assert t.value == n
    assert t.unit is TimeUnit(unit)


@FAST
@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_property_duration_str_round_trip(x: float) -> None:
    t = Time(x, "dur")
    back = Time.parse(str(t))
    assert back == t
    assert back.value == x


@FAST
@given(st.text())
def test_property_parse_arbitrary_text_raises_only_value_error(text: str) -> None:
    try:
        t = Time.parse(text)
    except ValueError as err:
        assert repr(text) in str(err)
    else:
        assert isinstance(t, Time)


_TIMEISH_TEXT = st.builds(
    lambda num, unit, pre, post: f"{pre}{num}{unit}{post}",
    st.one_of(
        st.integers(min_value=-5, max_value=10**6).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["", ".", ".5", "1.", "1e3", "1e400", "1e-400", "٣"]),
    ),
    st.sampled_from(["ba", "EP", "sp", "dUr", "", "x", "e", "ba ba"]),
    _SPACE,
    _SPACE,
)


@FAST
@given(_TIMEISH_TEXT)
def test_property_parse_time_like_text_raises_only_value_error(text: str) -> None:
    try:
        t = Time.parse(text)
    except ValueError as err:
        assert repr(text) in str(err)
    else:
        assert Time.parse(str(t)) == t


_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.complex_numbers(),
    st.text(),
    _TIMEISH_TEXT,
    st.binary(),
    st.fractions(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(Time, st.integers(min_value=0, max_value=10**6), st.sampled_from(ALL_UNITS)),
)


@FAST
@given(_ANY_VALUE, st.one_of(st.none(), st.lists(st.sampled_from(ALL_UNITS), min_size=1, max_size=4)))
def test_property_coerce_raises_only_type_or_value_error(value: object, units: list[str] | None) -> None:
    try:
        t = Time.coerce(value, "arg", units=units)
    except (TypeError, ValueError) as err:
        assert str(err).startswith(("arg: ", "arg cannot be negative", "arg must be greater than 0"))
    else:
        assert isinstance(t, Time)
        if units is not None:
            assert t.unit.value in units


@FAST
@given(_TIMEISH_TEXT)
def test_property_str_parse_str_is_stable(text: str) -> None:
    try:
        t = Time.parse(text)
    except ValueError:
        return
    once = str(t)
    assert str(Time.parse(once)) == once
    assert Time.parse(once) == t


@FAST
@given(st.integers(min_value=0, max_value=2**80), st.sampled_from(INT_UNITS))
def test_property_integer_str_round_trip(n: int, unit: str) -> None:
    t = Time(n, unit)
    assert str(t) == f"{n}{unit}"
    assert Time.parse(str(t)) == t


@st.composite
def _spelling(draw: st.DrawFn) -> tuple[str, Time]:
    """A time and one of the many ways a user may write it (signs, zeros, exponents, case, whitespace)."""
    unit = draw(st.sampled_from(ALL_UNITS))
    if unit == "dur":
        x = draw(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
        number = repr(x)
        if draw(st.booleans()):
            number = number.upper()  # '1E-05'
        expected = Time(x, unit)
    else:
        n = draw(st.integers(min_value=0, max_value=10**30))
        shift = draw(st.integers(min_value=0, max_value=4))
        forms = [
            str(n),
            "0" * shift + str(n),
            f"{n}." + "0" * shift,
            f"{n * 10**shift}e-{shift}",  # 1200e-2 is 12
            f"{n}E+0",
        ]
        mantissa, exponent = n, 0
        while mantissa and mantissa % 10 == 0:
            mantissa, exponent = mantissa // 10, exponent + 1
        forms.append(f"{mantissa}e{exponent}")  # 12e2 is 1200
        number = draw(st.sampled_from(forms))
        expected = Time(n, unit)
    sign = draw(st.sampled_from(["", "+", "-"] if expected.value == 0 else ["", "+"]))
    text = draw(_SPACE) + sign + number + draw(_SPACE) + _random_case(draw, unit) + draw(_SPACE)
    return text, expected


@FAST
@given(_spelling())
def test_property_every_spelling_of_a_time_parses_to_it(case: tuple[str, Time]) -> None:
    text, expected = case
    got = Time.parse(text)
    assert got == expected
    assert type(got.value) is type(expected.value)
    assert str(got) == str(expected)  # one canonical spelling
    assert Time.coerce(text, "arg", units=[expected.unit]) == expected


_MEANING = {"ba": "batches", "ep": "epochs", "sp": "samples", "tok": "tokens", "dur": "fraction of max_duration"}


def _reference_read(text: str, units: list[str]) -> tuple[str, object]:
    """An independent reader of time strings: the outcome category and, when valid, the (value, unit).

    Written differently from emakit's (strip, split off the trailing letters, let Decimal read the number)
    so that the two agreeing on random text is evidence, not a tautology.
    """
    m = re.fullmatch(r"(.*?)([A-Za-z]+)", text.strip(), flags=re.S)
    if m is None:
        return "syntax", None
    number, unit = m.group(1).strip(), m.group(2).lower()
    if unit not in _MEANING or not number or any(c not in "0123456789.eE+-" for c in number):
        return "syntax", None
    try:
        exact = Decimal(number)
    except InvalidOperation:
        return "syntax", None
    if unit not in units:
        return "unit", None
    if not math.isfinite(float(number)):
        return "large", None
    if exact < 0:
        return "negative", None
    if unit == "dur":
        return "ok", (float(number), unit)
    if exact != int(exact):
        return "whole", None
    return "ok", (int(exact), unit)


def _expected_message(outcome: str, text: str, name: str, units: list[str], positive: bool) -> str:
    listed = ", ".join(f"'{u}' ({_MEANING[u]})" for u in units)
    whole = [f"'{u}'" for u in units if u != "dur"] or ["-"]  # 'whole' needs an integer unit among units
    whole_text = f"{whole[0]} takes" if len(whole) == 1 else f"{', '.join(whole[:-1])} and {whole[-1]} take"
    return {
        "syntax": f"{name}: {text!r} is not a time: expected <number><unit> with unit one of {listed}",
        "unit": f"{name}: got {text!r}; accepted units: " + ", ".join(f"'{u}'" for u in units),
        "large": f"{name}: {text!r} is not a time: the number is too large",
        "negative": f"{name} must be greater than 0, got {text!r}"
        if positive
        else f"{name} cannot be negative, got {text!r}",
        "whole": f"{name}: {text!r} is not a time: {whole_text} whole numbers",
        "zero": f"{name} must be greater than 0, got {text!r}",
    }[outcome]


_TIME_ALPHABET_TEXT = st.text(alphabet="0123456789.eE+- \tbapsdurBAxX", max_size=12)
_SOME_UNITS = st.lists(st.sampled_from(ALL_UNITS), min_size=1, max_size=4, unique=True)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(_TIME_ALPHABET_TEXT, _TIMEISH_TEXT, _spelling().map(lambda c: c[0]), st.text(max_size=8)),
    _SOME_UNITS,
    st.booleans(),
)
def test_property_coerce_matches_the_reference_and_names_argument_and_units(
    text: str, units: list[str], positive: bool
) -> None:
    outcome, parsed = _reference_read(text, units)
    if outcome == "ok":
        assert isinstance(parsed, tuple)
        value, unit = parsed
        if positive and value == 0:
            outcome = "zero"
        else:
            got = Time.coerce(text, "some_arg", units=units, positive=positive)
            assert got == Time(value, unit)
            assert Time.parse(str(got)) == got
            return
    with pytest.raises(ValueError) as info:
        Time.coerce(text, "some_arg", units=units, positive=positive)
    assert str(info.value) == _expected_message(outcome, text, "some_arg", units, positive)
    # Time.parse (every unit accepted) refuses the text too, unless only the unit was refused above
    if outcome not in ("unit", "zero"):
        with pytest.raises(ValueError, match=re.escape(repr(text))):
            Time.parse(text)


@FAST
@given(
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=10**9),
    st.sampled_from(INT_UNITS),
)
def test_property_integer_arithmetic_matches_ints(a: int, b: int, unit: str) -> None:
    ta, tb = Time(a, unit), Time(b, unit)
    assert (ta + tb).value == a + b
    assert (ta < tb) == (a < b)
    assert (ta <= tb) == (a <= b)
    assert (ta == tb) == (a == b)
    assert (ta * b).value == a * b
    if a >= b:
        assert (ta - tb).value == a - b
    else:
        with pytest.raises(ValueError, match="cannot subtract"):
            _ = ta - tb


# -- Timestamp ------------------------------------------------------------------------------------------


def test_timestamp_defaults_and_get() -> None:
    ts = Timestamp()
    assert ts.state_dict() == {
        "epoch": 0, "batch": 0, "sample": 0, "batch_in_epoch": 0, "sample_in_epoch": 0, "token": 0, "token_in_epoch": 0
    }  # fmt: skip
    ts = Timestamp(epoch=2, batch=30, sample=480, batch_in_epoch=5, sample_in_epoch=80)
    assert ts.get("ba") == 30
    assert ts.get(TimeUnit.EPOCH) == 2
    assert ts.get("SP") == 480
    with pytest.raises(ValueError, match=r"'dur'.*max_duration"):
        ts.get("dur")
    with pytest.raises(ValueError, match="is not a time unit"):
        ts.get("xx")


def test_timestamp_validates_fields() -> None:
    with pytest.raises(ValueError, match="batch must be >= 0, got -1"):
        Timestamp(batch=-1)
    with pytest.raises(TypeError, match=r"epoch must be an int, got 1\.0"):
        Timestamp(epoch=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sample must be an int, got True"):
        Timestamp(sample=True)


def test_timestamp_advance() -> None:
    ts = Timestamp()
    ts.advance_batch(16)
    ts.advance_batch(8)
    assert (ts.batch, ts.batch_in_epoch, ts.sample, ts.sample_in_epoch, ts.epoch) == (2, 2, 24, 24, 0)
    ts.advance_epoch()
    assert (ts.batch, ts.batch_in_epoch, ts.sample, ts.sample_in_epoch, ts.epoch) == (2, 0, 24, 0, 1)
    ts.advance_batch(0)
    assert (ts.batch, ts.batch_in_epoch, ts.sample, ts.sample_in_epoch) == (3, 1, 24, 0)
    with pytest.raises(ValueError, match="num_samples must be >= 0"):
        ts.advance_batch(-1)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        ts.advance_batch(2.0)  # type: ignore[arg-type]
    assert ts.batch == 3


@FAST
@given(st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=1000)), max_size=60))
def test_property_timestamp_advance_matches_naive_counter(steps: list[int | None]) -> None:
    ts = Timestamp()
    epoch = batch = sample = batch_in_epoch = sample_in_epoch = 0
    for step in steps:
        if step is None:
            ts.advance_epoch()
            epoch, batch_in_epoch, sample_in_epoch = epoch + 1, 0, 0
        else:
            ts.advance_batch(step)
            batch, batch_in_epoch = batch + 1, batch_in_epoch + 1
            sample, sample_in_epoch = sample + step, sample_in_epoch + step
    assert ts == Timestamp(epoch, batch, sample, batch_in_epoch, sample_in_epoch)
    restored = Timestamp()
    restored.load_state_dict(ts.state_dict())
    assert restored == ts


def test_timestamp_state_dict_round_trip_and_copy() -> None:
    ts = Timestamp(epoch=1, batch=9, sample=99, batch_in_epoch=3, sample_in_epoch=33)
    state = ts.state_dict()
    assert all(type(v) is int for v in state.values())
    other = Timestamp()
    other.load_state_dict(state)
    assert other == ts
    state["batch"] = 1000  # the dict is a snapshot, not a view
    assert ts.batch == 9
    dup = ts.copy()
    assert dup == ts
    assert dup is not ts
    dup.advance_batch(1)
    assert ts.batch == 9
    assert dup.batch == 10


def test_timestamp_load_state_dict_errors() -> None:
    ts = Timestamp(batch=4)
    full = Timestamp().state_dict()
    missing = {k: v for k, v in full.items() if k != "sample_in_epoch"}
    with pytest.raises(ValueError, match="missing key 'sample_in_epoch'"):
        ts.load_state_dict(missing)
    with pytest.raises(ValueError, match="unknown key 'step'"):
        ts.load_state_dict({**full, "step": 1})
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        ts.load_state_dict({**full, "epoch": -2})
    with pytest.raises(TypeError, match="batch must be an int"):
        ts.load_state_dict({**full, "batch": "3"})
    with pytest.raises(TypeError, match="must be a dict"):
        ts.load_state_dict([("batch", 1)])  # type: ignore[arg-type]
    assert ts.batch == 4  # failed loads leave the timestamp unchanged


# -- progress / reached ---------------------------------------------------------------------------------


def _after_batches(n: int, samples_per_batch: int = 4, batches_per_epoch: int | None = None) -> Timestamp:
    ts = Timestamp()
    for _ in range(n):
        ts.advance_batch(samples_per_batch)
        if batches_per_epoch and ts.batch_in_epoch == batches_per_epoch:
            ts.advance_epoch()
    return ts


def test_progress_in_batches() -> None:
    run_length = Time.parse("10ba")
    assert progress(_after_batches(0), run_length, None) == 0.0
    assert progress(_after_batches(5), run_length, None) == 0.5
    assert progress(_after_batches(15), run_length, None) == 1.5
    assert reached(_after_batches(5), Time.parse("0.5dur"), run_length, None)
    assert not reached(_after_batches(4), Time.parse("0.5dur"), run_length, None)


def test_progress_in_samples() -> None:
    run_length = Time(100, "sp")
    assert progress(_after_batches(5, samples_per_batch=4), run_length, None) == 0.2
    assert reached(_after_batches(5, samples_per_batch=4), Time(0.2, "dur"), run_length, None)
    assert not reached(_after_batches(4, samples_per_batch=4), Time(0.2, "dur"), run_length, None)


def test_progress_in_epochs() -> None:
    run_length = Time(1, "ep")
    assert progress(_after_batches(4, batches_per_epoch=8), run_length, 8) == 0.5
    assert progress(_after_batches(8, batches_per_epoch=8), run_length, 8) == 1.0
    # epochs unknown length: only completed epochs count
    assert progress(_after_batches(4, batches_per_epoch=8), run_length, None) == 0.0
    assert progress(_after_batches(4, batches_per_epoch=8), run_length, 0) == 0.0
    two = Time(2, "ep")
    assert progress(_after_batches(12, batches_per_epoch=8), two, 8) == 0.75
    assert progress(_after_batches(12, batches_per_epoch=8), two, None) == 0.5
    assert reached(_after_batches(12, batches_per_epoch=8), Time(0.75, "dur"), two, 8)
    assert not reached(_after_batches(11, batches_per_epoch=8), Time(0.75, "dur"), two, 8)


def test_progress_zero_max_duration_is_done() -> None:
    for unit in INT_UNITS:
        assert progress(Timestamp(), Time(0, unit), None) == 1.0
        assert reached(Timestamp(), Time(1.0, "dur"), Time(0, unit), None)


def test_progress_tolerates_float_rounding() -> None:
    # 0.1 * 3 batches out of 10 is 0.30000000000000004 vs 3/10 == 0.3; either way the target is reached.
    assert reached(_after_batches(3), Time(0.1, "dur") * 3, Time(10, "ba"), None)
    assert reached(_after_batches(7), Time(0.7, "dur"), Time(10, "ba"), None)
    assert not reached(_after_batches(6), Time(0.7, "dur"), Time(10, "ba"), None)


def test_progress_errors() -> None:
    with pytest.raises(ValueError, match=r"max_duration must be in 'ba', 'ep', 'sp' or 'tok', got '1\.0dur'"):
        progress(Timestamp(), Time(1, "dur"), None)
    with pytest.raises(TypeError, match="max_duration must be a Time, got '10ba'"):
        progress(Timestamp(), "10ba", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batches_per_epoch must be >= 0"):
        progress(Timestamp(), Time(1, "ep"), -1)


def test_reached_integer_units() -> None:
    ts = Timestamp(epoch=2, batch=20, sample=320, batch_in_epoch=0, sample_in_epoch=0)
    assert reached(ts, Time(20, "ba"), None, None)
    assert not reached(ts, Time(21, "ba"), Time(100, "ba"), None)
    assert reached(ts, Time(2, "ep"), None, None)
    assert not reached(ts, Time(3, "ep"), None, 10)
    assert reached(ts, Time(320, "sp"), None, None)
    assert not reached(ts, Time(321, "sp"), None, None)
    assert reached(ts, Time(0, "ba"), None, None)


def test_reached_errors() -> None:
    with pytest.raises(ValueError, match=r"'0\.5dur' is a fraction of max_duration, but max_duration is None"):
        reached(Timestamp(), Time(0.5, "dur"), None, None)
    with pytest.raises(TypeError, match="target must be a Time"):
        reached(Timestamp(), "5ba", None, None)  # type: ignore[arg-type]


@FAST
@given(
    st.integers(min_value=1, max_value=500),
    st.integers(min_value=0, max_value=600),
    st.integers(min_value=0, max_value=500),
)
def test_property_reached_duration_matches_batch_count(max_batches: int, done: int, target_batches: int) -> None:
    """Reaching k/N of an N-batch run happens exactly when k batches are done."""
    ts = Timestamp(batch=done, batch_in_epoch=done)
    target = Time(target_batches / max_batches, "dur")
    assert reached(ts, target, Time(max_batches, "ba"), None) == (done >= target_batches)
