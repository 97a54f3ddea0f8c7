"""The scaling policy: hysteresis, cooldowns, bounds, the calendar, reasons and configuration."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presence_core.scaling import (
    LOAD_SIGNALS,
    LoadCalendar,
    LoadSample,
    ScaleDecision,
    Threshold,
    ThresholdScaler,
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
    with pytest.raises(ValueError, match=">= 0"):
        ScaleDecision("scale_down", -1, 2, "why")


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
        (("replicas", 10, 1), {}, ValueError, "unknown signal 'replicas'"),
        (("presences", 500, 500), {}, ValueError, "hysteresis band"),
        (("presences", 400, 500), {}, ValueError, "must be greater than scale_down_below"),
        (("presences", 1000, -1), {}, ValueError, "scale_down_below must be >= 0"),
        (("presences", math.nan, 1), {}, ValueError, "scale_up_above must be finite"),
        (("presences", math.inf, 1), {}, ValueError, "scale_up_above must be finite"),
        (("presences", True, 0), {}, TypeError, "scale_up_above must be a number"),
        (("presences", "10", 1), {}, TypeError, "scale_up_above must be a number"),
        (("presences", 1000, 500), {"unit": "percent"}, ValueError, "unit must be"),
        (("diff_p99_ms", 20, 5), {"target": 10}, ValueError, "target only applies"),
        (("presences", 1000, 500), {"target": 500}, ValueError, r"target \(500.0\) must be in"),
        (("presences", 1000, 500), {"target": 1001}, ValueError, "must be in"),
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
        ({"thresholds": []}, ValueError, "at least one Threshold"),
        (
            {"thresholds": [Threshold("presences", 10, 1), Threshold("presences", 20, 2)]},
            ValueError,
            "two thresholds for signal 'presences'",
        ),
        ({"thresholds": [("presences", 10, 1)]}, TypeError, "must be Threshold objects"),
        ({"min_replicas": 0}, ValueError, "min_replicas must be >= 1"),
        ({"min_replicas": 4, "max_replicas": 3}, ValueError, r"max_replicas \(3\) must be >="),
        ({"max_replicas": 2.5}, TypeError, "max_replicas must be an int"),
        ({"current": 0}, ValueError, "current must be >= 1"),
        ({"up_cooldown_s": -1.0}, ValueError, "cooldowns must be >= 0"),
        ({"down_cooldown_s": math.inf}, ValueError, "down_cooldown_s must be finite"),
        ({"down_stable_samples": 0}, ValueError, "down_stable_samples must be >= 1"),
        ({"up_stable_samples": True}, TypeError, "up_stable_samples must be an int"),
        ({"max_step": 0}, ValueError, "max_step must be >= 1"),
        ({"calendar": {6: 2.0}}, TypeError, "calendar must be a LoadCalendar"),
        ({"calendar_mode": "both"}, ValueError, "calendar_mode must be"),
        ({"sample_scope": "cluster"}, ValueError, "sample_scope must be"),
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
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        scaler.set_current(0)
    with pytest.raises(TypeError, match="replicas must be an int"):
        scaler.set_current(2.0)  # type: ignore[arg-type]


def test_sample_is_checked() -> None:
    scaler = presences_scaler()
    with pytest.raises(TypeError, match="expected a LoadSample"):
        scaler({"at": 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample.at must be finite"):
        scaler(sample(at=math.nan))


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


def test_signals_without_data_do_not_vote() -> None:
    scaler = presences_scaler(
        thresholds=[Threshold("presences", 1000, 500), Threshold("diff_p99_ms", 20, 2)],
        current=4,
    )
    decision = scaler(sample(presences=100, diff_p99_ms=math.nan))
    assert decision.action == "scale_down"
    assert "no data for diff_p99_ms" in decision.reason
    nothing = scaler(sample(presences=math.nan, diff_p99_ms=math.inf))
    assert nothing.action == "hold" and "no signal has data" in nothing.reason


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
        ({"hours": [2.0]}, TypeError, "hours must be a mapping"),
        ({"lead": timedelta(hours=-1)}, ValueError, "lead must be between"),
        ({"lead": timedelta(days=8)}, ValueError, "lead must be between"),
        ({"lead": "1h"}, TypeError, "lead must be a timedelta"),
        ({"lead": math.inf}, TypeError, "lead must be a timedelta"),
        ({"tz": "Europe/Berlin"}, TypeError, "tz must be a datetime.tzinfo"),
    ],
)
def test_calendar_rejects_bad_specs(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        LoadCalendar(**kwargs)


def test_calendar_rejects_non_datetimes() -> None:
    with pytest.raises(TypeError, match="expected a datetime"):
        LoadCalendar().multiplier(12)  # type: ignore[arg-type]


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

_SIGNAL_VALUES = st.one_of(
    st.floats(min_value=0, max_value=1e7, allow_nan=False), st.just(math.nan)
)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=120),  # seconds since the previous sample
            _SIGNAL_VALUES,
            _SIGNAL_VALUES,
            st.integers(min_value=1, max_value=12),  # replicas the host reports
            st.booleans(),  # whether the host reports at all
        ),
        max_size=40,
    ),
    hour=st.integers(min_value=0, max_value=23),
)
def test_every_decision_is_consistent_and_has_a_reason(
    steps: list[tuple[float, float, float, int, bool]], hour: int
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
                presences=presences,  # type: ignore[arg-type]
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
