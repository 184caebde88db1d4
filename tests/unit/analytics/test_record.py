import dataclasses
import json
import math

import pytest

from authz.analytics import record as rec
from authz.analytics.record import AccessEntry, Record

START = 1_700_000_000_000
FLOW = "8f2b…uuid"

OURS = {
    "x-apigee-organization": "org",
    "x-apigee-environment": "test",
    "x-apigee-api": "httpbin.org",
    "x-apigee-application": "httpbin-app",
    "x-apigee-developeremail": "integration@test.com",
    "x-apigee-clientid": "yBQ5eX…",
    "x-apigee-analytics-product": "httpbin-product",
    "x-apigee-apiproducts": "httpbin-product,other",
    "x-apigee-scope": "",
    "x-apigee-authorized": "true",
}

# The example line of apigee-adapter.md §3.4, byte for byte.
REFERENCE_LINE = (
    '{"api_product":"httpbin-product","apiproxy":"httpbin.org","apiproxy_revision":0,"client_id":"yBQ5eX…",'
    '"client_ip":"10.0.0.7","client_received_end_timestamp":1700000000007,"client_received_start_timestamp":1700000000000,'
    '"client_sent_end_timestamp":1700000000031,"client_sent_start_timestamp":1700000000030,"dc.tier":"gold",'
    '"developer_app":"httpbin-app","developer_email":"integration@test.com","environment":"test",'
    '"gateway_flow_id":"8f2b…uuid","gateway_source":"envoy","organization":"org","recordType":"APIAnalytics",'
    '"request_path":"/headers","request_uri":"/headers?x=1","request_verb":"GET","response_status_code":200,'
    '"target_received_end_timestamp":1700000000029,"target_received_start_timestamp":1700000000020,'
    '"target_sent_end_timestamp":1700000000008,"target_sent_start_timestamp":1700000000008,"useragent":"curl/8.0"}\n'
).encode()


def allowed_entry(**changes):
    entry = AccessEntry(
        start_ms=START,
        last_rx_ms=7,
        first_upstream_tx_ms=8,
        last_upstream_tx_ms=8,
        first_upstream_rx_ms=20,
        last_upstream_rx_ms=29,
        first_downstream_tx_ms=30,
        last_downstream_tx_ms=31,
        method="GET",
        path="/headers?x=1",
        user_agent="curl/8.0",
        forwarded_for="10.0.0.7, 192.168.1.1",
        status=200,
        authz=OURS,
        data_capture={"tier": "gold"},
        request_headers={"x-request-id": "r1"},
        downstream_ip="192.168.1.1",
    )
    return dataclasses.replace(entry, **changes)


def a_record(**changes):
    record = rec.from_access(allowed_entry(), FLOW)
    assert record is not None
    return dataclasses.replace(record, **changes)


def test_reference_example_line():
    assert rec.to_json_line(a_record()) == REFERENCE_LINE


def test_from_access_maps_every_field():
    assert a_record() == Record(
        client_received_start_timestamp=START,
        client_received_end_timestamp=START + 7,
        target_sent_start_timestamp=START + 8,
        target_sent_end_timestamp=START + 8,
        target_received_start_timestamp=START + 20,
        target_received_end_timestamp=START + 29,
        client_sent_start_timestamp=START + 30,
        client_sent_end_timestamp=START + 31,
        apiproxy="httpbin.org",
        request_uri="/headers?x=1",
        request_path="/headers",
        request_verb="GET",
        client_ip="10.0.0.7",
        useragent="curl/8.0",
        response_status_code=200,
        developer_email="integration@test.com",
        developer_app="httpbin-app",
        access_token="",
        client_id="yBQ5eX…",
        api_product="httpbin-product",
        organization="org",
        environment="test",
        gateway_flow_id=FLOW,
        attributes={"tier": "gold"},
    )


def test_entries_without_our_metadata_are_skipped():
    assert rec.from_access(allowed_entry(authz={}), FLOW) is None
    # Other filters' string fields in the namespace do not make an entry ours.
    assert rec.from_access(allowed_entry(authz={"x-apigee-api": "a"}), FLOW) is None


def test_only_the_organization_is_needed_to_make_a_record():
    record = rec.from_access(allowed_entry(authz={"x-apigee-organization": "org"}), FLOW)
    assert record is not None
    assert (record.environment, record.apiproxy, record.developer_app, record.api_product) == ("", "", "", "")
    assert rec.validate(record, START) == rec.MISSING_ENV


