"""The scaling policy: hysteresis, cooldowns, bounds, the calendar, reasons and configuration."""

from __future__ import annotations

import dataclasses
import math
import sys
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presence_core.errors import PresenceError, PresenceTypeError, PresenceValueError
from presence_core.scaling import (
    LOAD_SIGNALS,
    REPLICA_LIMIT,
    LoadCalendar,
    LoadSample,
    ScaleDecision,
    Threshold,
    ThresholdScaler,
    ThresholdUnit,
)
from presence_core.typing import Scaler

# A Saturday in June 2024 and a Wednesday in January 2024: peak season and off season.
JUNE_SATURDAY = datetime(2024, 6, 8)
JANUARY_WEDNESDAY = datetime(2024, 1, 10)


def presences_scaler(**kwargs: Any) -> ThresholdScaler:
    """Presences per replica in [500, 1000], up to 10 replicas, no cooldowns unless asked."""
    options: dict[str, Any] = {
        "max_replicas": 10,
        "current": 2,
        "up_cooldown_s": 0.0,
        "down_cooldown_s": 0.0,
        "down_stable_samples": 1,
    }
    options.update(kwargs)
    thresholds = options.pop("thresholds", [Threshold("presences", 1000, 500)])
    return ThresholdScaler(thresholds, **options)


def sample(at: float = 0.0, **fields: Any) -> LoadSample:
    return LoadSample(at=at, **fields)


# --- the records of hooks.py --------------------------------------------------------------


def test_load_signals_match_the_numeric_fields_of_load_sample() -> None:
    names = tuple(f.name for f in dataclasses.fields(LoadSample))
    assert names[:2] == ("at", "wall_time")
    assert names[2:] == LOAD_SIGNALS


def test_load_sample_is_frozen_keyword_only_and_zero_by_default() -> None:
    s = LoadSample(at=1.0)
    assert s.presences == 0 and s.diff_p99_ms == 0.0 and s.wall_time is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.presences = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        LoadSample(1.0, None)  # type: ignore[call-arg]
    assert LoadSample(at=0, memory_bytes=7).signal("memory_bytes") == 7.0
    with pytest.raises(ValueError, match="unknown load signal 'at'"):
        s.signal("at")


# --- LoadSample checks its fields --------------------------------------------------------------


def one_field(name: str, value: object, at: float = 0.0) -> LoadSample:
    """A sample with ``name`` set to ``value`` (of whatever type) and the rest at their defaults."""
    fields: dict[str, Any] = {name: value}
    return LoadSample(at=at, **fields)


_COUNTS = ("presences", "connections", "topics", "memory_bytes")
_MEASURES = ("ops_per_s", "diff_p50_ms", "diff_p95_ms", "diff_p99_ms", "flush_lag_s")


def test_load_signals_split_into_counts_and_measures() -> None:
    assert sorted(_COUNTS + _MEASURES) == sorted(LOAD_SIGNALS)


@pytest.mark.parametrize("name", LOAD_SIGNALS)
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, PresenceValueError),
        (-1e-9, None),
        (math.nan, None),  # a float: a type error for counts, a value error for measures
        (math.inf, None),
        (-math.inf, None),
        ("10", PresenceTypeError),
        (b"10", PresenceTypeError),
        (None, PresenceTypeError),
        (True, PresenceTypeError),
        (False, PresenceTypeError),
        ([1], PresenceTypeError),
    ],
    ids=repr,
)
def test_load_sample_refuses_bad_signal_values(
    name: str, value: Any, error: type[Exception] | None
) -> None:
    if error is None:
        error = PresenceTypeError if name in _COUNTS else PresenceValueError
    with pytest.raises(error, match=name):
        one_field(name, value, at=0.0)


@pytest.mark.parametrize("name", _COUNTS)
def test_load_sample_counts_stay_ints_of_any_size(name: str) -> None:
    with pytest.raises(PresenceTypeError, match=f"{name} must be an int"):
        one_field(name, 3.0, at=0.0)
    big = one_field(name, 10**400, at=0.0)
    assert getattr(big, name) == 10**400 and type(getattr(big, name)) is int
    # As a float, a count beyond float range reads as the largest float.
    assert big.signal(name) == sys.float_info.max


