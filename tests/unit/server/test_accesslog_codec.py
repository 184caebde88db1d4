"""The access-log codec, on messages built as Envoy sends them (envoy.service.accesslog.v3)."""

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from authz.analytics import record as rec
from authz.analytics.record import AccessEntry, Record
from authz.server import accesslog_codec as codec

START = 1_700_000_000_000
OURS = {
    "x-apigee-organization": "org",
    "x-apigee-environment": "test",
    "x-apigee-api": "httpbin.org",
    "x-apigee-application": "httpbin-app",
    "x-apigee-developeremail": "integration@test.com",
    "x-apigee-clientid": "cid",
    "x-apigee-analytics-product": "httpbin-product",
    "x-apigee-authorized": "true",
}


def http_entry(metadata=OURS, data_capture=None, status=200, durations=True):
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.protocol_version = accesslog_pb2.HTTPAccessLogEntry.HTTP11
    common = entry.common_properties
    common.start_time.FromMilliseconds(START)
    if durations:
        # Envoy reports ns precision; sub-ms parts are dropped.
        common.time_to_last_rx_byte.FromNanoseconds(7_900_000)
        common.time_to_first_upstream_tx_byte.FromMilliseconds(8)
        common.time_to_last_upstream_tx_byte.FromMilliseconds(8)
        common.time_to_first_upstream_rx_byte.FromMilliseconds(20)
        common.time_to_last_upstream_rx_byte.FromMilliseconds(29)
        common.time_to_first_downstream_tx_byte.FromMilliseconds(30)
        common.time_to_last_downstream_tx_byte.FromMilliseconds(31)
    common.downstream_remote_address.socket_address.address = "192.168.1.1"
    common.downstream_remote_address.socket_address.port_value = 51234
    common.upstream_cluster = "httpbin"
    if metadata is not None:
        common.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(metadata)
    if data_capture is not None:
        common.metadata.filter_metadata["envoy.filters.http.apigee.datacapture"].update(data_capture)
    request = entry.request
    request.request_method = base_pb2.GET
    request.scheme = "http"
    request.authority = "httpbin.org"
    request.path = "/headers?x=1"
    request.user_agent = "curl/8.0"
    request.forwarded_for = "10.0.0.7, 192.168.1.1"
    request.request_id = "r1"
    request.request_headers["x-request-id"] = "r1"
    if status is not None:
        entry.response.response_code.value = status
    entry.response.response_body_bytes = 100
    return entry


def stream_message(*entries, log_name="apigee"):
    message = als_pb2.StreamAccessLogsMessage()
    if log_name:
        message.identifier.log_name = log_name
        message.identifier.node.id = "envoy-1"
    message.http_logs.log_entry.extend(entries)
    return message


def roundtrip(message):
    """Envoy's bytes, parsed as the servicer will get them."""
    return als_pb2.StreamAccessLogsMessage.FromString(message.SerializeToString())


