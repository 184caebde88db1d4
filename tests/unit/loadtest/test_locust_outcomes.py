"""loadtest/locust_outcomes.py: how each answer is judged, the tally, and the quota bound (no Locust)."""

from datetime import UTC, datetime

import pytest

from loadtest.locust_outcomes import (
    DEFAULT_WEIGHTS,
    INVALID_KEY,
    JWT_UNIQUE,
    QUOTA,
    VALID_KEY,
    WRONG_PATH,
    Outcome,
    Tally,
    classify,
    expectations,
    failure_message,
    option_env,
    parse_weights,
    quota_bound,
    quota_windows,
)

EXPECT = expectations()


@pytest.mark.parametrize(
    ("scenario", "status", "outcome"),
    [
        (VALID_KEY, 200, Outcome.OK),
        (VALID_KEY, 401, Outcome.WRONG_DENY),
        (VALID_KEY, 403, Outcome.WRONG_DENY),
        (VALID_KEY, 429, Outcome.WRONG_DENY),
        (VALID_KEY, 204, Outcome.WRONG_DENY),  # an allow, but not the upstream's answer
        (VALID_KEY, 503, Outcome.ERROR),
        (VALID_KEY, 0, Outcome.ERROR),  # no response
        (INVALID_KEY, 401, Outcome.OK),
        (INVALID_KEY, 200, Outcome.WRONG_ALLOW),
        (INVALID_KEY, 201, Outcome.WRONG_ALLOW),
        (INVALID_KEY, 403, Outcome.WRONG_STATUS),
        (INVALID_KEY, 503, Outcome.ERROR),
        (WRONG_PATH, 403, Outcome.OK),
        (WRONG_PATH, 200, Outcome.WRONG_ALLOW),
        (WRONG_PATH, 401, Outcome.WRONG_STATUS),
        (WRONG_PATH, 0, Outcome.ERROR),
        (QUOTA, 200, Outcome.OK),
        (QUOTA, 429, Outcome.OK),
        (QUOTA, 403, Outcome.WRONG_DENY),
        (QUOTA, 502, Outcome.ERROR),
    ],
)
def test_each_answer_is_judged_against_its_scenario(scenario, status, outcome):
    assert classify(EXPECT[scenario], status) is outcome


def test_a_deployment_whose_upstream_answers_404_when_allowed_judges_404_as_the_allow():
    expect = expectations(allow_status=404)
    assert classify(expect[VALID_KEY], 404) is Outcome.OK
    assert classify(expect[WRONG_PATH], 404) is Outcome.WRONG_ALLOW
    assert classify(expect[INVALID_KEY], 200) is Outcome.WRONG_ALLOW


def test_failure_messages_name_the_scenario_the_kind_expected_and_got():
    assert (
        failure_message(WRONG_PATH, Outcome.WRONG_ALLOW, EXPECT[WRONG_PATH], 200)
        == "wrong_path: wrong allow: expected 403, got 200"
    )
    assert (
        failure_message(QUOTA, Outcome.ERROR, EXPECT[QUOTA], 0)
        == "quota: error: expected 200 or 429, got no response"
    )


def test_weights_override_the_defaults_and_zero_turns_a_scenario_off():
    weights = parse_weights("valid_key=9, jwt_unique=0")
    assert weights == {**DEFAULT_WEIGHTS, VALID_KEY: 9, JWT_UNIQUE: 0}
    assert parse_weights("") == DEFAULT_WEIGHTS
    for bad in ("nope=1", "valid_key", "valid_key=-1", "valid_key=x"):
        with pytest.raises(ValueError):
            parse_weights(bad)


def test_option_env_is_the_locust_style_variable():
    assert option_env("authz-api-key") == "LOCUST_AUTHZ_API_KEY"


def test_the_tally_counts_per_scenario_and_survives_json_and_merging(tmp_path):
    tally = Tally(enabled=[VALID_KEY, QUOTA])
    tally.record(VALID_KEY, 200, Outcome.OK, 100.0)
    tally.record(VALID_KEY, 403, Outcome.WRONG_DENY, 101.0, "valid_key: wrong deny: expected 200, got 403")
    tally.record(QUOTA, 200, Outcome.OK, 105.0)
    tally.record(QUOTA, 429, Outcome.OK, 103.0)
    tally.tokens_reused = 2
    path = tmp_path / "tally.json"
    tally.write(path)
    back = Tally.read(path)
    assert back == tally
    assert back.requests(VALID_KEY) == 2 and back.wrong(VALID_KEY) == 1 and back.wrong() == 1
    assert (back.quota_first, back.quota_last) == (103.0, 105.0)

    other = Tally(enabled=[WRONG_PATH])
    other.record(WRONG_PATH, 200, Outcome.WRONG_ALLOW, 99.0, "wrong_path: wrong allow: expected 403, got 200")
    other.record(QUOTA, 200, Outcome.OK, 110.0)
    back.merge(other)
    assert back.count(Outcome.WRONG_ALLOW) == 1 and back.wrong() == 2
    assert back.status_count(QUOTA, 200) == 2
    assert (back.quota_first, back.quota_last) == (103.0, 110.0)
    assert back.enabled == sorted([VALID_KEY, QUOTA, WRONG_PATH])
    assert back.failures["wrong_path: wrong allow: expected 403, got 200"] == 1


def test_drain_hands_over_the_counts_and_starts_from_zero():
    tally = Tally(enabled=[VALID_KEY])
    tally.record(VALID_KEY, 200, Outcome.OK, 1.0)
    taken = tally.drain()
    assert taken.requests(VALID_KEY) == 1
    assert tally.requests(VALID_KEY) == 0 and tally.quota_first is None
    assert tally.enabled == [VALID_KEY]  # configuration, not a count


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_quota_windows_are_calendar_windows_counted_from_2019():
    minute = 60.0
    assert quota_windows(epoch("2026-01-05T10:00:00"), epoch("2026-01-05T10:00:59.9"), minute) == 1
    assert quota_windows(epoch("2026-01-05T10:00:55"), epoch("2026-01-05T10:01:03"), minute) == 2
    assert quota_windows(epoch("2026-01-05T10:00:00"), epoch("2026-01-05T10:05:00"), minute) == 6
    # 3-day windows start on 2019-01-01 and every third day after it, not on the epoch's multiples
    assert quota_windows(epoch("2019-01-03T23:00:00"), epoch("2019-01-04T01:00:00"), 3 * 86400) == 2
    with pytest.raises(ValueError):
        quota_windows(0.0, 1.0, 0.0)


def test_the_quota_bound_is_limit_plus_slack_per_window_touched():
    tally = Tally()
    for second in range(55, 65):  # 10:00:55 to 10:01:04: two minute windows
        tally.record(QUOTA, 200, Outcome.OK, epoch("2026-01-05T10:00:00") + second)
    check = quota_bound(tally, limit=5, window=60.0)
    assert (check.windows, check.allowed, check.bound, check.holds) == (2, 10, 10, True)
    tally.record(QUOTA, 200, Outcome.OK, epoch("2026-01-05T10:01:10"))
    assert not quota_bound(tally, limit=5, window=60.0).holds
    assert quota_bound(tally, limit=5, window=60.0, slack=1).holds  # Apigee mode: limit + replicas
    assert quota_bound(Tally(), limit=5, window=60.0).bound == 0