@pytest.mark.parametrize("name", _MEASURES)
def test_load_sample_measures_become_finite_floats(name: str) -> None:
    s = one_field(name, 7, at=0)
    assert getattr(s, name) == 7.0 and type(getattr(s, name)) is float
    assert type(s.at) is float
    assert getattr(one_field(name, 1e308, at=0.0), name) == 1e308
    with pytest.raises(PresenceValueError, match=f"{name} is out of float range"):
        one_field(name, 10**400, at=0.0)


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"at": math.nan}, PresenceValueError, "at must be finite"),
        ({"at": math.inf}, PresenceValueError, "at must be finite"),
        ({"at": "0"}, PresenceTypeError, "at must be a number"),
        ({"at": True}, PresenceTypeError, "at must be a number"),
        ({"at": None}, PresenceTypeError, "at must be a number"),
        ({"at": 10**400}, PresenceValueError, "at is out of float range"),
        ({"at": 0.0, "wall_time": "2024-06-08T18:00"}, PresenceTypeError, "wall_time"),
        ({"at": 0.0, "wall_time": 1717862400.0}, PresenceTypeError, "wall_time"),
        ({"at": 0.0, "wall_time": JUNE_SATURDAY.date()}, PresenceTypeError, "wall_time"),
    ],
    ids=repr,
)
def test_load_sample_refuses_bad_at_and_wall_time(
    fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        LoadSample(**fields)


def test_load_sample_accepts_negative_clock_readings_and_unknown_signals_are_refused() -> None:
    # ``at`` is a clock reading: a monotonic clock may be negative.
    assert LoadSample(at=-5).at == -5.0
    with pytest.raises(PresenceValueError, match="unknown load signal"):
        LoadSample(at=0).signal("replicas")


def test_scale_decision_checks_itself_and_freezes_its_signals() -> None:
    signals = {"presences": 1.0}
    decision = ScaleDecision("scale_up", 3, 2, "why", signals)
    signals["presences"] = 99.0
    assert decision.signals["presences"] == 1.0
    with pytest.raises(TypeError):
        decision.signals["presences"] = 2.0  # type: ignore[index]
    assert hash(decision) == hash(ScaleDecision("scale_up", 3, 2, "why", {"x": 5.0}))
    with pytest.raises(ValueError, match="scale_up is inconsistent"):
        ScaleDecision("scale_up", 2, 2, "why")
    with pytest.raises(ValueError, match="hold is inconsistent"):
        ScaleDecision("hold", 3, 2, "why")
    with pytest.raises(ValueError, match="action must be one of"):
        ScaleDecision("grow", 3, 2, "why")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="between 0 and 2147483647"):
        ScaleDecision("scale_down", -1, 2, "why")
    with pytest.raises(ValueError, match="desired must be between 0 and 2147483647"):
        ScaleDecision("scale_up", 2**64, 2, "why")  # no JSON or dashboard could carry it


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("scale_up", "3", 2, "why"), PresenceTypeError, "desired must be an int"),
        (("scale_up", 3, 2.0, "why"), PresenceTypeError, "current must be an int"),
        (("hold", True, True, "why"), PresenceTypeError, "desired must be an int"),
        (("scale_down", 1, -2, "why"), PresenceValueError, "current must be between 0 and"),
        (("hold", 2, 2, None), PresenceTypeError, "reason must be a str"),
        (("hold", 2, 2, "why", [("x", 1.0)]), PresenceTypeError, "signals must be a mapping"),
        (("hold", 2, 2, "why", {1: 1.0}), PresenceTypeError, "signal names must be str"),
        (("hold", 2, 2, "why", {"x": "1"}), PresenceTypeError, "signal 'x' must be a number"),
        (("hold", 2, 2, "why", {"x": True}), PresenceTypeError, "signal 'x' must be a number"),
        (("hold", 2, 2, "why", {"x": math.inf}), PresenceValueError, "signal 'x' must be finite"),
        (("hold", 2, 2, "why", {"x": math.nan}), PresenceValueError, "signal 'x' must be finite"),
        (("hold", 2, 2, "why", {"x": 10**400}), PresenceValueError, "out of float range"),
        (("grow", 3, 2, "why"), PresenceValueError, "action must be one of"),
        ((["scale_up"], 3, 2, "why"), PresenceValueError, "action must be one of"),
    ],
    ids=repr,
)
def test_scale_decision_raises_presence_errors(
    args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ScaleDecision(*args)


def test_threshold_scaler_is_a_scaler() -> None:
    assert isinstance(presences_scaler(), Scaler)


# --- thresholds ------------------------------------------------------------------------


def test_threshold_resolves_unit_and_target() -> None:
    assert Threshold("presences", 1000, 500).unit == "per_replica"
    assert Threshold("presences", 1000, 500).target == 1000.0
    assert Threshold("presences", 1000, 500, target=800).target == 800.0
    assert Threshold("diff_p99_ms", 20, 5).unit == "absolute"
    assert Threshold("diff_p99_ms", 20, 5).target is None
    assert Threshold("flush_lag_s", 2, 0.5).unit == "absolute"
    assert Threshold("connections", 10, 1, unit="absolute").unit == "absolute"


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (("replicas", 10, 1), {}, PresenceValueError, "unknown signal 'replicas'"),
        ((None, 10, 1), {}, PresenceTypeError, "signal must be a str"),
        (("presences", 500, 500), {}, PresenceValueError, "hysteresis band"),
        (("presences", 400, 500), {}, PresenceValueError, "must be greater than scale_down_below"),
        (("presences", 1000, -1), {}, PresenceValueError, "scale_down_below must be >= 0"),
        (("presences", math.nan, 1), {}, PresenceValueError, "scale_up_above must be finite"),
        (("presences", math.inf, 1), {}, PresenceValueError, "scale_up_above must be finite"),
        (("presences", 10**400, 1), {}, PresenceValueError, "scale_up_above is out of float"),
        (("presences", True, 0), {}, PresenceTypeError, "scale_up_above must be a number"),
        (("presences", "10", 1), {}, PresenceTypeError, "scale_up_above must be a number"),
        (("presences", 1000, 500), {"unit": "percent"}, PresenceValueError, "unit must be"),
        (("diff_p99_ms", 20, 5), {"target": 10}, PresenceValueError, "target only applies"),
        (
            ("presences", 1000, 500),
            {"target": 500},
            PresenceValueError,
            r"target \(500.0\) must be in",
        ),
        (("presences", 1000, 500), {"target": 1001}, PresenceValueError, "must be in"),
        (("presences", 1000, 500), {"target": "800"}, PresenceTypeError, "target must be"),
    ],
)
def test_threshold_rejects_bad_configuration(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Threshold(*args, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"thresholds": []}, PresenceValueError, "at least one Threshold"),
        (
            {"thresholds": [Threshold("presences", 10, 1), Threshold("presences", 20, 2)]},
            PresenceValueError,
            "two thresholds for signal 'presences'",
        ),
        ({"thresholds": [("presences", 10, 1)]}, PresenceTypeError, "must be Threshold objects"),
        ({"thresholds": Threshold("presences", 10, 1)}, PresenceTypeError, "an iterable"),
        ({"min_replicas": 0}, PresenceValueError, "min_replicas must be between 1 and"),
        (
            {"min_replicas": 4, "max_replicas": 3},
            PresenceValueError,
            r"max_replicas \(3\) must be >=",
        ),
        ({"max_replicas": 2.5}, PresenceTypeError, "max_replicas must be an int"),
        ({"max_replicas": REPLICA_LIMIT + 1}, PresenceValueError, "max_replicas must be between"),
        ({"max_replicas": 10**400}, PresenceValueError, "max_replicas must be between"),
        ({"current": 0}, PresenceValueError, "current must be between 1 and"),
        ({"current": 2**63}, PresenceValueError, "current must be between 1 and"),
        ({"up_cooldown_s": -1.0}, PresenceValueError, "cooldowns must be >= 0"),
        ({"down_cooldown_s": math.inf}, PresenceValueError, "down_cooldown_s must be finite"),
        ({"up_cooldown_s": 10**400}, PresenceValueError, "up_cooldown_s is out of float range"),
        ({"down_stable_samples": 0}, PresenceValueError, "down_stable_samples must be >= 1"),
        ({"up_stable_samples": True}, PresenceTypeError, "up_stable_samples must be an int"),
        ({"max_step": 0}, PresenceValueError, "max_step must be between 1 and"),
        ({"calendar": {6: 2.0}}, PresenceTypeError, "calendar must be a LoadCalendar"),
        ({"calendar_mode": "both"}, PresenceValueError, "calendar_mode must be"),
        ({"sample_scope": "cluster"}, PresenceValueError, "sample_scope must be"),
    ],
)
def test_scaler_rejects_bad_configuration(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        presences_scaler(**kwargs)


def test_current_defaults_to_min_replicas_and_set_current_validates() -> None:
    scaler = ThresholdScaler([Threshold("presences", 10, 1)], min_replicas=3, max_replicas=5)
    assert scaler.current == 3
    scaler.set_current(5)
    assert scaler.current == 5
    with pytest.raises(PresenceValueError, match="replicas must be between 1 and"):
        scaler.set_current(0)
    with pytest.raises(PresenceValueError, match="replicas must be between 1 and"):
        scaler.set_current(REPLICA_LIMIT + 1)
    with pytest.raises(PresenceTypeError, match="replicas must be an int"):
        scaler.set_current(2.0)  # type: ignore[arg-type]
    with pytest.raises(PresenceTypeError, match="replicas must be an int"):
        scaler.set_current(True)


def test_sample_is_checked() -> None:
    scaler = presences_scaler()
    with pytest.raises(PresenceTypeError, match="expected a LoadSample"):
        scaler({"at": 0})  # type: ignore[arg-type]


# --- sizing ------------------------------------------------------------------------------


def test_hold_inside_the_band_says_where_each_signal_is() -> None:
    decision = presences_scaler()(sample(presences=700))
    assert decision.action == "hold"
    assert decision.desired == decision.current == 2
    assert "presences 700/replica within [500, 1,000]" in decision.reason
    assert decision.signals["presences"] == 700.0
    assert decision.signals["replicas"] == 2.0


def test_per_replica_breach_sizes_the_service() -> None:
    decision = presences_scaler()(sample(presences=1500))
    # 1,500 per replica on 2 replicas is 3,000 in all: three replicas of 1,000.
    assert (decision.action, decision.desired, decision.current) == ("scale_up", 3, 2)
    assert "presences 1,500/replica > scale_up_above 1,000" in decision.reason
    assert "ceil(3,000 / 1,000) = 3" in decision.reason


def test_target_below_the_upper_bound_leaves_headroom() -> None:
    scaler = presences_scaler(thresholds=[Threshold("presences", 1000, 500, target=750)])
    assert scaler(sample(presences=1500)).desired == 4  # ceil(3000 / 750)


def test_exact_multiples_do_not_round_up_from_float_noise() -> None:
    scaler = presences_scaler(thresholds=[Threshold("ops_per_s", 0.3, 0.1)], current=1)
    # 0.9 / 0.3 is 3.0000000000000004 in floats; three replicas are enough.
    assert scaler(sample(ops_per_s=0.9)).desired == 3


def test_service_scope_divides_totals_by_replicas() -> None:
    scaler = presences_scaler(sample_scope="service")
    decision = scaler(sample(presences=3000))  # 1,500 per replica on 2
    assert (decision.action, decision.desired) == ("scale_up", 3)
    assert decision.signals["presences"] == 1500.0


def test_absolute_breach_adds_one_replica() -> None:
    scaler = presences_scaler(
        thresholds=[Threshold("presences", 1000, 500), Threshold("diff_p99_ms", 20, 2)]
    )
    decision = scaler(sample(presences=700, diff_p99_ms=35))
    assert (decision.action, decision.desired) == ("scale_up", 3)
    assert "diff_p99_ms 35 > scale_up_above 20, one step up" in decision.reason


def test_the_most_demanding_breach_wins() -> None:
    scaler = presences_scaler(
        thresholds=[Threshold("presences", 1000, 500), Threshold("flush_lag_s", 1, 0.1)]
    )
    decision = scaler(sample(presences=2500, flush_lag_s=5))
    assert decision.desired == 5  # presences need 5; the lag alone would ask for 3
    assert "presences" in decision.reason and "flush_lag_s 5" in decision.reason


def test_max_step_and_max_replicas_limit_a_scale_up() -> None:
    decision = presences_scaler(max_step=2)(sample(presences=5000))
    assert decision.desired == 4
    assert "limited by max_step 2" in decision.reason
    decision = presences_scaler(max_replicas=6)(sample(presences=5000))
    assert decision.desired == 6
    assert "capped at max_replicas 6" in decision.reason
    decision = presences_scaler(max_replicas=2)(sample(presences=5000))
    assert decision.action == "hold"
    assert "already at max_replicas 2" in decision.reason


def test_up_stable_samples_waits_for_a_sustained_breach() -> None:
    scaler = presences_scaler(up_stable_samples=2)
    first = scaler(sample(0, presences=1500))
    assert first.action == "hold" and "breach seen 1/2 samples" in first.reason
    assert scaler(sample(1, presences=1500)).action == "scale_up"
    # A sample without a breach restarts the count.
    scaler = presences_scaler(up_stable_samples=2)
    scaler(sample(0, presences=1500))
    scaler(sample(1, presences=700))
    assert scaler(sample(2, presences=1500)).action == "hold"


# --- hysteresis and cooldowns ------------------------------------------------------------


def test_scale_down_needs_every_signal_below_for_stable_samples() -> None:
    scaler = presences_scaler(
        thresholds=[Threshold("presences", 1000, 500), Threshold("diff_p99_ms", 20, 2)],
        current=5,
        down_stable_samples=3,
    )
    low = {"presences": 100, "diff_p99_ms": 1}
    assert "stable 1/3 samples" in scaler(sample(0, **low)).reason
    assert "stable 2/3 samples" in scaler(sample(1, **low)).reason
    # One signal inside its band breaks the streak, even though the other is low.
    mixed = scaler(sample(2, presences=100, diff_p99_ms=10))
    assert mixed.action == "hold" and "within" in mixed.reason
    assert "stable 1/3 samples" in scaler(sample(3, **low)).reason
    scaler(sample(4, **low))
    decision = scaler(sample(5, **low))
    # Presences alone would allow 1 replica; the latency signal only allows one step at a time.
    assert (decision.action, decision.desired) == ("scale_down", 4)
    assert "all signals below their lower bounds" in decision.reason


def test_scale_down_sizes_to_the_target_and_respects_min_replicas() -> None:
    decision = presences_scaler(current=8)(sample(presences=400))
    assert (decision.action, decision.desired) == ("scale_down", 4)  # ceil(3200 / 1000)
    decision = presences_scaler(current=8, min_replicas=6)(sample(presences=400))
    assert decision.desired == 6 and "floored at min_replicas 6" in decision.reason
    decision = presences_scaler(current=8, max_step=1)(sample(presences=400))
    assert decision.desired == 7 and "limited by max_step 1" in decision.reason
    decision = presences_scaler(current=2, min_replicas=2)(sample(presences=100))
    assert decision.action == "hold" and "already at min_replicas 2" in decision.reason


def test_no_scale_down_that_the_next_sample_would_undo() -> None:
    scaler = presences_scaler(thresholds=[Threshold("presences", 1000, 900)], current=3)
    # 850 per replica is below 900, but 2,550 in all still needs 3 replicas of 1,000.
    decision = scaler(sample(presences=850))
    assert decision.action == "hold"
    assert "still needs 3 replicas" in decision.reason


def test_up_cooldown_runs_from_the_decision() -> None:
    scaler = presences_scaler(up_cooldown_s=60.0)
    assert scaler(sample(100.0, presences=1500)).action == "scale_up"
    scaler.set_current(3)
    held = scaler(sample(130.0, presences=1500))
    assert held.action == "hold"
    assert "scale_up cooling down, 30 s left" in held.reason
    assert "presences 1,500/replica > scale_up_above 1,000" in held.reason
    assert scaler(sample(160.0, presences=1500)).action == "scale_up"


def test_down_cooldown_follows_a_scale_up() -> None:
    scaler = presences_scaler(down_cooldown_s=300.0)
    scaler(sample(0.0, presences=1500))
    scaler.set_current(3)
    held = scaler(sample(100.0, presences=100))
    assert held.action == "hold" and "scale_down cooling down, 200 s left" in held.reason
    assert scaler(sample(300.0, presences=100)).action == "scale_down"


def test_a_clock_going_backwards_stays_in_cooldown() -> None:
    scaler = presences_scaler(up_cooldown_s=10.0)
    scaler(sample(100.0, presences=1500))
    assert "cooling down" in scaler(sample(50.0, presences=1500)).reason


def test_unapplied_decisions_are_not_assumed() -> None:
    scaler = presences_scaler(up_cooldown_s=0.0)
    scaler(sample(0.0, presences=1500))
    # The host has not called set_current: the scaler still judges against 2 replicas.
    assert scaler.current == 2
    again = scaler(sample(1.0, presences=1500))
    assert (again.current, again.desired) == (2, 3)


def test_set_current_restarts_the_hysteresis_count() -> None:
    scaler = presences_scaler(current=5, down_stable_samples=2)
    scaler(sample(0, presences=100))
    scaler.set_current(4)
    assert "stable 1/2 samples" in scaler(sample(1, presences=100)).reason
    scaler.set_current(4)  # unchanged: the count continues
    assert scaler(sample(2, presences=100)).action == "scale_down"


def test_counts_outside_the_bounds_are_corrected_at_once() -> None:
    scaler = presences_scaler(min_replicas=3, current=3, up_cooldown_s=600.0)
    scaler(sample(0.0, presences=2000))  # starts a cooldown
    scaler.set_current(1)  # replicas crashed
    decision = scaler(sample(1.0, presences=700))
    assert (decision.action, decision.desired) == ("scale_up", 3)
    assert "below min_replicas 3" in decision.reason
    scaler.set_current(1)
    # Coming up from below, a breach may ask for more than the floor.
    assert scaler(sample(2.0, presences=5000)).desired == 5
    scaler.set_current(12)
    decision = scaler(sample(3.0, presences=700))
    assert (decision.action, decision.desired) == ("scale_down", 10)
    assert "above max_replicas 10" in decision.reason


def test_every_signal_votes() -> None:
    scaler = presences_scaler(
        thresholds=[Threshold("presences", 1000, 500), Threshold("diff_p99_ms", 20, 2)],
        current=4,
    )
    # An idle latency histogram reads 0.0 (see Metrics.quantile): low, so it allows a scale-down.
    decision = scaler(sample(presences=100))
    assert decision.action == "scale_down"
    decision = scaler(sample(presences=100, diff_p99_ms=10))
    assert decision.action == "hold" and "diff_p99_ms 10 within [2, 20]" in decision.reason


# --- the calendar ------------------------------------------------------------------------


def test_calendar_multiplies_its_three_axes_and_defaults_to_one() -> None:
    calendar = LoadCalendar(months={6: 2.0}, weekdays={5: 1.5}, hours={18: 3.0})
    assert calendar.multiplier(JUNE_SATURDAY.replace(hour=18)) == pytest.approx(9.0)
    assert calendar.multiplier(JUNE_SATURDAY.replace(hour=10)) == pytest.approx(3.0)
    assert calendar.multiplier(JANUARY_WEDNESDAY.replace(hour=18)) == pytest.approx(3.0)
    assert calendar.multiplier(JANUARY_WEDNESDAY) == 1.0
    assert LoadCalendar().multiplier(JUNE_SATURDAY) == 1.0
    assert LoadCalendar().lead == timedelta(0)


def test_wedding_season_example() -> None:
    calendar = LoadCalendar.wedding_season()
    assert calendar.lead == timedelta(hours=1)
    # At the same weekday and hour, every peak month is busier than every quiet month.
    noon = {
        month: calendar.multiplier(_first_wednesday(month).replace(hour=12))
        for month in range(1, 13)
    }
    assert min(noon[m] for m in (5, 6, 9, 10)) > max(noon[m] for m in (1, 2, 3, 4, 7, 8, 11, 12))
    # 17:00-20:00 is the daily peak, every day of the week.
    for day in range(3, 10):  # 2024-06-03 is a Monday
        evening = calendar.multiplier(datetime(2024, 6, day, 18))
        midday = calendar.multiplier(datetime(2024, 6, day, 12))
        assert evening > midday
    assert calendar.multiplier(JUNE_SATURDAY.replace(hour=18)) == pytest.approx(1.8 * 1.4 * 2.2)
    assert calendar.multiplier(JANUARY_WEDNESDAY.replace(hour=10)) == 1.0


def _first_wednesday(month: int) -> datetime:
    day = datetime(2024, month, 1)
    return day + timedelta(days=(2 - day.weekday()) % 7)


def test_peak_looks_ahead_by_lead() -> None:
    calendar = LoadCalendar(hours={17: 2.0}, lead=timedelta(hours=1))
    assert calendar.peak(JANUARY_WEDNESDAY.replace(hour=16, minute=30)) == 2.0
    assert calendar.peak(JANUARY_WEDNESDAY.replace(hour=16, minute=0)) == 2.0  # 17:00 included
    assert calendar.peak(JANUARY_WEDNESDAY.replace(hour=15, minute=30)) == 1.0
    assert calendar.peak(JANUARY_WEDNESDAY.replace(hour=15, minute=30), timedelta(hours=2)) == 2.0
    assert calendar.peak(JANUARY_WEDNESDAY.replace(hour=16, minute=30), timedelta(0)) == 1.0
    # Looking ahead crosses midnight and month ends.
    may = LoadCalendar(months={5: 1.5}, lead=3600.0)
    assert may.peak(datetime(2024, 4, 30, 23, 30)) == 1.5
    assert may.multiplier(datetime(2024, 4, 30, 23, 30)) == 1.0
    with pytest.raises(ValueError, match="lead must be between"):
        may.peak(JANUARY_WEDNESDAY, timedelta(days=8))


def test_calendar_reads_hours_in_its_own_zone() -> None:
    plus_two = timezone(timedelta(hours=2))
    calendar = LoadCalendar(hours={18: 2.0}, tz=plus_two)
    utc_16 = datetime(2024, 1, 10, 16, tzinfo=UTC)
    assert calendar.multiplier(utc_16) == 2.0  # 18:00 at +02:00
    assert calendar.multiplier(datetime(2024, 1, 10, 18)) == 2.0  # naive: already local
    assert LoadCalendar(hours={18: 2.0}).multiplier(utc_16) == 1.0
    assert calendar.tz is plus_two


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"months": {0: 2.0}}, ValueError, r"months: keys must be ints in 1\.\.12"),
        ({"months": {13: 2.0}}, ValueError, "months: keys"),
        ({"weekdays": {7: 2.0}}, ValueError, r"weekdays: keys must be ints in 0\.\.6"),
        ({"hours": {24: 2.0}}, ValueError, r"hours: keys must be ints in 0\.\.23"),
        ({"hours": {True: 2.0}}, ValueError, "hours: keys"),
        ({"hours": {"18": 2.0}}, ValueError, "hours: keys"),
        ({"hours": {18: 0.0}}, ValueError, "multiplier must be positive"),
        ({"hours": {18: -1.0}}, ValueError, "multiplier must be positive"),
        ({"hours": {18: math.nan}}, ValueError, r"hours\[18\] must be finite"),
        ({"hours": {18: True}}, PresenceTypeError, r"hours\[18\] must be a number"),
        ({"hours": [2.0]}, TypeError, "hours must be a mapping"),
        ({"lead": timedelta(hours=-1)}, ValueError, "lead must be between"),
        ({"lead": timedelta(days=8)}, ValueError, "lead must be between"),
        ({"lead": "1h"}, TypeError, "lead must be a timedelta"),
        ({"lead": True}, PresenceTypeError, "lead must be a timedelta"),
        ({"lead": math.inf}, PresenceValueError, "lead must be finite"),
        ({"lead": -1}, PresenceValueError, "lead must be between"),
        # timedelta(seconds=1e300) itself overflows: refused before it is built.
        ({"lead": 1e300}, PresenceValueError, "lead must be between"),
        ({"lead": 10**400}, PresenceValueError, "lead is out of float range"),
        ({"tz": "Europe/Berlin"}, TypeError, "tz must be a datetime.tzinfo"),
        # Each multiplier is finite, but an hour's product is not.
        ({"months": {6: 1e200}, "hours": {18: 1e200}}, PresenceValueError, r"= inf"),
        ({"months": {6: 1e-200}, "hours": {18: 1e-200}}, PresenceValueError, r"= 0\.0"),
    ],
)
def test_calendar_rejects_bad_specs(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as raised:
        LoadCalendar(**kwargs)
    assert isinstance(raised.value, PresenceError)


def test_calendar_rejects_non_datetimes_and_bad_leads() -> None:
    with pytest.raises(PresenceTypeError, match="expected a datetime"):
        LoadCalendar().multiplier(12)  # type: ignore[arg-type]
    with pytest.raises(PresenceTypeError, match="lead must be a timedelta"):
        LoadCalendar().peak(JANUARY_WEDNESDAY, "1h")  # type: ignore[arg-type]
    with pytest.raises(PresenceValueError, match="lead must be between"):
        LoadCalendar().peak(JANUARY_WEDNESDAY, timedelta(hours=-1))


def test_scaler_pre_scales_before_the_evening_peak() -> None:
    scaler = presences_scaler(calendar=LoadCalendar.wedding_season())
    # 16:30 on a June Saturday: 700 per replica is inside the band today, but 17:00 is expected
    # to bring twice the load, so capacity is added now.
    decision = scaler(sample(presences=700, wall_time=JUNE_SATURDAY.replace(hour=16, minute=30)))
    assert (decision.action, decision.desired) == ("scale_up", 3)  # ceil(2 * 1400 / 1000)
    assert "700 x calendar 2" in decision.reason
    assert "calendar x2 (peak" in decision.reason
    assert decision.signals["calendar_factor"] == pytest.approx(2.0)


def test_relative_calendar_does_not_count_the_current_peak_twice() -> None:
    scaler = presences_scaler(calendar=LoadCalendar.wedding_season(lead=timedelta(minutes=30)))
    # 18:10: the observed load already is the peak load; looking 30 min ahead stays at 18:00.
    decision = scaler(sample(presences=700, wall_time=JUNE_SATURDAY.replace(hour=18, minute=10)))
    assert decision.action == "hold"
    assert decision.signals["calendar_factor"] == 1.0


def test_absolute_calendar_multiplies_by_the_peak_multiplier() -> None:
    calendar = LoadCalendar(hours={18: 2.0})
    scaler = presences_scaler(calendar=calendar, calendar_mode="absolute")
    decision = scaler(sample(presences=700, wall_time=JANUARY_WEDNESDAY.replace(hour=18)))
    assert (decision.action, decision.desired) == ("scale_up", 3)
    assert "peak multiplier within lead" in decision.reason


def test_calendar_applies_to_load_not_to_latency() -> None:
    scaler = presences_scaler(
        thresholds=[Threshold("diff_p99_ms", 20, 2)],
        calendar=LoadCalendar(hours={18: 10.0}, lead=timedelta(hours=1)),
    )
    decision = scaler(sample(diff_p99_ms=10, wall_time=JANUARY_WEDNESDAY.replace(hour=17)))
    assert decision.action == "hold"
    assert decision.signals["diff_p99_ms"] == 10.0


def test_calendar_is_skipped_without_wall_time() -> None:
    scaler = presences_scaler(calendar=LoadCalendar.wedding_season())
    decision = scaler(sample(presences=700))
    assert decision.action == "hold"
    assert "calendar skipped: sample has no wall_time" in decision.reason


# --- every decision explains itself ------------------------------------------------------

_SIGNAL_VALUES = st.floats(min_value=0, max_value=1e7)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=120),  # seconds since the previous sample
            st.integers(min_value=0, max_value=10**7),  # presences
            _SIGNAL_VALUES,  # diff latency
            st.integers(min_value=1, max_value=12),  # replicas the host reports
            st.booleans(),  # whether the host reports at all
        ),
        max_size=40,
    ),
    hour=st.integers(min_value=0, max_value=23),
)
def test_every_decision_is_consistent_and_has_a_reason(
    steps: list[tuple[float, int, float, int, bool]], hour: int
) -> None:
    scaler = ThresholdScaler(
        [
            Threshold("presences", 1000, 400, target=800),
            Threshold("diff_p99_ms", 20, 2),
            Threshold("flush_lag_s", 1, 0.1),
        ],
        min_replicas=2,
        max_replicas=10,
        up_cooldown_s=30,
        down_cooldown_s=120,
        down_stable_samples=2,
        max_step=3,
        calendar=LoadCalendar.wedding_season(),
    )
    at = 0.0
    for gap, presences, latency, replicas, report in steps:
        at += gap
        wall_time = JUNE_SATURDAY.replace(hour=hour) + timedelta(seconds=at)
        current = scaler.current
        decision = scaler(
            LoadSample(
                at=at,
                wall_time=wall_time,
                presences=presences,
                diff_p99_ms=latency,
                flush_lag_s=0.5,
            )
        )
        assert decision is not None
        assert decision.current == current
        assert decision.reason.startswith(
            f"hold at {current}:" if decision.action == "hold" else f"{decision.action} {current}"
        )
        assert len(decision.reason) > 20
        if decision.action != "hold":
            assert 2 <= decision.desired <= 10
            # max_step binds everything but a correction into the configured bounds.
            if 2 <= current <= 10:
                assert abs(decision.desired - current) <= 3
        if report:
            scaler.set_current(replicas)