def test_entry_fields():
    entries = list(codec.entries(roundtrip(stream_message(http_entry(data_capture={"tier": "gold"})))))
    assert entries == [
        AccessEntry(
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
    ]


def test_one_entry_per_http_log_entry():
    message = stream_message(http_entry(), http_entry(status=404), http_entry(status=503))
    assert [e.status for e in codec.entries(roundtrip(message))] == [200, 404, 503]


def test_tcp_logs_and_empty_messages_yield_nothing():
    tcp = als_pb2.StreamAccessLogsMessage()
    tcp.tcp_logs.log_entry.add().common_properties.start_time.FromMilliseconds(START)
    assert list(codec.entries(roundtrip(tcp))) == []
    assert list(codec.entries(als_pb2.StreamAccessLogsMessage())) == []
    assert list(codec.entries(stream_message())) == []


def test_absent_fields():
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.path = "/"
    [got] = codec.entries(roundtrip(stream_message(entry)))
    assert got == AccessEntry(start_ms=0, path="/")
    assert got.last_rx_ms is None and got.first_upstream_tx_ms is None and got.status == 0


def test_missing_durations_are_none_and_zero_durations_are_zero():
    entry = http_entry(durations=False)
    entry.common_properties.time_to_first_upstream_tx_byte.FromMilliseconds(0)  # set, but 0
    [got] = codec.entries(stream_message(entry))
    assert got.first_upstream_tx_ms == 0
    unset = (got.last_rx_ms, got.last_upstream_tx_ms, got.first_upstream_rx_ms, got.last_upstream_rx_ms)
    assert unset == (None, None, None, None)
    assert (got.first_downstream_tx_ms, got.last_downstream_tx_ms) == (None, None)


def test_start_time_in_ms():
    entry = http_entry()
    entry.common_properties.start_time.seconds = 1_700_000_000
    entry.common_properties.start_time.nanos = 123_999_999
    [got] = codec.entries(stream_message(entry))
    assert got.start_ms == 1_700_000_000_123


@pytest.mark.parametrize(
    ("method", "name"),
    [
        (base_pb2.GET, "GET"),
        (base_pb2.HEAD, "HEAD"),
        (base_pb2.POST, "POST"),
        (base_pb2.PUT, "PUT"),
        (base_pb2.DELETE, "DELETE"),
        (base_pb2.CONNECT, "CONNECT"),
        (base_pb2.OPTIONS, "OPTIONS"),
        (base_pb2.TRACE, "TRACE"),
        (base_pb2.PATCH, "PATCH"),
        (base_pb2.METHOD_UNSPECIFIED, ""),
        (99, ""),  # a method a newer Envoy knows: open enum, kept as a number
    ],
)
def test_request_method(method, name):
    entry = http_entry()
    entry.request.request_method = method
    [got] = codec.entries(roundtrip(stream_message(entry)))
    assert got.method == name


def test_ext_authz_metadata_keeps_string_fields_only():
    mixed = {**OURS, "n": 1, "b": True, "l": ["x"], "s": {}}
    [got] = codec.entries(stream_message(http_entry(metadata=mixed)))
    assert got.authz == OURS


def test_data_capture_values():
    values = {
        "tier": "gold",
        "count": 5,
        "negative": -3,
        "ratio": 0.25,
        "ok": True,
        "big": 1e300,
        "exact": 2.0**53,
        "none": None,
        "list": [1, 2],
        "struct": {"a": 1},
    }
    [got] = codec.entries(roundtrip(stream_message(http_entry(data_capture=values))))
    assert got.data_capture == {
        "tier": "gold",
        "count": 5,
        "negative": -3,
        "ratio": 0.25,
        "ok": True,
        "big": 1e300,
        "exact": 2**53,
    }
    assert type(got.data_capture["count"]) is int
    assert type(got.data_capture["big"]) is float
    assert type(got.data_capture["ok"]) is bool


def test_non_finite_data_capture_numbers_stay_floats_and_are_dropped_from_the_record():
    entry = http_entry()
    fields = entry.common_properties.metadata.filter_metadata["envoy.filters.http.apigee.datacapture"].fields
    fields["nan"].number_value = float("nan")
    fields["inf"].number_value = float("inf")
    fields["tier"].string_value = "gold"
    [got] = codec.entries(roundtrip(stream_message(entry)))
    record = rec.from_access(got, "flow")
    assert record is not None
    assert rec.attributes(record.attributes) == {"dc.tier": "gold"}


def test_request_headers_get_lowercase_names():
    entry = http_entry()
    entry.request.request_headers["X-Tenant"] = "t1"
    [got] = codec.entries(stream_message(entry))
    assert got.request_headers == {"x-request-id": "r1", "x-tenant": "t1"}


def test_pipe_peer_has_no_ip():
    entry = http_entry()
    entry.common_properties.downstream_remote_address.pipe.path = "/run/envoy.sock"
    [got] = codec.entries(stream_message(entry))
    assert got.downstream_ip == ""


def test_log_name_is_only_in_the_first_message():
    assert codec.log_name(roundtrip(stream_message(http_entry(), log_name="apigee"))) == "apigee"
    assert codec.log_name(roundtrip(stream_message(http_entry(), log_name=""))) == ""


# ---- codec + record --------------------------------------------------------------------------------


def test_allowed_request_gives_the_expected_record():
    message = roundtrip(stream_message(http_entry(data_capture={"tier": "gold", "n": 2})))
    records = [rec.from_access(entry, "flow-1") for entry in codec.entries(message)]
    assert records == [
        Record(
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
            client_id="cid",
            api_product="httpbin-product",
            organization="org",
            environment="test",
            gateway_flow_id="flow-1",
            attributes={"tier": "gold", "n": 2},
        )
    ]
    assert rec.validate(records[0], START + 1_000) is None
    assert b'"dc.n":2,"dc.tier":"gold"' in rec.to_json_line(records[0])


def test_entries_without_our_metadata_are_skipped():
    """A denied request: Envoy logs it with a local-reply status and without ext_authz metadata."""
    denied = http_entry(metadata=None, status=403, durations=False)
    other_filter = http_entry(metadata={"some-other": "value"})
    message = roundtrip(stream_message(http_entry(), denied, other_filter))
    records = [rec.from_access(entry, "flow") for entry in codec.entries(message)]
    assert [r is not None for r in records] == [True, False, False]
