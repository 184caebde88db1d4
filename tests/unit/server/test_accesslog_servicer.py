"""AccessLogServicer and Check's deny records, into the real durable buffer."""

import gzip
import json

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from authz.analytics.buffer import Buffer
from authz.decision.model import Policy
from authz.metrics import new_metrics
from authz.server.accesslog import AccessLogServicer
from authz.standalone.catalog_file import parse_catalog
from tests.support.catalogs import ORDERS_KEY, catalog_yaml
from tests.support.check_requests import check_request
from tests.support.clock import FakeClock
from tests.support.servicers import grpc_servicer

NOW = 1_800_000_000.0
OURS = {
    "x-apigee-organization": "org",
    "x-apigee-environment": "test",
    "x-apigee-api": "orders-api",
    "x-apigee-application": "orders-app",
    "x-apigee-developeremail": "dev@example.com",
    "x-apigee-clientid": "cid",
    "x-apigee-analytics-product": "orders",
    "x-apigee-authorized": "true",
}


def entry(metadata=OURS, path="/v1/orders/1?x=1"):
    log = accesslog_pb2.HTTPAccessLogEntry()
    common = log.common_properties
    common.start_time.FromMilliseconds(int(NOW * 1000) - 50)
    common.time_to_last_rx_byte.FromMilliseconds(1)
    common.time_to_last_downstream_tx_byte.FromMilliseconds(9)
    common.downstream_remote_address.socket_address.address = "127.0.0.1"
    if metadata:
        common.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(metadata)
    log.request.path = path
    log.request.user_agent = "curl/8.0"
    log.response.response_code.value = 200
    return log


def message(*entries):
    found = als_pb2.StreamAccessLogsMessage()
    found.identifier.log_name = "apigee-remote-service-envoy"
    found.http_logs.log_entry.extend(entries)
    return found


async def staged_records(buffer):
    await buffer.rotate()
    records = []
    for staged in buffer.staged():
        records += [json.loads(line) for line in gzip.decompress(staged.path.read_bytes()).splitlines()]
    return records


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, {"org": "org", **labels}) or 0


async def test_entries_with_our_metadata_become_records(tmp_path):
    metrics, clock = new_metrics(), FakeClock(NOW)
    buffer = Buffer(tmp_path, "org", metrics, clock)
    servicer = AccessLogServicer(buffer, metrics, "org", clock, max_age=60)
    servicer.handle(message(entry(), entry(metadata=None), entry(path="/v1/orders/2")))
    records = await staged_records(buffer)
    assert [(r["request_uri"], r["developer_app"], r["response_status_code"]) for r in records] == [
        ("/v1/orders/1?x=1", "orders-app", 200),
        ("/v1/orders/2", "orders-app", 200),
    ]  # the entry without our metadata is not ours
    assert records[0]["organization"] == "org" and records[0]["environment"] == "test"
    assert records[0]["gateway_flow_id"] != records[1]["gateway_flow_id"]
    assert sample(metrics, "analytics_records_total", env="test", status="received") == 2


async def test_an_invalid_record_is_dropped_and_counted(tmp_path):
    metrics, clock = new_metrics(), FakeClock(NOW + 91 * 86400)  # the entry is 91 days old
    buffer = Buffer(tmp_path, "org", metrics, clock)
    AccessLogServicer(buffer, metrics, "org", clock, max_age=60).handle(message(entry()))
    assert await staged_records(buffer) == []
    assert sample(metrics, "analytics_records_dropped_total", reason="invalid") == 1


async def test_the_stream_survives_a_bad_message_and_ends_at_max_age(tmp_path):
    metrics, clock = new_metrics(), FakeClock(NOW)
    buffer = Buffer(tmp_path, "org", metrics, clock)
    servicer = AccessLogServicer(buffer, metrics, "org", clock, max_age=60)
    sent = []

    async def stream():
        yield "not a message"  # the codec fails on it: counted, the stream goes on
        sent.append(1)
        yield message(entry())
        sent.append(2)
        clock.advance(61)
        yield message(entry(path="/v1/orders/3"))
        sent.append(3)  # read after max_age: the servicer stops and Envoy reconnects
        yield message(entry(path="/v1/orders/4"))
        sent.append(4)

    reply = await servicer.StreamAccessLogs(stream(), None)
    assert isinstance(reply, als_pb2.StreamAccessLogsResponse)
    assert sent == [1, 2]
    assert sample(metrics, "analytics_records_dropped_total", reason="unreadable") == 1
    assert [r["request_uri"] for r in await staged_records(buffer)] == ["/v1/orders/1?x=1", "/v1/orders/3"]


async def test_check_writes_one_record_per_deny_and_none_per_allow(tmp_path):
    metrics, clock = new_metrics(), FakeClock(NOW)
    buffer = Buffer(tmp_path, "org", metrics, clock)
    catalog = parse_catalog(catalog_yaml(), "catalog.yaml")
    servicer = grpc_servicer(lambda: catalog, Policy(org="org", env="test"), metrics, clock, analytics=buffer)
    request = check_request(
        key=None, headers={"user-agent": "curl/8.0", "x-forwarded-for": "10.0.0.7, 10.0.0.8"}
    )
    request.attributes.request.time.FromMilliseconds(int(NOW * 1000) - 5)
    await servicer.Check(request, None)  # 401: no key
    await servicer.Check(check_request(key=ORDERS_KEY), None)  # allowed: Envoy's access log has its record
    await servicer.Check(check_request(key=ORDERS_KEY, path="/v2/x?a=1"), None)  # 403: no product
    records = await staged_records(buffer)
    assert [(r["response_status_code"], r["request_uri"]) for r in records] == [
        (401, "/v1/orders/1"),
        (403, "/v2/x?a=1"),
    ]
    first, second = records
    assert (
        first["client_received_start_timestamp"] == first["client_sent_end_timestamp"] == int(NOW * 1000) - 5
    )
    assert (first["useragent"], first["client_ip"]) == ("curl/8.0", "10.0.0.7")
    assert first["apiproxy"] == "orders-api" and first["request_verb"] == "GET"
    assert "developer_app" not in first  # nobody was authenticated
    assert (second["developer_app"], second["request_path"]) == ("orders-app", "/v2/x")
    assert second["client_received_start_timestamp"] == int(NOW * 1000)  # no request time: the clock
    assert ORDERS_KEY not in json.dumps(records)