# --- extreme numbers: every valid sample gets a decision -----------------------------------------

FLOAT_MAX = sys.float_info.max


@pytest.mark.parametrize(
    "fields",
    [
        {"presences": 2**1023},
        {"presences": 2**1024},  # beyond float range
        {"presences": 10**400},
        {"memory_bytes": 10**4000},
        {"ops_per_s": 1e308},
        {"ops_per_s": FLOAT_MAX, "diff_p99_ms": FLOAT_MAX, "flush_lag_s": FLOAT_MAX},
        {"connections": 2**2000, "topics": 2**2000},
        {"ops_per_s": 5e-324},
    ],
    ids=repr,
)
@pytest.mark.parametrize("scope", ["replica", "service"])
def test_extreme_samples_get_a_decision(fields: dict[str, Any], scope: Any) -> None:
    thresholds = [
        Threshold("presences", 1000, 500),
        Threshold("connections", FLOAT_MAX, 1e-300, target=1e-300 * 2),
        Threshold("topics", 1e-300, 0, target=5e-324),
        Threshold("ops_per_s", 1e308, 0.5),
        Threshold("memory_bytes", 2**60, 0),
        Threshold("diff_p99_ms", FLOAT_MAX, 1),
        Threshold("flush_lag_s", 1, 0.1),
    ]
    for max_replicas in (10, REPLICA_LIMIT):
        scaler = ThresholdScaler(
            thresholds,
            max_replicas=max_replicas,
            current=3,
            up_cooldown_s=FLOAT_MAX,
            sample_scope=scope,
            calendar=LoadCalendar(months={6: FLOAT_MAX}, hours={3: 1e-300}, lead=3600),
        )
        for hour in (2, 3, 18):
            decision = scaler(
                sample(at=FLOAT_MAX, wall_time=JUNE_SATURDAY.replace(hour=hour), **fields)
            )
            assert isinstance(decision, ScaleDecision)
            assert all(math.isfinite(v) for v in decision.signals.values())
            assert 1 <= decision.desired <= max_replicas