def test_access_token_from_metadata():
    record = rec.from_access(allowed_entry(authz={**OURS, "x-apigee-accesstoken": "tok"}), FLOW)
    assert record is not None and record.access_token == "tok"


def test_missing_durations():
    """No upstream contacted (a local reply): no target timestamps; client ones fall back to the start."""
    entry = AccessEntry(start_ms=START, authz=OURS, method="GET", path="/", status=404)
    record = rec.from_access(entry, FLOW)
    assert record is not None
    assert record.client_received_start_timestamp == START
    assert record.client_received_end_timestamp == START
    assert record.client_sent_start_timestamp == START
    assert record.client_sent_end_timestamp == START
    assert record.target_sent_start_timestamp == 0
    assert record.target_sent_end_timestamp == 0
    assert record.target_received_start_timestamp == 0
    assert record.target_received_end_timestamp == 0
    line = json.loads(rec.to_json_line(record))
    assert not [key for key in line if key.startswith("target_")]
    assert rec.validate(record, START) is None


def test_zero_durations_are_not_missing():
    record = rec.from_access(allowed_entry(first_upstream_tx_ms=0, last_rx_ms=0), FLOW)
    assert record is not None
    assert record.target_sent_start_timestamp == START
    assert record.client_received_end_timestamp == START


@pytest.mark.parametrize(
    ("forwarded_for", "downstream_ip", "client_ip"),
    [
        ("10.0.0.7", "192.168.1.1", "10.0.0.7"),
        ("10.0.0.7,10.0.0.8", "192.168.1.1", "10.0.0.7"),
        (" 10.0.0.7 , 10.0.0.8", "192.168.1.1", "10.0.0.7"),
        ("2001:db8::1, 10.0.0.8", "", "2001:db8::1"),
        ("", "192.168.1.1", "192.168.1.1"),
        (" ", "192.168.1.1", "192.168.1.1"),
        ("", "", ""),
    ],
)
def test_client_ip(forwarded_for, downstream_ip, client_ip):
    record = rec.from_access(allowed_entry(forwarded_for=forwarded_for, downstream_ip=downstream_ip), FLOW)
    assert record is not None and record.client_ip == client_ip


@pytest.mark.parametrize(
    ("path", "request_path"),
    [("/headers?x=1", "/headers"), ("/headers", "/headers"), ("/a?b?c", "/a"), ("?x", ""), ("", "")],
)
def test_request_path_has_no_query(path, request_path):
    record = rec.from_access(allowed_entry(path=path), FLOW)
    assert record is not None
    assert (record.request_uri, record.request_path) == (path, request_path)


@pytest.mark.parametrize(
    ("value", "first"), [("1.2.3.4", "1.2.3.4"), ("1.2.3.4, 5.6.7.8", "1.2.3.4"), ("", ""), (",5.6.7.8", "")]
)
def test_first_forwarded_for(value, first):
    assert rec.first_forwarded_for(value) == first


# ---- denied ----------------------------------------------------------------------------------------


def test_denied_record_without_auth_context():
    record = rec.denied(
        flow_id=FLOW,
        org="org",
        env="test",
        api="httpbin.org",
        request_ms=START,
        method="POST",
        path="/orders?x-api-key=k",
        user_agent="curl/8.0",
        client_ip="10.0.0.7",
        status=401,
    )
    assert record == Record(
        client_received_start_timestamp=START,
        client_received_end_timestamp=START,
        client_sent_start_timestamp=START,
        client_sent_end_timestamp=START,
        apiproxy="httpbin.org",
        request_uri="/orders?x-api-key=k",
        request_path="/orders",
        request_verb="POST",
        client_ip="10.0.0.7",
        useragent="curl/8.0",
        response_status_code=401,
        organization="org",
        environment="test",
        gateway_flow_id=FLOW,
    )
    assert rec.validate(record, START) is None
    line = json.loads(rec.to_json_line(record))
    assert line["response_status_code"] == 401
    assert "developer_app" not in line and "target_sent_start_timestamp" not in line


@pytest.mark.parametrize("status", [401, 403, 429, 503])
def test_denied_record_with_auth_context(status):
    record = rec.denied(
        flow_id=FLOW,
        org="org",
        env="test",
        api="httpbin.org",
        request_ms=START,
        method="GET",
        path="/headers",
        user_agent="",
        client_ip="",
        status=status,
        developer_email="dev@example.com",
        app="app",
        client_id="cid",
        api_product="prod",
        access_token="tok",
    )
    assert record.response_status_code == status
    assert record.developer_email == "dev@example.com"
    assert (record.developer_app, record.client_id, record.api_product) == ("app", "cid", "prod")
    assert record.access_token == "tok"
    # The sent timestamps are the request time, in ms (the Go adapter added seconds to them).
    assert record.client_sent_start_timestamp == record.client_sent_end_timestamp == START
    assert rec.validate(record, START + 5) is None


