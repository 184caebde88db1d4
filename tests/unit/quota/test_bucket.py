"""The pure quota bucket: calendar windows in UTC and the lease / credit / offline accounting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from authz.quota.bucket import Bucket, Outcome, window


def ts(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("now", "interval", "unit", "start", "end"),
    [
        (
            ts(2026, 11, 23, 12, 34, 56),
            1,
            "second",
            ts(2026, 11, 23, 12, 34, 56),
            ts(2026, 11, 23, 12, 34, 57),
        ),
        (
            ts(2026, 11, 23, 12, 34, 56) + 0.999,
            1,
            "second",
            ts(2026, 11, 23, 12, 34, 56),
            ts(2026, 11, 23, 12, 34, 57),
        ),
        (ts(2026, 11, 23, 12, 34, 56), 1, "minute", ts(2026, 11, 23, 12, 34), ts(2026, 11, 23, 12, 35)),
        (ts(2026, 11, 23, 12, 34, 56), 5, "minute", ts(2026, 11, 23, 12, 30), ts(2026, 11, 23, 12, 35)),
        (ts(2026, 11, 23, 12, 35), 5, "minute", ts(2026, 11, 23, 12, 35), ts(2026, 11, 23, 12, 40)),
        (ts(2026, 11, 23, 12, 34, 56), 1, "hour", ts(2026, 11, 23, 12), ts(2026, 11, 23, 13)),
        (ts(2026, 11, 23, 23, 59, 59), 1, "day", ts(2026, 11, 23), ts(2026, 11, 24)),
        # days counted from 2019-01-01: 2026-11-23 is day 2883, so 3-day windows start on day 2883
        (ts(2026, 11, 24, 8), 3, "day", ts(2026, 11, 23), ts(2026, 11, 26)),
        (ts(2026, 1, 31, 23, 59, 59), 1, "month", ts(2026, 1, 1), ts(2026, 2, 1)),
        (ts(2026, 2, 28, 12), 1, "month", ts(2026, 2, 1), ts(2026, 3, 1)),  # 28 days
        (ts(2024, 2, 29, 12), 1, "month", ts(2024, 2, 1), ts(2024, 3, 1)),  # leap year: 29 days
        (ts(2026, 12, 31, 23, 59, 59), 1, "month", ts(2026, 12, 1), ts(2027, 1, 1)),  # year end
        (ts(2024, 2, 10), 2, "month", ts(2024, 1, 1), ts(2024, 3, 1)),  # months counted from 2019-01
        (ts(2026, 11, 23), 12, "month", ts(2026, 1, 1), ts(2027, 1, 1)),
        (ts(2018, 12, 31, 23, 59, 30), 1, "minute", ts(2018, 12, 31, 23, 59), ts(2019, 1, 1)),  # before 2019
        (ts(2018, 11, 15), 1, "month", ts(2018, 11, 1), ts(2018, 12, 1)),
    ],
)
def test_windows_are_utc_calendar_windows(
    now: float, interval: int, unit: str, start: float, end: float
) -> None:
    assert window(now, interval, unit) == (start, end)


@pytest.mark.parametrize(("interval", "unit"), [(1, "week"), (1, "Minute"), (0, "minute"), (-1, "day")])
def test_an_unknown_unit_or_interval_below_one_is_refused(interval: int, unit: str) -> None:
    with pytest.raises(ValueError):
        window(ts(2026, 1, 1), interval, unit)


T0 = ts(2026, 11, 23, 12, 0, 10)
END = ts(2026, 11, 23, 12, 1)


def local(limit: int = 3) -> Bucket:
    return Bucket(limit, 1, "minute", T0, remote=False)


def remote(limit: int = 10) -> Bucket:
    return Bucket(limit, 1, "minute", T0, remote=True)


def test_standalone_admits_exactly_the_limit_then_refuses_until_the_window_ends() -> None:
    bucket = local(3)
    answers = [bucket.apply(T0 + i) for i in range(5)]
    assert answers == [
        Outcome(True, 3, 2, END),
        Outcome(True, 3, 1, END),
        Outcome(True, 3, 0, END),
        Outcome(False, 3, 0, END),
        Outcome(False, 3, 0, END),
    ]
    assert bucket.count == 3  # refused requests are not counted
    assert bucket.apply(END - 0.001) == Outcome(False, 3, 0, END)
    assert bucket.apply(END) == Outcome(True, 3, 2, END + 60)  # the next minute starts afresh


def test_a_refund_gives_an_admission_back() -> None:
    bucket = local(1)
    taken = bucket.apply(T0)
    assert taken is not None and taken.allowed
    bucket.refund(T0, taken)
    assert bucket.apply(T0) == Outcome(True, 1, 0, END)
    refused = bucket.apply(T0)
    assert refused == Outcome(False, 1, 0, END)
    bucket.refund(T0, refused)  # a refusal took nothing
    assert bucket.count == 1
    bucket.refund(END, Outcome(True, 1, 0, END))  # from a window that is over: nothing to give back
    assert bucket.count == 1


def test_remote_admits_one_on_credit_then_waits_for_the_sync() -> None:
    bucket = remote(100)
    first = bucket.apply(T0)
    assert first == Outcome(True, 100, 99, END, unsynced=True)
    assert bucket.needs_sync()
    assert bucket.apply(T0) is None  # one unpaid request at a time
    weight = bucket.begin_sync(T0, demand=30)
    assert weight == 1 + 30  # the unpaid request and a reservation for the thirty waiting
    assert not bucket.needs_sync()  # one sync at a time
    assert bucket.apply(T0) is None  # the unpaid one is in flight
    bucket.end_sync(T0 + 0.01, count=31, expiry=END)
    assert (bucket.count, bucket.lease, bucket.offline) == (31, 30, False)
    assert [bucket.apply(T0 + 0.02) for _ in range(3)] == [Outcome(True, 100, r, END) for r in (98, 97, 96)]
    for _ in range(27):
        bucket.apply(T0 + 0.02)
    assert bucket.lease == 0
    assert bucket.apply(T0 + 0.03) == Outcome(True, 100, 68, END, unsynced=True)  # credit again


def test_the_first_reservation_is_for_ten_a_second() -> None:
    bucket = remote(1000)
    bucket.apply(T0)
    assert bucket.begin_sync(T0) == 1 + 10  # one request, measured over at least 0.1 s


def test_the_reservation_follows_the_rate_and_leaves_half_of_what_is_left() -> None:
    bucket = remote(1000)
    bucket.admitted = 30  # thirty requests in the second since the bucket was made
    assert bucket.begin_sync(T0 + 1, reserve=True) == 30
    bucket.end_sync(T0 + 1, count=30, expiry=END)
    bucket.admitted = 2000
    assert bucket.begin_sync(T0 + 2) == (1000 - 30) // 2  # capped at half of the rest
    bucket.end_sync(T0 + 2, count=30 + 485, expiry=END)
    assert bucket.lease == 30 + 485
    bucket.admitted = 0
    assert bucket.begin_sync(T0 + 3, reserve=False) == 0  # an idle refresh only reads the count


def test_a_grant_is_cut_to_what_fits_under_the_limit() -> None:
    bucket = remote(10)
    bucket.apply(T0)
    bucket.begin_sync(T0, demand=4)  # sends 1 + 4
    bucket.end_sync(T0, count=12, expiry=END)  # others took more: 2 over the limit
    assert bucket.lease == 2
    assert bucket.remaining() == 0
    bucket.apply(T0)
    bucket.apply(T0)
    assert bucket.apply(T0) == Outcome(False, 10, 0, END)  # known count at the limit: no credit


def test_an_answer_for_a_window_that_is_over_is_ignored() -> None:
    bucket = remote(10)
    bucket.apply(T0)
    bucket.begin_sync(T0, demand=2)
    bucket.end_sync(END + 1, count=3, expiry=END)
    assert (bucket.count, bucket.lease, bucket.syncing) == (0, 0, False)


def test_apigee_s_window_end_wins_over_the_local_estimate() -> None:
    bucket = remote(10)
    bucket.apply(T0)
    bucket.begin_sync(T0, demand=1)
    bucket.end_sync(T0, count=7, expiry=END + 30)
    assert (bucket.window_end, bucket.count, bucket.lease) == (END + 30, 7, 4)  # reserved (10 - 1) // 2


def test_a_failed_sync_keeps_its_weight_and_enforces_locally() -> None:
    bucket = remote(3)
    bucket.apply(T0)
    bucket.begin_sync(T0, demand=1)
    bucket.fail_sync(T0 + 1)
    assert (bucket.unsynced, bucket.offline, bucket.syncing) == (1, True, False)
    assert bucket.apply(T0 + 1) == Outcome(True, 3, 1, END, unsynced=True)  # offline: no waiting
    assert bucket.apply(T0 + 1) == Outcome(True, 3, 0, END, unsynced=True)
    assert bucket.apply(T0 + 1) == Outcome(False, 3, 0, END)  # the limit still holds locally
    assert bucket.begin_sync(T0 + 2) == 3  # all of it is sent next time, nothing reserved
    bucket.end_sync(T0 + 2, count=3, expiry=END)
    assert not bucket.offline


def test_a_sync_that_fails_after_the_window_ended_drops_the_old_weight() -> None:
    bucket = remote(3)
    bucket.apply(T0)
    bucket.begin_sync(T0)
    assert bucket.apply(END + 1, late=True) == Outcome(True, 3, 2, END + 60, unsynced=True)
    bucket.fail_sync(END + 2)
    assert bucket.unsynced == 1  # only the new window's request


def test_late_admits_on_credit_even_with_one_unpaid() -> None:
    bucket = remote(3)
    bucket.apply(T0)
    assert bucket.apply(T0) is None
    assert bucket.apply(T0, late=True) == Outcome(True, 3, 1, END, unsynced=True)


def test_refund_in_apigee_mode() -> None:
    bucket = remote(10)
    unpaid = bucket.apply(T0)
    assert unpaid is not None
    bucket.refund(T0, unpaid)
    assert bucket.unsynced == 0
    bucket.begin_sync(T0, demand=2)
    bucket.end_sync(T0, count=2, expiry=END)
    leased = bucket.apply(T0)
    assert leased is not None and not leased.unsynced
    bucket.refund(T0, leased)
    assert bucket.lease == 2


def test_the_lease_is_topped_up_when_half_spent() -> None:
    bucket = remote(100)
    bucket.apply(T0)
    bucket.begin_sync(T0)  # reserves 10
    bucket.end_sync(T0, count=11, expiry=END)
    assert not bucket.needs_sync()  # nothing spent yet
    for _ in range(4):
        bucket.apply(T0)
    assert not bucket.needs_sync()  # 6 of 10 left
    bucket.apply(T0)
    assert bucket.needs_sync()  # 5 of 10 left: ask for more before it runs out
    assert not local().needs_sync()  # standalone never syncs


def test_terms() -> None:
    bucket = local(3)
    assert bucket.same_terms(3, 1, "minute")
    assert not bucket.same_terms(4, 1, "minute")
    bucket.apply(T0)
    bucket.change_limit(1)
    assert bucket.apply(T0) == Outcome(False, 1, 0, END)  # the count carried over