def test_a_huge_load_saturates_at_the_replica_limit() -> None:
    scaler = presences_scaler(max_replicas=REPLICA_LIMIT, current=1)
    decision = scaler(sample(presences=10**400))
    assert (decision.action, decision.desired) == ("scale_up", REPLICA_LIMIT)
    assert "saturated at REPLICA_LIMIT" in decision.reason
    assert decision.signals["presences"] == FLOAT_MAX
    # ...and with the usual ceiling, max_replicas caps it as always.
    decision = presences_scaler(current=1)(sample(presences=10**400))
    assert decision.desired == 10 and "capped at max_replicas 10" in decision.reason


def test_a_calendar_ratio_beyond_float_range_saturates() -> None:
    # Every hour's multiplier is finite, but peak / now is not: 1e300 / 1e-300.
    calendar = LoadCalendar(hours={3: 1e-300, 4: 1e300}, lead=timedelta(hours=1))
    scaler = presences_scaler(calendar=calendar)
    decision = scaler(sample(presences=1, wall_time=JANUARY_WEDNESDAY.replace(hour=3, minute=30)))
    assert decision.signals["calendar_factor"] == FLOAT_MAX
    assert (decision.action, decision.desired) == ("scale_up", 10)


@pytest.mark.parametrize(
    "wall_time",
    [
        datetime.max,
        datetime.min,
        datetime.max.replace(tzinfo=UTC),
        datetime.min.replace(tzinfo=UTC),
        datetime.max.replace(tzinfo=timezone(timedelta(hours=-23, minutes=-59))),
        datetime.min.replace(tzinfo=timezone(timedelta(hours=23, minutes=59))),
    ],
    ids=repr,
)
@pytest.mark.parametrize("tz", [None, UTC, timezone(timedelta(hours=14))], ids=repr)
def test_wall_times_at_the_ends_of_the_calendar_get_a_decision(
    wall_time: datetime, tz: Any
) -> None:
    calendar = LoadCalendar.wedding_season(lead=timedelta(days=7), tz=tz)
    for mode in ("relative", "absolute"):
        scaler = presences_scaler(calendar=calendar, calendar_mode=mode)
        assert isinstance(scaler(sample(presences=700, wall_time=wall_time)), ScaleDecision)
    assert calendar.peak(wall_time) >= 1.0