# ---- validate --------------------------------------------------------------------------------------

NOW = START + 1_000
DAY = 24 * 3600 * 1000

VALIDATION = [
    ("valid", {}, None),
    ("missing org", {"organization": ""}, rec.MISSING_ORG),
    ("missing env", {"environment": ""}, rec.MISSING_ENV),
    ("missing flow id", {"gateway_flow_id": ""}, rec.MISSING_FLOW_ID),
    ("org checked first", {"organization": "", "environment": "", "gateway_flow_id": ""}, rec.MISSING_ORG),
    ("no start", {"client_received_start_timestamp": 0}, rec.MISSING_TIMESTAMP),
    ("no received end", {"client_received_end_timestamp": 0}, rec.MISSING_TIMESTAMP),
    ("no sent end", {"client_sent_end_timestamp": 0}, rec.MISSING_TIMESTAMP),
    ("start after received end", {"client_received_end_timestamp": START - 1}, rec.BAD_TIMESTAMPS),
    ("start after sent end", {"client_sent_end_timestamp": START - 1}, rec.BAD_TIMESTAMPS),
    ("start equals ends", {"client_received_end_timestamp": START, "client_sent_end_timestamp": START}, None),
    (
        "a minute ahead is tolerated",
        {
            "client_received_start_timestamp": NOW + 60_000,
            "client_received_end_timestamp": NOW + 60_000,
            "client_sent_end_timestamp": NOW + 60_000,
        },
        None,
    ),
    (
        "beyond a minute ahead",
        {
            "client_received_start_timestamp": NOW + 60_001,
            "client_received_end_timestamp": NOW + 60_001,
            "client_sent_end_timestamp": NOW + 60_001,
        },
        rec.IN_FUTURE,
    ),
    ("90 days old", {"client_received_start_timestamp": NOW - 90 * DAY}, None),
    ("older than 90 days", {"client_received_start_timestamp": NOW - 90 * DAY - 1}, rec.TOO_OLD),
]


@pytest.mark.parametrize(("changes", "reason"), [c[1:] for c in VALIDATION], ids=[c[0] for c in VALIDATION])
def test_validate(changes, reason):
    assert rec.validate(a_record(**changes), NOW) == reason


def test_reasons_are_listed():
    assert {c[2] for c in VALIDATION} - {None} == set(rec.INVALID_REASONS)


# ---- to_json_line ----------------------------------------------------------------------------------

OMIT_EMPTY = [
    "target_sent_start_timestamp",
    "target_sent_end_timestamp",
    "target_received_start_timestamp",
    "target_received_end_timestamp",
    "client_ip",
    "developer_email",
    "developer_app",
    "access_token",
    "client_id",
    "api_product",
]
ALWAYS = [
    "apiproxy",
    "apiproxy_revision",
    "client_received_end_timestamp",
    "client_received_start_timestamp",
    "client_sent_end_timestamp",
    "client_sent_start_timestamp",
    "environment",
    "gateway_flow_id",
    "gateway_source",
    "organization",
    "recordType",
    "request_path",
    "request_uri",
    "request_verb",
    "response_status_code",
    "useragent",
]


def empty_record():
    return Record(
        client_received_start_timestamp=0,
        client_received_end_timestamp=0,
        client_sent_start_timestamp=0,
        client_sent_end_timestamp=0,
        apiproxy="",
        request_uri="",
        request_path="",
        request_verb="",
        useragent="",
        response_status_code=0,
        organization="",
        environment="",
        gateway_flow_id="",
    )


def test_empty_fields():
    line = json.loads(rec.to_json_line(empty_record()))
    assert sorted(line) == sorted(ALWAYS)  # the omitempty fields are left out, the others stay
    assert line["apiproxy"] == "" and line["client_sent_end_timestamp"] == 0


@pytest.mark.parametrize("name", OMIT_EMPTY)
def test_omit_empty_fields_are_written_when_set(name):
    value = 5 if name.endswith("_timestamp") else "x"
    line = json.loads(rec.to_json_line(dataclasses.replace(empty_record(), **{name: value})))
    assert line[name] == value