_counts = st.one_of(
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0),
    st.sampled_from([2**1023, 2**1024, 10**400]),
)
_measures = st.one_of(
    st.floats(min_value=0, max_value=1e4),
    st.floats(min_value=0, allow_infinity=False),
    st.sampled_from([FLOAT_MAX, 1e308, 5e-324]),
)
_offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
_wall_times = st.none() | st.datetimes() | st.datetimes(timezones=_offsets)
_samples = st.builds(
    LoadSample,
    at=st.floats(allow_nan=False, allow_infinity=False),
    wall_time=_wall_times,
    **{name: _counts for name in _COUNTS},
    **{name: _measures for name in _MEASURES},
)
_multipliers = st.one_of(
    st.floats(min_value=1e-3, max_value=1e3),
    st.floats(min_value=5e-324, allow_infinity=False),
    st.sampled_from([5e-324, 1e-300, FLOAT_MAX, 1e300]),
)


@st.composite
def _calendars(draw: st.DrawFn) -> LoadCalendar | None:
    if draw(st.booleans()):
        return None
    months = draw(st.dictionaries(st.integers(1, 12), _multipliers, max_size=3))
    weekdays = draw(st.dictionaries(st.integers(0, 6), _multipliers, max_size=3))
    hours = draw(st.dictionaries(st.integers(0, 23), _multipliers, max_size=3))
    lead = draw(st.floats(min_value=0, max_value=7 * 86400))
    tz = draw(st.none() | _offsets)
    try:
        return LoadCalendar(months, weekdays, hours, lead=lead, tz=tz)
    except PresenceValueError:
        # An hour whose multipliers multiply out of float range: refused, as it should be.
        return LoadCalendar(months, lead=lead, tz=tz)