def test_constants_and_key_order():
    raw = rec.to_json_line(a_record(access_token="t"))
    line = json.loads(raw)
    assert line["recordType"] == "APIAnalytics"
    assert (line["apiproxy_revision"], line["gateway_source"]) == (0, "envoy")
    assert list(line) == sorted(line)
    assert sorted(line) == sorted([*ALWAYS, *OMIT_EMPTY, "dc.tier"])
    assert raw.endswith(b"}\n") and raw.count(b"\n") == 1 and b" " not in raw


def test_non_ascii_is_raw_utf8_and_newlines_escaped():
    raw = rec.to_json_line(a_record(useragent="agent é ✓\nnext", attributes={"city": "Zürich"}))
    assert "agent é ✓\\nnext".encode() in raw
    assert '"dc.city":"Zürich"'.encode() in raw
    assert raw.count(b"\n") == 1


def test_lone_surrogate_does_not_fail():
    raw = rec.to_json_line(a_record(useragent="a\ud800b"))
    assert json.loads(raw)["useragent"] == "a?b"


# ---- attributes --------------------------------------------------------------------------------------

ATTRIBUTES = [
    ("prefix added", {"tier": "gold"}, {"dc.tier": "gold"}),
    ("prefix kept", {"dc.tier": "gold"}, {"dc.tier": "gold"}),
    ("prefix is case sensitive", {"DC.tier": 1}, {"dc.DC.tier": 1}),
    ("int", {"n": 5}, {"dc.n": 5}),
    ("big int", {"n": 10**30}, {"dc.n": 10**30}),
    ("float", {"r": 0.5}, {"dc.r": 0.5}),
    ("bool", {"ok": True, "no": False}, {"dc.ok": True, "dc.no": False}),
    ("empty string kept", {"s": ""}, {"dc.s": ""}),
    ("none dropped", {"x": None}, {}),
    ("list dropped", {"x": [1]}, {}),
    ("dict dropped", {"x": {"a": 1}}, {}),
    ("bytes dropped", {"x": b"a"}, {}),
    ("nan dropped", {"x": math.nan}, {}),
    ("infinity dropped", {"x": math.inf, "y": -math.inf}, {}),
    ("same name twice: the later wins", {"tier": "a", "dc.tier": "b"}, {"dc.tier": "b"}),
]


@pytest.mark.parametrize(("values", "expected"), [a[1:] for a in ATTRIBUTES], ids=[a[0] for a in ATTRIBUTES])
def test_attributes(values, expected):
    assert rec.attributes(values) == expected
    line = json.loads(rec.to_json_line(a_record(attributes=values)))
    assert {k: v for k, v in line.items() if k.startswith("dc.")} == expected


def test_attributes_are_capped_at_100_usable_values():
    values = {"bad": None, **{f"a{i:03}": i for i in range(150)}}
    out = rec.attributes(values)
    assert len(out) == rec.MAX_ATTRIBUTES == 100
    assert list(out) == [f"dc.a{i:03}" for i in range(100)]


def test_exactly_100_attributes_are_kept():
    assert len(rec.attributes({f"a{i}": i for i in range(100)})) == 100


def test_attribute_strings_are_truncated_in_the_line():
    line = json.loads(rec.to_json_line(a_record(attributes={"long": "é" * 300})))
    assert line["dc.long"] == "é" * 200


TRUNCATION = [
    ("empty", "", 400, ""),
    ("short ascii", "abc", 400, "abc"),
    ("exactly the limit", "a" * 400, 400, "a" * 400),
    ("one over", "a" * 401, 400, "a" * 400),
    ("two-byte chars fit", "é" * 200, 400, "é" * 200),
    ("two-byte chars cut", "é" * 201, 400, "é" * 200),
    ("cut inside a two-byte char", "a" + "é" * 200, 400, "a" + "é" * 199),
    ("cut inside a four-byte char", "ab" + "😀" * 100, 400, "ab" + "😀" * 99),
    ("cut inside a three-byte char", "✓" * 134, 400, "✓" * 133),
    ("small limit", "é", 1, ""),
]


@pytest.mark.parametrize(
    ("value", "limit", "expected"), [t[1:] for t in TRUNCATION], ids=[t[0] for t in TRUNCATION]
)
def test_truncate_utf8(value, limit, expected):
    out = rec.truncate_utf8(value, limit)
    assert out == expected
    assert len(out.encode()) <= limit