_UNITS: tuple[ThresholdUnit | None, ...] = (None, "per_replica", "absolute")


@st.composite
def _thresholds(draw: st.DrawFn) -> list[Threshold]:
    names = draw(st.lists(st.sampled_from(LOAD_SIGNALS), min_size=1, max_size=4, unique=True))
    thresholds = []
    for name in names:
        down = draw(st.floats(min_value=0, max_value=FLOAT_MAX / 2))
        up = draw(st.floats(min_value=down, exclude_min=True, allow_infinity=False))
        unit = draw(st.sampled_from(_UNITS))
        thresholds.append(Threshold(name, up, down, unit=unit))
    return thresholds


@st.composite
def _scalers(draw: st.DrawFn) -> ThresholdScaler:
    low = draw(st.integers(1, 5) | st.integers(1, REPLICA_LIMIT))
    high = draw(st.integers(low, min(low + 10, REPLICA_LIMIT)) | st.integers(low, REPLICA_LIMIT))
    return ThresholdScaler(
        draw(_thresholds()),
        min_replicas=low,
        max_replicas=high,
        current=draw(st.integers(1, REPLICA_LIMIT)),
        up_cooldown_s=draw(st.floats(min_value=0, allow_infinity=False)),
        down_cooldown_s=draw(st.floats(min_value=0, allow_infinity=False)),
        down_stable_samples=draw(st.integers(1, 3)),
        max_step=draw(st.none() | st.integers(1, REPLICA_LIMIT)),
        calendar=draw(_calendars()),
        calendar_mode=draw(st.sampled_from(["relative", "absolute"])),
        sample_scope=draw(st.sampled_from(["replica", "service"])),
    )


@settings(max_examples=300, deadline=None)
@given(
    scaler=_scalers(),
    steps=st.lists(st.tuples(_samples, st.none() | st.integers(1, REPLICA_LIMIT)), max_size=8),
)
def test_any_valid_sample_gets_a_decision_never_an_exception(
    scaler: ThresholdScaler, steps: list[tuple[LoadSample, int | None]]
) -> None:
    for load, reported in steps:
        current = scaler.current
        decision = scaler(load)
        assert isinstance(decision, ScaleDecision)
        assert decision.current == current
        assert all(math.isfinite(v) for v in decision.signals.values())
        if decision.action != "hold":
            assert scaler.min_replicas <= decision.desired <= scaler.max_replicas
        if reported is not None:
            scaler.set_current(reported)
